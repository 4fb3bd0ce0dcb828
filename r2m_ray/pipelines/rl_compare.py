"""`r2m-ray compare SPEC` for RL arms over paired seeds: the over-optimisation experiment.

Per seed s (the spec's `seed_keys` all set to s): the world, one SFT policy, and each named
reward model of `reward_models` (its overrides may change the world it is trained on, e.g.
`world.bias.kind=none`; it always starts from that seed's SFT policy) are built once; then
every arm runs the RL stage from that SFT policy with the reward model it names
(`arm_reward_model`, default the first), so arms differ only in their own overrides and are
paired by seed. Each run's curves are reduced by eval/rl_report.curve_stats; the tables
(mean ± 95% interval, paired difference to the `reference` arm with the smallest difference
the seeds could detect) and the gold-vs-√KL figure are written into the output file and the
figures folder. Finished runs are kept: the same command with the same --run-dir continues
where an interrupted comparison stopped, and `--report-only` rebuilds the tables from it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from r2m_ray.atomic_write import atomic_write_text
from r2m_ray.config import ConfigError, RunConfig, load_config
from r2m_ray.eval.plots import save_figure
from r2m_ray.eval.rl_report import WINDOW, band_on_grid, curve_stats, kl_curves, mean_ci, paired_cell, paired_difference
from r2m_ray.rl_checkpoint import config_differences
from r2m_ray.rundir import RunDir

log = logging.getLogger(__name__)
# what a seed's world, SFT policy and reward models depend on (an RL arm's rl.* keys do not)
PREP_KEYS = ("seed", "world.", "model.", "policy_model.", "data.", "sft.")
# a peak "inside the run": the smoothed gold rises and then falls by at least this much; about two
# standard errors of a 15-step mean of 64-sample gold means on the over-optimisation world
PEAK_MARGIN = 0.05


def _reusable(path: Path, cfg: RunConfig, prefixes: tuple[str, ...] = ()) -> bool:
    """True when `path` already holds a run made with `cfg` (compared on the keys under `prefixes`, or
    all keys). A run made with another config is an error: it is never silently reused or overwritten."""
    saved = path / "config.yaml"
    if not saved.is_file():
        return False
    changed = config_differences(yaml.safe_load(saved.read_text()) or {}, cfg)
    changed = [k for k in changed if not prefixes or k.startswith(prefixes)]
    if changed:
        raise ConfigError(
            f"{path} holds a run made with another config ({', '.join(changed[:8])}); use another --run-dir"
        )
    return True


def _finished_rl(path: Path, cfg: RunConfig) -> bool:
    """A finished RL run of `cfg` at `path`; an interrupted one is moved aside (kept) to be run again."""
    if not _reusable(path, cfg):
        return False
    summary = path / "summary.json"
    if summary.is_file() and "seconds" in json.loads(summary.read_text()).get("rl", {}):
        return True
    aside = path.with_name(f"{path.name}.interrupted-{time.strftime('%Y%m%d-%H%M%S')}")
    path.rename(aside)
    log.warning("compare: %s was interrupted; moved to %s and run again", path, aside)
    return False


def rl_history(run_dir: Path) -> list[dict[str, Any]]:
    """The logged RL steps of a run (skipped steps left out)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("stage") == "rl" and "skipped" not in r]


def prepare_seed(spec: Any, seed: int, root: Path) -> tuple[dict[str, Path], Path, dict[str, Path]]:
    """World, SFT policy and the named reward models of one seed (reused when already built)."""
    from r2m_ray.pipelines.full_run import base_model_dir, run_world
    from r2m_ray.pipelines.rm_stage import keep_learners, run_rm_stage
    from r2m_ray.pipelines.sft_stage import run_sft_stage
    from r2m_ray.ray_setup import init_ray

    seeded = [f"{key}={seed}" for key in spec.seed_keys]
    cfg = load_config(spec.base, spec.overrides + seeded)
    built = _reusable(root / f"seed{seed}", cfg, PREP_KEYS)
    run = RunDir.create(cfg, root / f"seed{seed}", "reuse")  # _reusable checked its config
    world = run_world(cfg, run)
    sft_dir = run.path / "checkpoints" / "sft"
    if not (built and (sft_dir / "config.json").is_file()):
        sft_dir, _ = run_sft_stage(cfg, run, base_model_dir(cfg), world)
    init_ray(cfg.ray)
    rms: dict[str, Path] = {}
    with keep_learners():  # the seed's RMs train one after another in the same learner ranks
        for name, overrides in spec.reward_models.items():
            rm_cfg = load_config(spec.base, spec.overrides + overrides + seeded)
            built = _reusable(run.path / f"rm-{name}", rm_cfg, (*PREP_KEYS, "rm."))
            rm_run = RunDir.create(rm_cfg, run.path / f"rm-{name}", "reuse")
            ckpt = rm_run.path / "checkpoints" / "rm-0"
            if not (built and "checkpoints" in rm_run.summary):
                rm_world = world if rm_cfg.world == cfg.world else run_world(rm_cfg, rm_run)
                ckpt = Path(run_rm_stage(rm_cfg, rm_run, sft_dir, rm_world)["checkpoints"][0])
            rms[name] = ckpt
            rm_run.close()
    run.close()
    return world, sft_dir, rms


