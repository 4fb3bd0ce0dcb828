"""Bradley-Terry reward-model losses and their baselines.

For a preference pair (x, y_c, y_r) with scalar rewards r_c = r(x, y_c) and
r_r = r(x, y_r), Δ = r_c − r_r:

- Bradley-Terry (BT):    l = −log σ(Δ)
- margin:                l = −log σ(Δ − m)
- label smoothing ε:     l = −(1−ε)·log σ(Δ) − ε·log σ(−Δ)
- batch loss:            L = Σ_k w_k l_k / Σ_k w_k   (w ≡ 1 gives the plain mean)

The optional per-pair weights w are the prompt-free prioritiser's (see
``decomposition.priorities``). ``pairwise_accuracy`` is the fraction of pairs
with r_c > r_r (ties count ½); ``ensemble_reduce`` combines the rewards of an
ensemble of reward models (mean or pessimistic min), as in the GRM baselines
(ALGORITHMS.md §1).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor


def _check_pair(r_c: Tensor, r_r: Tensor) -> None:
    """Raise a ValueError naming the field if the per-pair rewards are not two equal [B] tensors."""
    if r_c.dim() != 1:
        raise ValueError(f"r_c must be a 1-D [B] tensor of per-pair rewards, got shape {tuple(r_c.shape)}")
    if r_r.shape != r_c.shape:
        raise ValueError(f"r_r shape {tuple(r_r.shape)} does not match r_c shape {tuple(r_c.shape)}")
    if r_c.numel() == 0:
        raise ValueError("r_c is empty: a reward loss needs at least one pair")


def weighted_mean(losses: Tensor, weights: Tensor | None = None) -> Tensor:
    """Weighted mean Σ w·l / Σ w of per-item losses [B]; the plain mean when ``weights`` is None.

    Weights must be a finite, non-negative [B] tensor with a positive sum; they are
    treated as constants (no gradient flows into them).
    """
    if weights is None:
        return losses.mean()
    if weights.shape != losses.shape:
        raise ValueError(f"weights shape {tuple(weights.shape)} does not match losses shape {tuple(losses.shape)}")
    w = weights.detach().to(losses.dtype)
    if not torch.isfinite(w).all() or (w < 0).any():
        raise ValueError("weights must be finite and non-negative")
    total = w.sum()
    if total <= 0:
        raise ValueError("weights sum to zero: no pair would contribute to the loss")
    return (w * losses).sum() / total


def bt_loss(r_c: Tensor, r_r: Tensor, weights: Tensor | None = None) -> Tensor:
    """Bradley-Terry loss L = −Σ w_k log σ(r_c,k − r_r,k) / Σ w_k (plain mean when weights is None)."""
    _check_pair(r_c, r_r)
    return weighted_mean(-F.logsigmoid(r_c - r_r), weights)


def margin_loss(r_c: Tensor, r_r: Tensor, margin: Tensor | float, weights: Tensor | None = None) -> Tensor:
    """Margin BT loss L = −Σ w_k log σ(r_c,k − r_r,k − m_k) / Σ w_k; ``margin`` is a float or a [B] tensor."""
    _check_pair(r_c, r_r)
    if isinstance(margin, Tensor) and margin.dim() > 0 and margin.shape != r_c.shape:
        raise ValueError(f"margin shape {tuple(margin.shape)} does not match r_c shape {tuple(r_c.shape)}")
    return weighted_mean(-F.logsigmoid(r_c - r_r - margin), weights)


def label_smoothing_loss(r_c: Tensor, r_r: Tensor, eps: float = 0.1, weights: Tensor | None = None) -> Tensor:
    """Label-smoothed BT loss L = mean_w[−(1−ε)·log σ(Δ) − ε·log σ(−Δ)], Δ = r_c − r_r."""
    _check_pair(r_c, r_r)
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"eps must be in [0, 1], got {eps}")
    delta = r_c - r_r
    losses = -(1.0 - eps) * F.logsigmoid(delta) - eps * F.logsigmoid(-delta)
    return weighted_mean(losses, weights)


@torch.no_grad()
def pairwise_accuracy(r_c: Tensor, r_r: Tensor) -> float:
    """Fraction of pairs with r_c > r_r; a tie r_c == r_r counts ½ (so a constant model scores 0.5)."""
    _check_pair(r_c, r_r)
    wins = (r_c > r_r).float() + 0.5 * (r_c == r_r).float()
    return float(wins.mean())


def ensemble_reduce(rewards: Tensor, mode: Literal["mean", "min"] = "mean") -> Tensor:
    """Combine an ensemble's rewards [N_models, B] into [B]: mean over models, or the pessimistic min."""
    if rewards.dim() != 2 or rewards.shape[0] == 0:
        raise ValueError(f"rewards must be [N_models, B] with N_models >= 1, got shape {tuple(rewards.shape)}")
    if mode == "mean":
        return rewards.mean(dim=0)
    if mode == "min":
        return rewards.min(dim=0).values
    raise ValueError(f"mode must be 'mean' or 'min', got {mode!r}")
