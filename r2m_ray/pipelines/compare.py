"""`r2m-ray compare SPEC.yaml`: many methods × seeds, one results table.

The spec names a base job config, overrides for all runs, the seeds and the variants
(each a list of dotted overrides). Without an `rl` stage in the base config the variants
are reward-model methods: the world and the SFT warm-up are built once and shared, every
(variant, seed) trains its own reward model, and the table (mean ± std over seeds of ID /
OOD accuracy and gold accuracy) is written as markdown between markers in the output file,
with the command that produced it. With an `rl` stage the variants are RL arms over paired
seeds (rl_compare.py).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import statistics
import time
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, model_validator

from r2m_ray.atomic_write import atomic_write_text
from r2m_ray.config import ConfigError, RunConfig, load_config
from r2m_ray.config_base import Section
from r2m_ray.ray_setup import init_ray
from r2m_ray.rundir import RunDir

log = logging.getLogger(__name__)


class CompareSpec(Section):
    """What to compare: base config + overrides, seeds, variants, where the table goes."""

    base: str
    overrides: list[str] = []
    seeds: list[int] = Field(default=[0, 1, 2], min_length=1)
    variants: dict[str, list[str]] = {}
    # a factorial sweep: axes in order, each {level label: overrides}; every combination is a
    # variant named "label1/label2/…" (after `variants`), its overrides the levels' in axis order.
    # With the method axis last and group_reference, each method is paired with its cell's BT.
    grid: dict[str, dict[str, list[str]]] = {}
    output: str = "docs/results.md"
    section: str = "rm_compare"
    # RL arms (rl_compare.py): the keys set to each seed, the reward models trained per seed
    # (name → overrides, e.g. world.bias.kind=none), which one each arm uses (default: the
    # first), the arm paired differences are taken against, the KL budgets gold is read at
    seed_keys: list[str] = ["seed", "world.seed", "model.seed"]
    reward_models: dict[str, list[str]] = Field(default_factory=lambda: {"rm": []}, min_length=1)
    arm_reward_model: dict[str, str] = {}
    arm_seeds: dict[str, list[int]] = {}  # arms run on a subset of the seeds (default: all of them)
    reference: str | None = None
    # RM sweeps with variants named GROUP/METHOD (e.g. n500/grm_sft): each variant's paired
    # difference is taken against GROUP/<group_reference> (e.g. n500/bt), not one reference for all
    group_reference: str | None = None
    kl_budgets: list[float] = [1.0, 4.0]
    figures: str = "docs/figures"
    # RM comparisons: best-of-n gold against the KL bound with every (variant, seed) RM, on one set of
    # samples of the SFT policy (eval.bon.n, .prompts, .max_new_tokens from the base config)
    bon: bool = False

    @model_validator(mode="after")
    def _names_exist(self) -> CompareSpec:
        if self.grid:
            self._expand_grid()
        if not self.variants:
            raise ValueError("variants: none given (name them under variants, or a grid)")
        for arm, rm in self.arm_reward_model.items():
            if arm not in self.variants:
                raise ValueError(f"arm_reward_model: {arm!r} is not a variant")
            if rm not in self.reward_models:
                raise ValueError(
                    f"arm_reward_model.{arm}: {rm!r} is not one of reward_models {list(self.reward_models)}"
                )
        for arm, seeds in self.arm_seeds.items():
            if arm not in self.variants:
                raise ValueError(f"arm_seeds: {arm!r} is not a variant")
            if not set(seeds) <= set(self.seeds):
                raise ValueError(f"arm_seeds.{arm}: {sorted(set(seeds) - set(self.seeds))} are not in seeds")
        if self.reference is not None and self.reference not in self.variants:
            raise ValueError(f"reference: {self.reference!r} is not a variant")
        if self.group_reference is not None:
            for name in self.variants:
                group, sep, _ = name.rpartition("/")
                if not sep or f"{group}/{self.group_reference}" not in self.variants:
                    raise ValueError(
                        f"group_reference: variant {name!r} has no {group or '<group>'}/{self.group_reference} "
                        "to be paired with (name variants GROUP/METHOD)"
                    )
        return self

    def _expand_grid(self) -> None:
        """Add one variant per combination of the grid's levels (a spec is validated once)."""
        for axis, levels in self.grid.items():
            if not levels:
                raise ValueError(f"grid.{axis}: no levels")
            bad = [label for label in levels if not label or "/" in label]
            if bad:
                raise ValueError(f"grid.{axis}: level labels {bad} must be non-empty and without '/'")
        variants = dict(self.variants)
        for combo in itertools.product(*(levels.items() for levels in self.grid.values())):
            name = "/".join(label for label, _ in combo)
            if name in variants:
                raise ValueError(f"grid: variant {name!r} is also named under variants")
            variants[name] = [o for _, overrides in combo for o in overrides]
        # validate_assignment would run this validator again: set the field without it
        object.__setattr__(self, "variants", variants)
        object.__setattr__(self, "grid", {})

    def pairing(self) -> dict[str, str]:
        """Each variant's paired reference (the variant itself for a reference)."""
        if self.group_reference is None:
            ref = self.reference or next(iter(self.variants))
            return {name: ref for name in self.variants}
        return {name: f"{name.rpartition('/')[0]}/{self.group_reference}" for name in self.variants}