def run_arms(spec: Any, root: Path) -> dict[str, list[dict[str, Any]]]:
    """Every (seed, arm) RL run; returns each arm's per-seed statistics (seed order kept)."""
    from r2m_ray.pipelines.rl_stage import run_rl_stage

    first_rm = next(iter(spec.reward_models))
    results: dict[str, list[dict[str, Any]]] = {arm: [] for arm in spec.variants}
    for seed in spec.seeds:
        world, sft_dir, rms = prepare_seed(spec, seed, root)
        for arm, overrides in spec.variants.items():
            if seed not in spec.arm_seeds.get(arm, spec.seeds):
                continue
            cfg: RunConfig = load_config(
                spec.base, spec.overrides + overrides + [f"{k}={seed}" for k in spec.seed_keys]
            )
            path = root / f"seed{seed}" / arm
            if not _finished_rl(path, cfg):
                sub = RunDir.create(cfg, path, "force")  # not a finished run: whatever is there is kept aside
                run_rl_stage(cfg, sub, sft_dir, rms[spec.arm_reward_model.get(arm, first_rm)], world)
                sub.close()
            results[arm].append(run_record(path, seed, spec.kl_budgets, root))
            atomic_write_text(root / f"{spec.section}.json", json.dumps(results, indent=1, default=float))
            log.info("compare: %s seed %d done", arm, seed)
    return results


def run_record(path: Path, seed: int, kl_budgets: list[float], root: Path) -> dict[str, Any]:
    """One run's statistics and the per-step curves the figure needs (its path relative to `root`)."""
    summary = json.loads((path / "summary.json").read_text())["rl"]
    history = rl_history(path)
    last_eval = [h for h in history if h.get("rm_accuracy_feedback") is not None]
    record = {"seed": seed, "path": str(path.relative_to(root)), **curve_stats(history, kl_budgets)}
    record.update(
        win_rate=(summary.get("winrate_vs_start") or {}).get("win_rate"),
        rm_accuracy_feedback=last_eval[-1]["rm_accuracy_feedback"] if last_eval else None,
        rm_accuracy_no_feedback=last_eval[-1]["rm_accuracy_no_feedback"] if last_eval else None,
        late_agreement=float(np.nanmean([h.get("agreement_gold", math.nan) for h in history[-WINDOW:]])),
        late_hacked=float(np.mean([h["hacked_rate"] for h in history[-WINDOW:]])),
        seconds=summary["seconds"],
        startup_seconds=summary.get("startup_seconds", 0.0),
    )
    record["curves"] = {
        key: [c.tolist() for c in kl_curves(history, key)] for key in ("gold_reward", "frozen_rm_reward")
    }
    return record


def _cell(values: list[Any], digits: int = 3) -> str:
    mean, half, n = mean_ci(values)
    if n == 0:
        return "–"
    return f"{mean:.{digits}f} ± {half:.{digits}f}" if n > 1 else f"{mean:.{digits}f}"


COLUMNS = [  # (header, record key, digits)
    ("peak gold", "peak_gold", 3),
    ("step at peak", "peak_step", 0),
    ("seq KL at peak", "kl_at_peak", 2),
    ("late gold", "late_gold", 3),
    ("win rate vs SFT", "win_rate", 3),
    ("area frozen RM–gold", "area_frozen_rm_gold", 2),
    ("late agreement", "late_agreement", 2),
    ("late hacked", "late_hacked", 2),
    ("RM acc (feedback)", "rm_accuracy_feedback", 3),
    ("step-loop s", "seconds", 1),  # wall time of the RL steps (actor start-up apart)
]
PAIRED = [
    ("peak gold", "peak_gold", 3),
    ("seq KL at peak", "kl_at_peak", 2),
    ("late gold", "late_gold", 3),
    ("win rate vs SFT", "win_rate", 3),
    ("step-loop s", "seconds", 1),
]


