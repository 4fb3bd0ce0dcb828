"""DAPO's dynamic sampling (Yu et al. 2025, "DAPO", §3.2): keep only groups that carry a signal.

GRPO's advantage of sample i in group g is (r_i − mean_g) / std_g and RLOO's is r_i − mean of the
others: when every reward of a group ties, every advantage is 0 and the group contributes no policy
gradient (only the KL term). DAPO over-samples and keeps

    0 < |{ i in g : is_equivalent(a_i, answer) }| < G,

i.e. for a scalar reward, a group is kept iff max_i r_i > min_i r_i (its std > 0); the batch is
refilled with new groups until it holds its size. Here a group with a non-finite reward is not
kept either (it has no defined advantage).
"""

from __future__ import annotations

import torch
from torch import Tensor


def informative_groups(rewards: Tensor, group_size: int) -> Tensor:
    """[G] bool from rewards [G·K] grouped K per prompt: True where the rewards are finite and not all tied."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not form groups of {group_size}")
    grouped = rewards.view(-1, group_size)
    finite = torch.isfinite(grouped).all(dim=1)
    spread = grouped.max(dim=1).values > grouped.min(dim=1).values
    return finite & spread