def load_spec(path: Path) -> CompareSpec:
    """Read and validate a compare spec; base is resolved relative to the spec file."""
    if not path.is_file():
        raise ConfigError(f"compare spec not found: {path}")
    try:
        spec = CompareSpec.model_validate(yaml.safe_load(path.read_text()))
    except ValidationError as err:
        raise ConfigError(f"{path}: {err}") from None
    base = (path.parent / spec.base).resolve()
    return spec.model_copy(update={"base": str(base)})


def mean_std(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    """ "mean ± sample std" of values × scale (accuracies in %, by default); "–" for none."""
    if not values:
        return "–"
    mean = statistics.fmean(values) * scale
    std = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


PAIRED_RM = [("ID acc", "accuracy", "id"), ("OOD acc", "accuracy", "ood"), ("OOD gold acc", "gold_accuracy", "ood")]


def results_table(
    rows: dict[str, list[dict[str, Any]]], reference: str | None = None, pairing: dict[str, str] | None = None
) -> str:
    """Markdown tables: one row per variant, mean ± std over seeds (accuracies in %) and training
    seconds; then each variant's paired difference to `reference` (default: the first variant), or
    to its own reference in `pairing` (variant → reference variant)."""
    from r2m_ray.eval.rl_report import paired_cell, paired_difference

    lines = [
        "| method | ID acc | OOD acc | ID gold acc | OOD gold acc | train s | seeds |",
        "|---|---|---|---|---|---|---|",
    ]

    def get(runs: list[dict[str, Any]], key: str, split: str) -> list[float]:
        return [r[key][split] for r in runs if split in r.get(key, {})]

    def seconds(runs: list[dict[str, Any]]) -> str:
        values = [r["train_seconds"] for r in runs if "train_seconds" in r]
        return f"{statistics.median(values):.1f}" if values else "–"

    for name, runs in rows.items():
        lines.append(
            f"| {name} | {mean_std(get(runs, 'accuracy', 'id'))} | {mean_std(get(runs, 'accuracy', 'ood'))} | "
            f"{mean_std(get(runs, 'gold_accuracy', 'id'))} | {mean_std(get(runs, 'gold_accuracy', 'ood'))} | "
            f"{seconds(runs)} | {len(runs)} |"
        )
    validated = {n: [r["delta_r2_validation"] for r in runs if "delta_r2_validation" in r] for n, runs in rows.items()}
    if any(validated.values()):  # the prioritiser's Δr2 against the world's truth, during training
        lines += [
            "",
            "Prioritised variants: Pearson correlation of each batch's Δr2 with the world's exact prompt-free "
            "gold gap and with the planted feature gap, averaged over the prioritised steps; mean ± std over seeds",
            "",
            "| method | Δr2 ~ prompt-free gold gap | Δr2 ~ planted feature gap |",
            "|---|---|---|",
        ]
        for name, vals in validated.items():
            if vals:
                cells = []
                for key in ("delta_r2_corr_free_gold", "delta_r2_corr_feature"):
                    xs = [v[key] for v in vals]
                    std = statistics.stdev(xs) if len(xs) > 1 else 0.0
                    cells.append(f"{statistics.fmean(xs):+.2f} ± {std:.2f}")
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
    ref = reference or next(iter(rows))
    pairing = pairing or {name: ref for name in rows}
    others = [name for name in rows if pairing.get(name, name) != name]
    if not others or any(len(rows[pairing[name]]) < 2 for name in others):
        return "\n".join(lines)
    against = (
        f"`{ref}`"
        if len(set(pairing.values())) == 1
        else "its group's reference (`GROUP/" + (pairing[others[0]].rpartition("/")[2] + "`)")
    )
    lines += [
        "",
        f"Paired difference to {against} (same seed), in points: mean ± 95% interval (smallest difference the "
        "seeds could detect at power 0.8); train-time ratio: median over seeds of the per-seed ratio",
        "",
        "| method | " + " | ".join(h for h, _, _ in PAIRED_RM) + " | train-time ratio |",
        "|" + "---|" * (len(PAIRED_RM) + 2),
    ]
    for name in others:
        by_seed = {r["seed"]: r for r in rows[pairing[name]]}
        pairs = [(r, by_seed[r["seed"]]) for r in rows[name] if r.get("seed") in by_seed]
        cells = []
        for _, key, split in PAIRED_RM:
            d = paired_difference([100 * a[key][split] for a, _ in pairs], [100 * b[key][split] for _, b in pairs])
            cells.append(paired_cell(d, 1))
        ratios = [a["train_seconds"] / b["train_seconds"] for a, b in pairs if "train_seconds" in a]
        cells.append(f"{statistics.median(ratios):.2f}" if ratios else "–")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def tradeoff_figure(rows: dict[str, list[dict[str, Any]]], pairing: dict[str, str], path: Path) -> Path:
    """ID accuracy against OOD gold accuracy, one point per variant (mean ± std over seeds).

    A method that only learns less (fewer steps, a weaker signal) moves along the references'
    own trade-off; one that learns less of the bias moves above it. References (each variant's
    pairing target: BT at every size and epoch count in a sweep) are joined by a line."""
    import matplotlib.pyplot as plt  # after eval.plots chose the Agg backend

    from r2m_ray.eval.plots import save_figure

    def point(runs: list[dict[str, Any]]) -> tuple[float, float, float, float]:
        x = [100 * r["accuracy"]["id"] for r in runs]
        y = [100 * r["gold_accuracy"]["ood"] for r in runs if "ood" in r.get("gold_accuracy", {})]
        sx, sy = (statistics.stdev(v) if len(v) > 1 else 0.0 for v in (x, y))
        return statistics.fmean(x), statistics.fmean(y), sx, sy

    points = {
        n: point(runs) for n, runs in rows.items() if runs and all("ood" in r.get("gold_accuracy", {}) for r in runs)
    }
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    refs = sorted({pairing.get(n, n) for n in points} & set(points), key=lambda n: points[n][0])
    if len(refs) > 1:
        ax.plot([points[n][0] for n in refs], [points[n][1] for n in refs], "k-", lw=0.8, alpha=0.5)
    for name, (x, y, sx, sy) in points.items():
        is_ref = pairing.get(name, name) == name
        ax.errorbar(x, y, xerr=sx, yerr=sy, fmt="s" if is_ref else "o", color="k" if is_ref else None, capsize=2)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(3, 3), fontsize=6)
    ax.set_xlabel("ID accuracy (%)")
    ax.set_ylabel("OOD gold accuracy (%)")
    ax.set_title("mean ± sd over seeds; squares: the references each variant is paired with", fontsize=8)
    return save_figure(fig, path)


