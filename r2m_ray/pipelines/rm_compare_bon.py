"""Best-of-n gold against the KL bound for every reward model of an RM comparison (spec `bon: true`).

The comparison's SFT policy draws eval.bon.n samples for each of the first eval.bon.prompts world
prompts, once. Every (variant, seed) reward model scores the same samples and picks; the gold
reward of its pick, in expectation over n of the N samples,

    G(n) = E[g(best of n by r)],    KL(π_bon ‖ π_sft) ≤ log n − (n−1)/n,

is its curve: the GRM paper's robustness test (gold reward of best-of-n against KL). An RM that
learned the planted bias picks the biased samples as n grows, and its gold falls. Two controls on
the same samples bound every curve: n = 1 is the policy's mean gold (equal for all RMs), and gold
picking for itself is the ceiling.
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from r2m_ray.config import ConfigError, RunConfig
from r2m_ray.eval.plots import save_figure
from r2m_ray.eval.rl_report import paired_cell, paired_difference
from r2m_ray.pipelines.bon_eval import curves, draw_samples, score
from r2m_ray.pipelines.compare import mean_std

log = logging.getLogger(__name__)


def run_bon(
    cfg: RunConfig, policy_dir: Path, world: dict[str, Path], rows: dict[str, list[dict[str, Any]]]
) -> dict[str, Any]:
    """Sample once, score with every run's RM; adds run["bon"] (its curves) to each row; returns the
    controls and the sample facts."""
    if cfg.data.prompts is not None or "rl_prompts" not in world:
        raise ConfigError("compare with bon: true needs the synthetic world's prompts (its gold reward)")
    s = draw_samples(cfg, policy_dir, world)
    assert s.gold is not None  # world prompts always carry gold
    P, N = s.lengths.shape
    values = {"gold": s.gold, "length": s.lengths}
    tick = time.perf_counter()
    runs = [(name, run) for name, rs in rows.items() for run in rs]
    rewards = iter(score([c for _, run in runs for c in run["checkpoints"]], cfg, s.d_policy, s.msgs, s.texts))
    for name, run in runs:
        # an ensemble picks by its members' mean reward, as rm.ensemble.reduce=mean scores
        members = [next(rewards).double() for _ in run["checkpoints"]]
        proxy = torch.stack(members).mean(0).view(P, N)
        run["bon"] = curves(proxy, values | {"proxy": proxy})
        log.info("bon %s seed %s: gold %s", name, run.get("seed"), [round(g, 3) for g in run["bon"]["gold"]])
    return {
        "prompts": P,
        "samples_per_prompt": N,
        "max_new_tokens": cfg.eval.bon.max_new_tokens,
        "temperature": cfg.eval.bon.temperature,
        "gold_picks": curves(s.gold, values),
        "seconds": s.seconds | {"score": time.perf_counter() - tick},
    }


def bon_table(rows: dict[str, list[dict[str, Any]]], pairing: dict[str, str], bon: dict[str, Any]) -> str:
    """Markdown: gold of each RM's best of n (mean ± std over seeds) at n = 1, 4, N, the n where its
    gold peaks, its pick's length; the controls; then paired differences to each variant's reference."""
    control = bon["gold_picks"]
    grid = control["n"]
    N = grid[-1]
    i4 = grid.index(4) if 4 in grid else len(grid) // 2
    kl = control["kl_bound"]
    lines = [
        f"Best-of-n on the same {bon['prompts']} world prompts × {bon['samples_per_prompt']} samples of the "
        f"SFT policy (temperature {bon['temperature']}, ≤ {bon['max_new_tokens']} new tokens): the gold "
        f"reward of the sample each RM picks, at n = 1, {grid[i4]} and {N} (KL bound {kl[i4]:.2f} and "
        f"{kl[-1]:.2f} nats); peak n: the n of the highest gold (median over seeds); mean ± std over seeds.",
        "",
        f"| picker | gold n=1 | gold n={grid[i4]} | gold n={N} | peak n | tokens n={N} | seeds |",
        "|---|---|---|---|---|---|---|",
        f"| gold picks (ceiling) | {control['gold'][0]:.3f} | {control['gold'][i4]:.3f} | {control['gold'][-1]:.3f} "
        f"| {grid[int(np.argmax(control['gold']))]} | {control['length'][-1]:.1f} | – |",
    ]
    for name, runs in rows.items():
        got = [r["bon"] for r in runs if "bon" in r]
        if not got:
            continue
        peak = statistics.median(grid[int(np.argmax(b["gold"]))] for b in got)
        gold = [mean_std([b["gold"][i] for b in got], 1.0, 3) for i in (0, i4, -1)]
        lines.append(
            f"| {name} | {' | '.join(gold)} | {peak:g} | "
            f"{statistics.fmean(b['length'][-1] for b in got):.1f} | {len(got)} |"
        )
    others = [n for n in rows if pairing.get(n, n) != n and any("bon" in r for r in rows[n])]
    if not others:
        return "\n".join(lines)
    lines += [
        "",
        "Best-of-n gold, paired difference to the variant's reference (same seed): mean ± 95% interval "
        "(smallest difference the seeds could detect at power 0.8), in gold-reward units",
        "",
        f"| picker | vs | gold n={grid[i4]} | gold n={N} |",
        "|---|---|---|---|",
    ]
    for name in others:
        ref = pairing[name]
        by_seed = {r["seed"]: r["bon"] for r in rows[ref] if "bon" in r}
        pairs = [(r["bon"], by_seed[r["seed"]]) for r in rows[name] if "bon" in r and r.get("seed") in by_seed]
        cells = [
            paired_cell(paired_difference([a["gold"][i] for a, _ in pairs], [b["gold"][i] for _, b in pairs]), 3)
            for i in (i4, -1)
        ]
        lines.append(f"| {name} | {ref} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bon_figure(rows: dict[str, list[dict[str, Any]]], bon: dict[str, Any], path: Path) -> Path:
    """Gold of the best of n against the KL bound: each variant's mean over seeds (± 1 sd band)."""
    import matplotlib.pyplot as plt  # after eval.plots chose the Agg backend

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    control = bon["gold_picks"]
    kl = np.array(control["kl_bound"])
    ax.plot(kl, control["gold"], "k--", marker="o", label="gold picks (ceiling)")
    for name, runs in rows.items():
        ys = np.array([r["bon"]["gold"] for r in runs if "bon" in r])
        if len(ys):
            (line,) = ax.plot(kl, ys.mean(0), marker=".", label=name)
            ax.fill_between(kl, ys.mean(0) - ys.std(0), ys.mean(0) + ys.std(0), color=line.get_color(), alpha=0.12)
    ax.set_xlabel("KL bound log n − (n−1)/n (nats)")
    ax.set_ylabel("gold reward of the best of n")
    ax.legend(fontsize=6, ncol=2)
    return save_figure(fig, path)
