"""rl.filter.zero_variance_groups: drop the groups whose rewards all tie and refill the step's batch
(DAPO's dynamic sampling, algos/dynamic_sampling.py), keeping the driver loop's data consistent.

A `Draw` is one generate + annotate of some prompts: the prompts (one dataset row each), their
samples (K consecutive rows per prompt, `prompt_index` into the prompts) and the annotator's
answer. `fill_informative` keeps a first draw's informative groups and asks `draw_more(round, n)`
for new prompts until the batch again holds `n_groups` informative groups, at most `max_rounds`
times; if they run out, the batch keeps its size with the first draw's tied groups (they add only
the KL term) and says how many (`unfilled_groups`). The result is a single Draw in group order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from datasets import Dataset, concatenate_datasets
from torch import Tensor

from r2m_ray.algos.dynamic_sampling import informative_groups

ROW_TENSORS = ("rewards", "frozen_rewards", "rte", "hacking_flags")  # the annotator's per-row answers


@dataclass
class Draw:
    """Prompts, their samples, the annotator's answer and the rewards the policy optimises."""

    rows: Dataset
    samples: dict[str, list]
    ann: dict[str, Any]
    rewards: Tensor


def take_groups(draw: Draw, groups: list[int], k: int) -> Draw:
    """The given groups of a draw, in that order (the prompt of group j becomes row j)."""
    sel = [g * k + j for g in groups for j in range(k)]
    samples = {key: [values[i] for i in sel] for key, values in draw.samples.items()}
    samples["prompt_index"] = [j for j in range(len(groups)) for _ in range(k)]
    rows = draw.rows.select([draw.samples["prompt_index"][g * k] for g in groups])
    ann = dict(draw.ann)
    for key in ROW_TENSORS:
        if ann.get(key) is not None:
            ann[key] = ann[key][sel]
    return Draw(rows, samples, ann, draw.rewards[sel])


def concat_draws(parts: list[Draw]) -> Draw:
    """Draws one after another (prompt indices shifted); scalar answers from the first, counts summed."""
    first = parts[0]
    samples: dict[str, list] = {key: [] for key in first.samples}
    offset = 0
    for part in parts:
        for key, values in part.samples.items():
            samples[key] += [i + offset for i in values] if key == "prompt_index" else values
        offset += len(part.rows)
    ann = dict(first.ann)
    for key in ROW_TENSORS:
        if first.ann.get(key) is not None:
            ann[key] = torch.cat([p.ann[key] for p in parts])
    for key in ("cache_hits", "rte_computed"):
        ann[key] = sum(p.ann.get(key, 0) for p in parts)
    bad = (~torch.isfinite(ann["rewards"])).nonzero().flatten().tolist()
    ann["nonfinite"], ann["nonfinite_rows"] = len(bad), bad[:10]
    rows = concatenate_datasets([p.rows for p in parts])
    return Draw(rows, samples, ann, torch.cat([p.rewards for p in parts]))


def fill_informative(
    first: Draw, k: int, n_groups: int, max_rounds: int, draw_more: Callable[[int, int], Draw]
) -> tuple[Draw, dict[str, int]]:
    """The batch of `n_groups` groups to train on, and what filtering it took (see the module doc)."""
    keep = informative_groups(first.rewards, k)
    parts = [take_groups(first, keep.nonzero().flatten().tolist(), k)]
    have, rounds, drawn, dropped = int(keep.sum()), 0, 0, int((~keep).sum())
    while have < n_groups and rounds < max_rounds:
        rounds += 1
        more = draw_more(rounds, n_groups - have)
        useful = informative_groups(more.rewards, k).nonzero().flatten().tolist()
        drawn += len(more.rows)
        dropped += len(more.rows) - len(useful)
        useful = useful[: n_groups - have]
        parts.append(take_groups(more, useful, k))
        have += len(useful)
    unfilled = n_groups - have
    if unfilled:  # the rounds ran out: keep the batch's size with tied groups (no policy signal)
        parts.append(take_groups(first, (~keep).nonzero().flatten().tolist()[:unfilled], k))
    stats = {
        "tied_groups": int((~keep).sum()),  # of the step's own prompts
        "dropped_groups": dropped - unfilled,  # tied (or non-finite) groups not trained on, refills included
        "refill_rounds": rounds,
        "refill_prompts": drawn,
        "unfilled_groups": unfilled,
    }
    return concat_draws([p for p in parts if len(p.rows)]), stats


def filter_totals(history: list[dict[str, Any]]) -> dict[str, int]:
    """The filter's counts summed over the logged steps (for the stage summary)."""
    totals: dict[str, int] = {}
    for metrics in history:
        for key, value in (metrics.get("filter") or {}).items():
            totals[key] = totals.get(key, 0) + value
    return totals