def write_section(path: Path, section: str, body: str) -> None:
    """Replace the text between <!-- section:begin --> and <!-- section:end --> (append if absent)."""
    begin, end = f"<!-- {section}:begin -->", f"<!-- {section}:end -->"
    text = path.read_text() if path.is_file() else "# Results\n"
    block = f"{begin}\n{body}\n{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


def run_compare(
    spec_path: Path, run_dir: str | None = None, command: str = "", report_only: bool = False
) -> dict[str, Any]:
    """Run every (variant, seed); write the table; return all summaries."""
    spec = load_spec(spec_path)
    base_cfg = load_config(spec.base, spec.overrides)
    for name, ovr in spec.variants.items():  # validate every variant before hours of training
        try:
            load_config(spec.base, spec.overrides + ovr)
        except ConfigError as err:
            raise ConfigError(f"variant '{name}': {err}") from None
    command = command or "r2m-ray compare " + str(spec_path)
    if report_only and run_dir is None:
        raise ConfigError("--report-only needs --run-dir: the comparison's run directory")
    # the same command on the same --run-dir continues the comparison: its sub-runs are checked
    # against their configs (RL) or moved aside and run again (RM), never silently overwritten
    root = RunDir.create(base_cfg.model_copy(update={"name": f"compare-{spec_path.stem}"}), run_dir, "reuse")
    if "rl" in base_cfg.stages:
        from r2m_ray.pipelines.rl_compare import run_rl_compare

        result = run_rl_compare(spec, root, command, report_only)
        root.close()
        return result
    try:
        if report_only:  # the tables again from a finished comparison (e.g. after a change to the report)
            rows, bon, minutes = _saved_rm_results(spec, root)
        else:
            rows, bon, minutes = _run_rm_variants(spec, base_cfg, root)
        return write_rm_report(spec, root, rows, bon, minutes, command)
    finally:
        root.close()


