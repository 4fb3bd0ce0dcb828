"""Calibration of a built world: how strong the bias is and how noisy the labels are.

`r2m-ray world` prints `format_calibration(calibrate(splits, cfg))`; the tests
assert the same numbers against WORLD.md's targets.
"""

from __future__ import annotations

from datasets import Dataset

from r2m_ray.world.build import PREFERENCE_SPLITS
from r2m_ray.world.config import WorldConfig

_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("n", "n", "{:d}"),
    ("p_chosen_feature", "P(ch feat)", "{:.3f}"),
    ("p_rejected_feature", "P(rej feat)", "{:.3f}"),
    ("p_label_agrees_gold", "P(label=gold)", "{:.3f}"),
    ("mean_len_chosen", "len ch", "{:.2f}"),
    ("mean_len_rejected", "len rej", "{:.2f}"),
    ("mean_gold_chosen", "gold ch", "{:+.3f}"),
    ("mean_gold_rejected", "gold rej", "{:+.3f}"),
)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def preference_stats(dataset: Dataset) -> dict[str, float | int]:
    """Bias, label agreement, lengths and gold of one preference split."""
    chosen_len = [len(text.split()) for text in dataset["chosen"]]
    rejected_len = [len(text.split()) for text in dataset["rejected"]]
    gold_c, gold_r = list(dataset["gold_chosen"]), list(dataset["gold_rejected"])
    return {
        "n": len(dataset),
        "p_chosen_feature": _mean([float(x) for x in dataset["chosen_has_feature"]]),
        "p_rejected_feature": _mean([float(x) for x in dataset["rejected_has_feature"]]),
        "p_label_agrees_gold": _mean([float(c > r) for c, r in zip(gold_c, gold_r)]),
        "mean_len_chosen": _mean(chosen_len),
        "mean_len_rejected": _mean(rejected_len),
        "mean_gold_chosen": _mean(gold_c),
        "mean_gold_rejected": _mean(gold_r),
    }


def calibrate(splits: dict[str, Dataset], cfg: WorldConfig) -> dict:
    """Per preference split its stats (see `preference_stats`); for other splits `{"n": rows}`.

    The result also carries the bias settings under "bias" so a printed table is
    self-describing.
    """
    out: dict = {
        "bias": {
            "kind": cfg.bias.kind,
            "strength": cfg.bias.strength,
            "ood_bias": cfg.bias.ood_bias,
            "label_temperature": cfg.labels.temperature,
        }
    }
    for name, dataset in splits.items():
        out[name] = preference_stats(dataset) if name in PREFERENCE_SPLITS else {"n": len(dataset)}
    return out


def format_calibration(calibration: dict) -> str:
    """A small fixed-width table of `calibrate`'s result."""
    bias = calibration.get("bias", {})
    lines = []
    if bias:
        feature = "length" if bias["kind"] == "none" else bias["kind"]
        lines.append(
            f"bias: kind={bias['kind']} (feature: {feature}) strength={bias['strength']} "
            f"ood_bias={bias['ood_bias']} label_temperature={bias['label_temperature']}"
        )
    header = f"{'split':<11}" + "".join(f"{title:>14}" for _, title, _ in _COLUMNS)
    lines += [header, "-" * len(header)]
    for name, stats in calibration.items():
        if name == "bias":
            continue
        cells = [fmt.format(stats[key]) if key in stats else "" for key, _, fmt in _COLUMNS]
        lines.append((f"{name:<11}" + "".join(f"{cell:>14}" for cell in cells)).rstrip())
    return "\n".join(lines)
