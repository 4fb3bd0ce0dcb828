"""Prompt-free / prompt-related reward decomposition and prioritisation (Mao et al., NeurIPS 2025).

The reward splits as r(x, y) = r1(x, y) + r2(y): r2 is prompt-free (the same for
every prompt), r1 prompt-related. The paper's exact estimator is not public; this
is OUR RECONSTRUCTION (ALGORITHMS.md §2):

- For a pair (y_c, y_r) take M prompts x_1..x_M (its own prompt plus others) and
  d_i = r(x_i, y_c) − r(x_i, y_r).
- Prompt-free gap Δr2 = the c solving Σ_i w_i σ(d_i − c) = ½, Σ_i w_i = 1.
  The left side is strictly decreasing in c, ≥ ½ at c = min d and ≤ ½ at c = max d,
  so the root lies in [min_i d_i, max_i d_i] and bisection on that bracket converges.
  If d_i − Δr2 (the prompt-related part of the gap) is symmetric about 0 across
  prompts, E σ(d_i − Δr2) = ½, so the root recovers the planted r2 gap.
- Prompt-related gap Δr1 = d_own − Δr2.
- Importance weights w_i ∝ P(x_i | y_c, y_r) ∝ π_ref(y_c|x_i)·π_ref(y_r|x_i) (Bayes with
  a uniform prompt prior), i.e. w = softmax_i(log π_ref(y_c|x_i) + log π_ref(y_r|x_i)).
- Priority p_k = N · softmax_k(−Δr2_k / τ) over a batch of N pairs (mean 1): pairs whose
  chosen response is NOT already preferred regardless of the prompt get more weight,
  either as BT loss weights (``reweight``) or as sampling probabilities (``resample``).
  OUR OPTION ``normalize="batch_std"``: p_k = N · softmax_k(−Δr2_k / (s·τ)), s the batch's
  standard deviation of Δr2, so the sharpness no longer grows with the reward scale as the
  model trains (the paper does not say how Δr2 is scaled before τ).
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

logger = logging.getLogger(__name__)


def _normalised_weights(d: Tensor, weights: Tensor | None) -> Tensor:
    """Per-row normalised weights [N, M] in float64 (uniform when ``weights`` is None)."""
    if weights is None:
        return torch.full_like(d, 1.0 / d.shape[1])
    if weights.shape != d.shape:
        raise ValueError(f"weights shape {tuple(weights.shape)} does not match d shape {tuple(d.shape)}")
    w = weights.detach().to(torch.float64)
    if not torch.isfinite(w).all() or (w < 0).any():
        raise ValueError("weights must be finite and non-negative")
    row_sum = w.sum(dim=1, keepdim=True)
    if (row_sum <= 0).any():
        bad = int((row_sum.squeeze(1) <= 0).nonzero()[0])
        raise ValueError(f"weights row {bad} sums to zero: no prompt would inform that pair's gap")
    return w / row_sum


@torch.no_grad()
def prompt_free_gap(d: Tensor, weights: Tensor | None = None, tol: float = 1e-4, max_iter: int = 100) -> Tensor:
    """Prompt-free gap Δr2 [N]: per row, the c with Σ_i w_i σ(d_i − c) = ½ (w normalised per row).

    ``d`` [N, M] holds d_i = r(x_i, y_c) − r(x_i, y_r) for N pairs over M prompts. Solved by
    vectorised bisection on the provably safe bracket [min_i d_i, max_i d_i] (see the module
    docstring) in float64 until every bracket is narrower than ``tol`` (so |ĉ − c*| ≤ tol/2).
    The estimate is a constant: no gradient flows through it. Returned in ``d``'s dtype.
    """
    if d.dim() != 2 or d.shape[0] == 0 or d.shape[1] == 0:
        raise ValueError(f"d must be a non-empty [N, M] tensor, got shape {tuple(d.shape)}")
    if not torch.isfinite(d).all():
        raise ValueError("d contains NaN or inf reward gaps")
    if tol <= 0:
        raise ValueError(f"tol must be positive, got {tol}")
    d64 = d.detach().to(torch.float64)
    w = _normalised_weights(d64, weights)
    lo = d64.min(dim=1).values
    hi = d64.max(dim=1).values
    for _ in range(max_iter):
        if bool(((hi - lo) <= tol).all()):
            break
        mid = 0.5 * (lo + hi)
        excess = (w * torch.sigmoid(d64 - mid.unsqueeze(1))).sum(dim=1) - 0.5
        # excess > 0 means σ-mass still above ½: the root lies to the right of mid.
        go_right = excess > 0
        lo = torch.where(go_right, mid, lo)
        hi = torch.where(go_right, hi, mid)
    else:
        unconverged = int(((hi - lo) > tol).sum())
        if unconverged:
            logger.warning(
                "prompt_free_gap: %d of %d rows not within tol=%g after %d iterations",
                unconverged,
                d.shape[0],
                tol,
                max_iter,
            )
    return (0.5 * (lo + hi)).to(d.dtype)


def prompt_related_gap(d_own: Tensor, delta_r2: Tensor) -> Tensor:
    """Prompt-related gap Δr1 = d_own − Δr2, with d_own = r(x_own, y_c) − r(x_own, y_r)."""
    if d_own.shape != delta_r2.shape:
        raise ValueError(f"d_own shape {tuple(d_own.shape)} does not match delta_r2 shape {tuple(delta_r2.shape)}")
    return d_own - delta_r2


def importance_weights(logp_c: Tensor, logp_r: Tensor) -> Tensor:
    """Importance weights w_i ∝ P(x_i | y_c, y_r) ∝ exp(log π_ref(y_c|x_i) + log π_ref(y_r|x_i)).

    ``logp_c``, ``logp_r`` [N, M] are reference-policy sequence log-likelihoods of the
    pair's responses under each of the M prompts. Bayes with a uniform prompt prior;
    w = exp(s − logsumexp(s)) computed as a max-shifted softmax in float64, so rows sum to 1
    even for log-likelihoods in the −1000s (where float32 logsumexp loses ~1e-4 relative).
    """
    if logp_c.dim() != 2 or logp_r.shape != logp_c.shape:
        raise ValueError(
            f"logp_c and logp_r must be equal [N, M] tensors, got {tuple(logp_c.shape)} and {tuple(logp_r.shape)}"
        )
    if torch.isnan(logp_c).any() or torch.isnan(logp_r).any():
        raise ValueError("logp_c / logp_r contain NaN")
    joint = logp_c.to(torch.float64) + logp_r.to(torch.float64)
    if not torch.isfinite(torch.logsumexp(joint, dim=1)).all():
        raise ValueError("a row of logp_c + logp_r has no finite entry (all prompts impossible) or is +inf")
    return torch.softmax(joint, dim=1).to(logp_c.dtype)


def priorities(delta_r2: Tensor, tau: float = 1.0, normalize: str = "none") -> Tensor:
    """Per-pair priorities p = N · softmax(−Δr2 / τ) over the batch [N] (mean 1; small gap → high priority).

    ``normalize="batch_std"`` divides Δr2 by its batch standard deviation first (a batch whose gaps
    all tie, or a batch of one pair, gets uniform priorities)."""
    if delta_r2.dim() != 1 or delta_r2.numel() == 0:
        raise ValueError(f"delta_r2 must be a non-empty 1-D [N] tensor, got shape {tuple(delta_r2.shape)}")
    if tau <= 0:
        raise ValueError(f"tau must be positive, got {tau}")
    if normalize == "batch_std":
        if delta_r2.numel() < 2:
            return torch.ones_like(delta_r2)
        scale = delta_r2.std()
        if not scale > 1e-12:  # every gap equal: no pair stands out
            return torch.ones_like(delta_r2)
        delta_r2 = delta_r2 / scale
    elif normalize != "none":
        raise ValueError(f"normalize must be 'none' or 'batch_std', got {normalize!r}")
    return delta_r2.numel() * torch.softmax(-delta_r2 / tau, dim=0)


def sample_by_priority(priorities: Tensor, num_samples: int, generator: torch.Generator | None = None) -> Tensor:
    """Indices [num_samples] drawn with replacement with P(k) ∝ priorities_k (torch.multinomial)."""
    if priorities.dim() != 1 or priorities.numel() == 0:
        raise ValueError(f"priorities must be a non-empty 1-D tensor, got shape {tuple(priorities.shape)}")
    if not torch.isfinite(priorities).all() or (priorities < 0).any() or priorities.sum() <= 0:
        raise ValueError("priorities must be finite, non-negative and not all zero")
    if num_samples <= 0:
        raise ValueError(f"num_samples must be positive, got {num_samples}")
    return torch.multinomial(priorities.detach().float(), num_samples, replacement=True, generator=generator)
