"""Does the prompt-free gap estimator find what the world planted? (`r2m-ray eval decomposition`)

The world knows every pair's exact prompt-free gold gap Δg2 and its planted feature gap
(world/prompt_free_truth.py). On a world split, in batches as the prioritiser sees them, this
scores each pair's cross pairs with a trained RM and solves for its Δr2 (actors/prioritizer.decompose,
the code training uses), for each M in eval.decomposition.num_prompts, and reports correlations:

- RM Δr2 with Δg2 and with the feature gap: what the RM holds "regardless of the prompt";
- the RM's own-prompt gap d_own with the same: what the decomposition adds over the raw margin;
- RM Δr1 = d_own − Δr2 with the correctness gap (the prompt-related part of gold);
- the control: the same estimator with gold itself as the reward (same cross prompts), which
  bounds what any RM could reach with this M and these batches, beside gold's own-prompt gap
  (what the estimator adds over the margin when the reward is right).

Pearson over all pairs and per task family, Spearman over all pairs (scipy.stats).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from scipy import stats

from r2m_ray.algos.decomposition import prompt_free_gap
from r2m_ray.atomic_write import atomic_write_text
from r2m_ray.config import ConfigError, RunConfig
from r2m_ray.world.config import WorldConfig
from r2m_ray.world.gold import gold_rewards

log = logging.getLogger(__name__)


def correlation(x: Any, y: Any, method: str = "pearson") -> float:
    """Pearson or Spearman correlation of two equal-length sequences; NaN if either is constant or n < 3."""
    a, b = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
    if a.numel() < 3 or float(a.std()) == 0 or float(b.std()) == 0:
        return math.nan
    fn = stats.pearsonr if method == "pearson" else stats.spearmanr
    return float(fn(a.numpy(), b.numpy())[0])


def truth_correlations(delta_r2: torch.Tensor, truth: dict[str, torch.Tensor], idx: list[int]) -> dict[str, float]:
    """One training batch: Pearson of its Δr2 with the exact prompt-free gold gap and with the
    planted feature gap of the same pairs (`truth` holds them for the whole training set)."""
    rows = torch.tensor(idx)
    return {
        "delta_r2_corr_free_gold": correlation(delta_r2, truth["free_gap"][rows]),
        "delta_r2_corr_feature": correlation(delta_r2, truth["feature_gap"][rows]),
    }


def gold_cross_gaps(
    prompts: list[str], chosen: list[str], rejected: list[str], idx: torch.Tensor, world: WorldConfig
) -> torch.Tensor:
    """d [n, M] with gold as the reward: g(x_i, y_c,k) − g(x_i, y_r,k) for the prompts i = idx[k]."""
    cross = [(prompts[i], k) for k in range(idx.shape[0]) for i in idx[k].tolist()]
    g_c = gold_rewards([p for p, _ in cross], [chosen[k] for _, k in cross], world)
    g_r = gold_rewards([p for p, _ in cross], [rejected[k] for _, k in cross], world)
    return (torch.tensor(g_c, dtype=torch.float64) - torch.tensor(g_r, dtype=torch.float64)).view(idx.shape)


def correlation_rows(gaps: dict[str, list[float]], truth: dict[str, list], families: list[str]) -> dict[str, Any]:
    """Every (estimate, target) correlation the report shows, overall and per family."""
    pairs = {
        "rm_delta_r2~free_gap": ("rm_delta_r2", "free_gap"),
        "rm_delta_r2~feature_gap": ("rm_delta_r2", "feature_gap"),
        "rm_d_own~free_gap": ("rm_d_own", "free_gap"),
        "rm_d_own~feature_gap": ("rm_d_own", "feature_gap"),
        "rm_delta_r1~related_gap": ("rm_delta_r1", "related_gap"),
        "gold_delta_r2~free_gap": ("gold_delta_r2", "free_gap"),
        "gold_delta_r2~feature_gap": ("gold_delta_r2", "feature_gap"),
        "gold_d_own~free_gap": ("gold_d_own", "free_gap"),
    }
    out: dict[str, Any] = {}
    for name, (est, target) in pairs.items():
        x, y = gaps[est], truth[target]
        per_family = {}
        for fam in sorted(set(families)):
            sel = [i for i, f in enumerate(families) if f == fam]
            per_family[fam] = correlation([x[i] for i in sel], [y[i] for i in sel])
        out[name] = {
            "pearson": correlation(x, y),
            "spearman": correlation(x, y, "spearman"),
            "per_family": per_family,
        }
    return out


def split_gaps(
    model: Any, ds: Any, texts: dict[str, list], cfg: RunConfig, m: int, pad_id: int, seed: int
) -> dict[str, list[float]]:
    """RM and gold-control gaps of every pair of a tokenised split, scored in shuffled batches of
    eval.decomposition.batch_size (the other prompts of a pair are those of its batch)."""
    from r2m_ray.actors.prioritizer import cross_prompt_indices, decompose
    from r2m_ray.pipelines.rm_stage import ENCODED

    dc = cfg.eval.decomposition
    batch = dc.batch_size or cfg.rm.batch_size
    prio_cfg = cfg.rm.prioritizer.model_copy(update={"num_prompts": m})
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(ds), generator=gen).tolist()
    n = len(order)
    gaps = {k: [math.nan] * n for k in ("rm_delta_r2", "rm_d_own", "rm_delta_r1", "gold_delta_r2", "gold_d_own")}
    for start in range(0, n - 1, batch):  # a last batch of one pair has no other prompt: it is left out
        rows = order[start : start + batch]
        if len(rows) < 2:
            break
        enc = ds.select(rows)
        idx = cross_prompt_indices(len(rows), m, gen)
        out = decompose(
            model,
            {c: enc[c] for c in ENCODED},
            idx,
            prio_cfg,
            pad_id,
            cfg.data.max_length,
            cfg.rm.eval_batch_size,
            cfg.rm.packing,
        )
        d_gold = gold_cross_gaps(
            [texts["prompt"][i] for i in rows],
            [texts["chosen"][i] for i in rows],
            [texts["rejected"][i] for i in rows],
            idx,
            cfg.world,
        )
        gold_r2 = prompt_free_gap(d_gold)
        for j, i in enumerate(rows):
            gaps["rm_delta_r2"][i] = float(out["delta_r2"][j])
            gaps["rm_d_own"][i] = float(out["d"][j, 0])
            gaps["rm_delta_r1"][i] = float(out["delta_r1"][j])
            gaps["gold_delta_r2"][i] = float(gold_r2[j])
            gaps["gold_d_own"][i] = float(d_gold[j, 0])
    keep = [i for i in range(n) if not math.isnan(gaps["rm_delta_r2"][i])]
    return {k: [v[i] for i in keep] for k, v in gaps.items()} | {"rows": keep}  # type: ignore[dict-item]


def check_decomposition(cfg: RunConfig, run: Any) -> dict[str, Any]:
    """The eval command: correlations per split and M, written to decomposition_check.json."""
    from r2m_ray.data.preference import load_preferences
    from r2m_ray.data.tokenize import tokenize_preferences
    from r2m_ray.models.registry import load_tokenizer
    from r2m_ray.models.reward_model import RewardModel
    from r2m_ray.pipelines.full_run import run_world
    from r2m_ray.world.prompt_free_truth import pair_truth

    if len(cfg.eval.checkpoints) != 1:
        raise ConfigError("eval decomposition: give one reward-model checkpoint, eval.checkpoints=[DIR]")
    ckpt = Path(cfg.eval.checkpoints[0])
    if not any(ckpt.glob("*.safetensors")):
        raise ConfigError(f"eval.checkpoints: {ckpt} is not a reward-model checkpoint directory")
    world = run_world(cfg, run)
    tokenizer = load_tokenizer(ckpt)
    model = RewardModel.from_pretrained(ckpt).eval()
    report: dict[str, Any] = {"checkpoint": str(ckpt), "bias": cfg.world.bias.model_dump(), "splits": {}}
    for split in cfg.eval.decomposition.splits:
        data = load_preferences(str(world[split]), cfg.data, split=split)
        tok = tokenize_preferences(data, tokenizer, cfg.data).dataset
        by_source = {s: i for i, s in enumerate(data.dataset["source_index"])}
        src = [by_source[s] for s in tok["source_index"]]
        raw = data.dataset.select(src)
        texts = {
            "prompt": [m[-1]["content"] for m in raw["prompt_messages"]],
            "chosen": raw["chosen"],
            "rejected": raw["rejected"],
        }
        truth = pair_truth(texts["prompt"], texts["chosen"], texts["rejected"], cfg.world)
        per_m = {}
        for m in cfg.eval.decomposition.num_prompts:
            gaps = split_gaps(model, tok, texts, cfg, m, tokenizer.pad_token_id, cfg.eval.decomposition.seed)
            rows = gaps.pop("rows")
            sub = {k: [v[i] for i in rows] for k, v in truth.items()}
            per_m[str(m)] = {"pairs": len(rows), "correlations": correlation_rows(gaps, sub, sub["family"])}
            log.info("eval decomposition %s M=%d: %d pairs", split, m, len(rows))
        report["splits"][split] = per_m
    atomic_write_text(run.path / "decomposition_check.json", json.dumps(report, indent=1) + "\n")
    return report


ROWS = (
    ("RM Δr2 ~ exact prompt-free gold gap", "rm_delta_r2~free_gap"),
    ("RM Δr2 ~ planted feature gap", "rm_delta_r2~feature_gap"),
    ("RM own-prompt gap ~ exact prompt-free gold gap", "rm_d_own~free_gap"),
    ("RM own-prompt gap ~ planted feature gap", "rm_d_own~feature_gap"),
    ("RM Δr1 ~ correctness gap", "rm_delta_r1~related_gap"),
    ("control: gold Δr2 ~ exact prompt-free gold gap", "gold_delta_r2~free_gap"),
    ("control: gold Δr2 ~ planted feature gap", "gold_delta_r2~feature_gap"),
    ("control: gold own-prompt gap ~ exact prompt-free gold gap", "gold_d_own~free_gap"),
)


def report_table(report: dict[str, Any]) -> str:
    """Markdown: one row per correlation, one column per (split, M); Pearson (Spearman)."""
    cols = [(split, m) for split, per_m in report["splits"].items() for m in per_m]
    head = "| correlation (Pearson, Spearman in brackets) | " + " | ".join(f"{s} M={m}" for s, m in cols) + " |"
    lines = [head, "|---|" + "---|" * len(cols)]
    for label, key in ROWS:
        cells = []
        for split, m in cols:
            c = report["splits"][split][m]["correlations"][key]
            cells.append(f"{c['pearson']:+.2f} ({c['spearman']:+.2f})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def family_table(report: dict[str, Any], split: str, m: str) -> str:
    """Markdown: the RM's Δr2 and the control's Pearson per task family, for one split and M."""
    corr = report["splits"][split][m]["correlations"]
    families = list(corr["rm_delta_r2~free_gap"]["per_family"])
    keys = ("rm_delta_r2~free_gap", "rm_delta_r2~feature_gap", "rm_d_own~feature_gap", "gold_delta_r2~free_gap")
    lines = [
        f"| family ({split}, M={m}) | RM Δr2 ~ Δg2 | RM Δr2 ~ feature | RM own gap ~ feature | gold Δr2 ~ Δg2 |",
        "|---|---|---|---|---|",
    ]
    for fam in families:
        lines.append(f"| {fam} | " + " | ".join(f"{corr[k]['per_family'][fam]:+.2f}" for k in keys) + " |")
    return "\n".join(lines)