def tables(spec: Any, results: dict[str, list[dict[str, Any]]]) -> str:
    """The markdown of the comparison: arms × statistics, gold at KL budgets, paired differences."""
    arms = list(results)
    budgets = [f"gold_at_kl_{b:g}" for b in spec.kl_budgets]
    head = "| arm | " + " | ".join(h for h, _, _ in COLUMNS) + " | seeds |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    for arm in arms:
        cells = [_cell([r[k] for r in results[arm]], d) for _, k, d in COLUMNS]
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {len(results[arm])} |")
    lines += [
        "",
        "| arm | " + " | ".join(f"gold at seq KL {b:g}" for b in spec.kl_budgets) + " | rise | fall |",
        "|" + "---|" * (len(budgets) + 3),
    ]
    for arm in arms:
        cells = [_cell([r[k] for r in results[arm]]) for k in [*budgets, "rise", "fall"]]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    ref = spec.reference or arms[0]
    lines += [
        "",
        f"Paired difference to `{ref}` (same seed): mean ± 95% interval (smallest difference the seeds "
        "could detect at power 0.8)",
        "",
        "| arm | " + " | ".join(h for h, _, _ in PAIRED) + " |",
        "|" + "---|" * (len(PAIRED) + 1),
    ]
    for arm in arms:
        if arm == ref:
            continue
        cells = []
        ref_by_seed = {r["seed"]: r for r in results[ref]}
        paired = [(r, ref_by_seed[r["seed"]]) for r in results[arm] if r["seed"] in ref_by_seed]
        for _, key, d in PAIRED:
            diff = paired_difference([a[key] for a, _ in paired], [b[key] for _, b in paired])
            cells.append(paired_cell(diff, d))
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines.append("")
    for arm in arms:
        runs = sorted(results[arm], key=lambda r: r["seed"])
        inside = sum(r["rise"] > 0 and r["fall"] > 0 for r in runs)
        clear = sum(r["rise"] >= PEAK_MARGIN and r["fall"] >= PEAK_MARGIN for r in runs)
        per_seed = ", ".join(f"{r['seed']}: +{r['rise']:.3f}/−{r['fall']:.3f} @{r['peak_step']}" for r in runs)
        lines.append(
            f"- `{arm}`: smoothed gold peaks strictly inside the run in {inside} of {len(runs)} seeds, "
            f"rising and falling by ≥ {PEAK_MARGIN} in {clear}; per seed rise/fall @ peak step: {per_seed}."
        )
    return "\n".join(lines)


def figure(spec: Any, results: dict[str, list[dict[str, Any]]], path: Path) -> Path:
    """Gold and the frozen RM's reward against √(sequence KL), mean ± sd band over seeds, per arm."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    # tab20 holds 10 dark/light pairs: the dark ones first, then the light ones (more arms than 10)
    colors = [*plt.get_cmap("tab20").colors[0::2], *plt.get_cmap("tab20").colors[1::2]]
    for i, (arm, runs) in enumerate(results.items()):
        for ax, key in zip(axes, ("gold_reward", "frozen_rm_reward")):
            curves = [tuple(np.asarray(c) for c in r["curves"][key]) for r in runs]
            grid, mean, sd = band_on_grid(curves)
            color = colors[i % len(colors)]
            ax.plot(grid, mean, label=arm, color=color)
            ax.fill_between(grid, mean - sd, mean + sd, color=color, alpha=0.15)
    for ax, title in zip(axes, ("gold reward", "the arm's frozen RM reward")):
        ax.set_xlabel("√(sequence KL to the SFT policy)")
        ax.set_title(f"{title} (mean ± sd over seeds)")
    axes[0].legend(fontsize=7)
    return save_figure(fig, path)


def run_rl_compare(spec: Any, root: RunDir, command: str, report_only: bool = False) -> dict[str, Any]:
    """Run (or, with report_only, only re-read) every arm and seed; write tables and figure."""
    from r2m_ray.pipelines.compare import write_section

    t0 = time.perf_counter()
    if report_only:
        saved = json.loads((root.path / f"{spec.section}.json").read_text())
        results = {
            arm: [run_record(root.path / r["path"], r["seed"], spec.kl_budgets, root.path) for r in runs]
            for arm, runs in saved.items()
        }
    else:
        results = run_arms(spec, root.path)
    minutes = (time.perf_counter() - t0) / 60
    figures = Path(spec.figures)
    fig_path = figure(spec, results, figures / f"{spec.section}_gold_vs_kl.png")
    table = tables(spec, results)
    seconds = sum(r["seconds"] for runs in results.values() for r in runs)
    startup = sum(r["startup_seconds"] for runs in results.values() for r in runs)
    body = (
        f"Command: `{command}` ({len(spec.seeds)} paired seeds × {len(results)} arms"
        + (
            f", {', '.join(spec.arm_seeds)} on seeds {sorted({s for v in spec.arm_seeds.values() for s in v})}"
            if spec.arm_seeds
            else ""
        )
        + "; "
        + (f"{minutes:.0f} min wall on this machine in this invocation, " if not report_only else "")
        + f"{seconds / 60:.0f} min of RL step loops and {startup / 60:.0f} min of RL actor start-up; "
        f"run dir `{root.path}`). Curves smoothed over 15 steps; "
        f"KL = the sampling policy's sequence KL to the SFT policy. Figure: "
        f"[{fig_path.name}]({os.path.relpath(fig_path, Path(spec.output).parent)}).\n\n" + table
    )
    write_section(Path(spec.output), spec.section, body)
    root.update_summary(None, {"table": table, "minutes": minutes})
    return {"rows": results, "table": table}