def _run_rm_variants(
    spec: CompareSpec, base_cfg: RunConfig, root: RunDir
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any] | None, float]:
    """World and SFT once, then every (seed, variant)'s reward model; best-of-n with each if asked."""
    from r2m_ray.pipelines.full_run import base_model_dir, run_world
    from r2m_ray.pipelines.rm_stage import keep_learners, run_rm_stage
    from r2m_ray.pipelines.sft_stage import run_sft_stage

    t0 = time.perf_counter()
    world = run_world(base_cfg, root)
    model_dir = base_model_dir(base_cfg)
    rm_init = model_dir
    if "sft" in base_cfg.stages:
        rm_init, _ = run_sft_stage(base_cfg, root, model_dir, world)
    init_ray(base_cfg.ray)
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in spec.variants}
    with keep_learners():  # every RM is trained in the same learner ranks (a new model each time)
        for seed in spec.seeds:
            for name, ovr in spec.variants.items():
                cfg = load_config(spec.base, spec.overrides + ovr + [f"seed={seed}", f"rm.method={name}"])
                sub = RunDir.create(cfg, root.path / f"{name}-seed{seed}", "force")
                summary = run_rm_stage(cfg, sub, rm_init, world)
                sub.close()
                rows[name].append({**summary, "seed": seed})
                log.info("compare %s seed %d done", name, seed)
                atomic_write_text(root.path / "compare.json", json.dumps(rows, indent=2, default=float))
    bon = None
    if spec.bon:
        from r2m_ray.pipelines.rm_compare_bon import run_bon

        bon = run_bon(base_cfg, rm_init, world, rows)
        atomic_write_text(root.path / "compare.json", json.dumps(rows, indent=2, default=float))
        root.update_summary("bon", bon)
    minutes = (time.perf_counter() - t0) / 60
    root.update_summary(None, {"minutes": minutes})
    return rows, bon, minutes


def _saved_rm_results(
    spec: CompareSpec, root: RunDir
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any] | None, float | None]:
    """A finished RM comparison's rows, best-of-n and minutes, as its run directory holds them."""
    saved = root.path / "compare.json"
    if not saved.is_file():
        raise ConfigError(f"--report-only: {saved} does not exist: run the comparison in this --run-dir first")
    rows = json.loads(saved.read_text())
    missing = [n for n in spec.variants if len(rows.get(n, [])) != len(spec.seeds)]
    if missing:
        raise ConfigError(f"--report-only: {saved} lacks seeds {spec.seeds} of variants {missing}: an unfinished run")
    rows = {n: rows[n] for n in spec.variants}
    bon = root.summary.get("bon")
    if spec.bon and (bon is None or any("bon" not in r for runs in rows.values() for r in runs)):
        raise ConfigError(f"--report-only: the spec asks for best-of-n (bon: true) but {root.path} has none")
    return rows, bon if spec.bon else None, root.summary.get("minutes")


def write_rm_report(
    spec: CompareSpec,
    root: RunDir,
    rows: dict[str, list[dict[str, Any]]],
    bon: dict[str, Any] | None,
    minutes: float | None,
    command: str,
) -> dict[str, Any]:
    """The tables and figures of an RM comparison, written into spec.output between its markers."""
    figures, out_dir = Path(spec.figures), Path(spec.output).parent
    trade = tradeoff_figure(rows, spec.pairing(), figures / f"{spec.section}_id_vs_ood.png")
    table = (
        results_table(rows, spec.reference, spec.pairing())
        + f"\n\nFigure: [{trade.name}]({os.path.relpath(trade, out_dir)})."
    )
    if bon is not None:
        from r2m_ray.pipelines.rm_compare_bon import bon_figure, bon_table

        figure = bon_figure(rows, bon, figures / f"{spec.section}_bon.png")
        link = os.path.relpath(figure, out_dir)
        table += f"\n\n{bon_table(rows, spec.pairing(), bon)}\n\nFigure: [{figure.name}]({link})."
    what = (
        "Accuracy = agreement with the split's (noisy, biased-sampled) labels; gold acc = agreement "
        "with the world's gold preference. Mean ± std over seeds, in %; train s: the median over seeds "
        "of the training loop's seconds (evaluation and start-up apart)."
    )
    took = f"{minutes:.0f} min on this machine" if minutes is not None else "time not recorded"
    body = f"Command: `{command}` ({len(spec.seeds)} seeds, {took}).\n{what}\n\n" + table
    write_section(Path(spec.output), spec.section, body)
    root.update_summary(None, {"table": table})
    return {"rows": rows, "table": table}
