"""Policy-feedback similarity: do the policy's hidden states tell good responses from reward-hacked ones?

The R2M paper motivates policy feedback by how the policy's hidden states of responses relate
to reward quality. Our reconstruction of that analysis (docs/algorithms.md):

- pooled response state per layer:  s_i = mean_{t ∈ response(i)} h_{i,t}
- cosine similarity:                c_ij = s_i·s_j / (‖s_i‖ ‖s_j‖)
- within vs across: in each prompt's group of samples, label a sample gold-better when its gold
  is above the group's mean (groups whose gold all ties are left out); mean c_ij over
  pairs with the same label vs pairs with different labels
- similarity vs reward gap: the Pearson correlation, over within-group pairs, of c_ij with |r_i − r_j|
- prototype detector of reward hacking: from calibration states labelled hacked / clean,
      μ_h = mean of the unit-normalised hacked states u = s/‖s‖, μ_c = the same for clean ones,
      score(s) = u·(μ_h − μ_c) − (‖μ_h‖² − ‖μ_c‖²)/2,   flagged when score > 0
  i.e. u is nearer to the hacked prototype than to the clean one (u·μ is a cosine-weighted similarity)
  precision = TP / (TP + FP), recall = TP / (TP + FN) against the world's gold-based labels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def pooled_states(hidden: Tensor, response_mask: Tensor) -> Tensor:
    """Mean of hidden [B, S, D] over each row's response tokens (response_mask [B, S]) → [B, D] float32."""
    if hidden.dim() != 3 or response_mask.shape != hidden.shape[:2]:
        raise ValueError(f"hidden {tuple(hidden.shape)} must be [B, S, D] with response_mask [B, S]")
    m = (response_mask != 0).float().unsqueeze(-1)
    counts = m.sum(1)
    if (counts == 0).any():
        raise ValueError(f"rows {(counts.squeeze(-1) == 0).nonzero().flatten().tolist()} have no response token")
    return (hidden.float() * m).sum(1) / counts


def cosine_matrix(x: Tensor) -> Tensor:
    """[B, B] cosine similarities of the rows of x [B, D]."""
    unit = F.normalize(x.float(), dim=-1)
    return unit @ unit.T


def _group_pairs(groups: Tensor) -> tuple[Tensor, Tensor]:
    """Index pairs (i < j) of rows in the same group."""
    i, j = torch.triu_indices(len(groups), len(groups), offset=1)
    same = groups[i] == groups[j]
    return i[same], j[same]


def better_labels(gold: Tensor, groups: Tensor) -> tuple[Tensor, Tensor]:
    """(gold-better [B] bool: gold above its group's mean, usable [B] bool: the group's gold is not all tied)."""
    better = torch.zeros_like(gold, dtype=torch.bool)
    usable = torch.zeros_like(gold, dtype=torch.bool)
    for g in groups.unique():
        rows = groups == g
        values = gold[rows]
        if values.max() > values.min():
            better[rows] = values > values.mean()
            usable[rows] = True
    return better, usable


def within_across(pooled: Tensor, better: Tensor, groups: Tensor, usable: Tensor | None = None) -> dict[str, float]:
    """Mean cosine of within-group pairs with the same gold label vs with different labels."""
    sim = cosine_matrix(pooled)
    i, j = _group_pairs(groups)
    if usable is not None:
        keep = usable[i] & usable[j]
        i, j = i[keep], j[keep]
    same = better[i] == better[j]
    within = sim[i[same], j[same]]
    across = sim[i[~same], j[~same]]
    mean = lambda x: float(x.mean()) if x.numel() else math.nan  # noqa: E731
    return {"within": mean(within), "across": mean(across), "gap": mean(within) - mean(across)}


def similarity_gap_correlation(pooled: Tensor, reward: Tensor, groups: Tensor) -> float:
    """Pearson correlation, over within-group pairs, of the pair's cosine with its |reward gap|."""
    sim = cosine_matrix(pooled)
    i, j = _group_pairs(groups)
    if len(i) < 3:
        return math.nan
    x, y = sim[i, j].double(), (reward[i] - reward[j]).abs().double()
    if x.std() == 0 or y.std() == 0:
        return math.nan
    return float(torch.corrcoef(torch.stack([x, y]))[0, 1])


class PrototypeDetector:
    """Flags a response whose pooled policy state is closer to the hacked prototype than to the clean one."""

    def __init__(self, hacked: Tensor, clean: Tensor) -> None:
        self.hacked, self.clean = hacked, clean

    @classmethod
    def fit(cls, pooled: Tensor, is_hacked: Tensor) -> PrototypeDetector:
        """Prototypes from calibration states [N, D] and labels [N] (both kinds must be present)."""
        is_hacked = is_hacked.bool()
        if not is_hacked.any() or is_hacked.all():
            raise ValueError(
                f"detector calibration needs hacked and clean examples, got {int(is_hacked.sum())} of "
                f"{len(is_hacked)} hacked"
            )
        unit = F.normalize(pooled.float(), dim=-1)
        return cls(unit[is_hacked].mean(0), unit[~is_hacked].mean(0))

    def scores(self, pooled: Tensor) -> Tensor:
        """u·(μ_h − μ_c) − (‖μ_h‖² − ‖μ_c‖²)/2 per row of pooled [B, D] (> 0: nearer the hacked prototype)."""
        unit = F.normalize(pooled.float(), dim=-1)
        return unit @ (self.hacked - self.clean) - 0.5 * (self.hacked.pow(2).sum() - self.clean.pow(2).sum())

    def flags(self, pooled: Tensor) -> Tensor:
        """[B] bool: flagged as reward-hacked."""
        return self.scores(pooled) > 0


def precision_recall(flags: Tensor, truth: Tensor) -> dict[str, float]:
    """Precision and recall of boolean flags against boolean truth (NaN where undefined)."""
    flags, truth = flags.bool(), truth.bool()
    tp = float((flags & truth).sum())
    precision = tp / float(flags.sum()) if flags.any() else math.nan
    recall = tp / float(truth.sum()) if truth.any() else math.nan
    return {
        "precision": precision,
        "recall": recall,
        "flag_rate": float(flags.float().mean()),
        "base_rate": float(truth.float().mean()),
    }
