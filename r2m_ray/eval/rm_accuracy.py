"""Reward-model accuracy on held-out preference pairs, overall and per subset.

`accuracy` is agreement with the dataset's label (chosen > rejected; ties count
half), the number RewardBench and the papers report. Where the data carries a
gold reward (the synthetic world), `gold_accuracy` is agreement with the gold
preference instead, free of label noise.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from datasets import Dataset
from tqdm.auto import tqdm

from r2m_ray.algos.bt import ensemble_reduce
from r2m_ray.data.tokenize import stack_pair_batch


@torch.no_grad()
def score_pairs(
    models: list[torch.nn.Module],
    ds: Dataset,
    collate: Callable[[list[dict]], dict[str, torch.Tensor]],
    batch_size: int = 64,
    reduce: str = "mean",
    desc: str = "eval",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards of chosen and rejected for every row (ensemble-reduced over models)."""
    for m in models:
        m.eval()
    chosen, rejected = [], []
    for start in tqdm(range(0, len(ds), batch_size), desc=desc, leave=False):
        rows = ds.select(range(start, min(start + batch_size, len(ds))))
        batch = collate(list(rows))
        ids, attn, _ = stack_pair_batch(batch)
        per_model = torch.stack([m(ids, attn).rewards.float() for m in models])
        r = ensemble_reduce(per_model, reduce)
        n = batch["chosen_input_ids"].shape[0]
        chosen.append(r[:n])
        rejected.append(r[n:])
    return torch.cat(chosen), torch.cat(rejected)


def _acc(c: torch.Tensor, r: torch.Tensor) -> float:
    return float(((c > r).float() + 0.5 * (c == r).float()).mean()) if len(c) else math.nan


def accuracy_report(r_c: torch.Tensor, r_r: torch.Tensor, ds: Dataset) -> dict[str, Any]:
    """Accuracy (+ a 95% normal-approximation interval), per subset, and vs gold if present."""
    n = len(r_c)
    acc = _acc(r_c, r_r)
    report: dict[str, Any] = {
        "n": n,
        "accuracy": acc,
        "ci95": 1.96 * math.sqrt(max(acc * (1 - acc), 1e-12) / max(n, 1)),
    }
    if "subset" in ds.column_names:
        groups: dict[str, list[int]] = defaultdict(list)
        for i, s in enumerate(ds["subset"]):
            groups[s or "all"].append(i)
        report["per_subset"] = {
            s: {"n": len(ix), "accuracy": _acc(r_c[ix], r_r[ix])} for s, ix in sorted(groups.items())
        }
    if {"gold_chosen", "gold_rejected"} <= set(ds.column_names):
        g = torch.tensor(ds["gold_chosen"]) - torch.tensor(ds["gold_rejected"])
        prefer_c = g >= 0
        model_c = r_c > r_r
        keep = g != 0
        report["gold_accuracy"] = float((prefer_c[keep] == model_c[keep]).float().mean()) if keep.any() else math.nan
    report["mean_margin"] = float((r_c - r_r).mean()) if n else math.nan
    return report
