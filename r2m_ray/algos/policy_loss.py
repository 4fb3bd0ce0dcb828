"""Policy optimisation: group advantages, KL estimators and the clipped policy-gradient loss (ALGORITHMS.md §4).

- RLOO advantage:  A_j = r_j − mean_{k≠j} r_k = K/(K−1)·(r_j − mean r)
- GRPO advantage:  A_j = (r_j − mean r) / (std r + ε), std the POPULATION std (divide by K)
- KL estimators per token, with log-ratio u = log π_ref − log π (samples from π):
      k1 = −u = log π − log π_ref,     k3 = e^u − u − 1  (≥ 0, unbiased for KL(π‖π_ref))
- Clipped objective per real token, ρ = exp(log π − log π_old), A the sequence's advantage:
      l_t = −min(ρ_t A, clip(ρ_t, 1−ε, 1+ε) A)
  averaged over all real tokens of the batch (token mean) or per sequence then over
  sequences (sequence mean), plus β_KL · (the same average of the per-token KL).
- Async rollout (samples drawn by the sampler of the previous weights, μ = π_{t−1,τ}): each
  token's clipped term is multiplied by the truncated behaviour weight
      w_t = min(π_{t,τ}(y_t) / μ(y_t), C)        (π_{t,τ}: the current weights at the sampling temperature τ)
  so the gradient estimates the synchronous loop's, whose samples come from π_{t,τ}; the clip
  ratio ρ stays relative to π_old = π_t (the decoupled objective of AReaL, Fu et al. 2025,
  with the truncation of TIS, Yao et al. 2025). w is a constant (no gradient).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Σ m·x / Σ m over ``dim`` (all elements when None); masked-out entries never contribute, even NaN.

    Raises ValueError when a reduced slice has no real (non-zero mask) entry.
    """
    if mask.shape != x.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match x shape {tuple(x.shape)}")
    m = mask.to(x.dtype)
    values = torch.where(m != 0, x, torch.zeros_like(x)) * m
    if dim is None:
        denom = m.sum()
        if denom == 0:
            raise ValueError("mask has no real entry: the masked mean is undefined")
        return values.sum() / denom
    denom = m.sum(dim=dim)
    if (denom == 0).any():
        raise ValueError(f"mask has a slice along dim {dim} with no real entry (e.g. an empty sequence)")
    return values.sum(dim=dim) / denom


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Per-position entropy H = −Σ_v p_v log p_v, p = softmax(logits), of logits [B, T, V] → [B, T].

    Computed in float32 or wider; −inf logits (masked vocabulary entries) count as p = 0 and
    give finite values and gradients rather than 0·(−inf) = NaN.
    """
    z = logits if logits.dtype == torch.float64 else logits.float()
    log_p = torch.log_softmax(z, dim=-1)
    probs = log_p.exp()
    # Replace log p before the product: a where() after it would still leak NaN into the backward.
    safe_log_p = torch.where(probs > 0, log_p, torch.zeros_like(log_p))
    return -(probs * safe_log_p).sum(dim=-1)


def _check_groups(r: Tensor) -> None:
    """Raise a ValueError unless r is a [G, K] reward tensor with K >= 2."""
    if r.dim() != 2 or r.shape[1] < 2:
        raise ValueError(f"rewards must be [G, K] with group size K >= 2, got shape {tuple(r.shape)}")


def rloo_advantages(r: Tensor) -> Tensor:
    """RLOO advantages [G, K]: A_j = r_j − mean_{k≠j} r_k (leave-one-out baseline within each group)."""
    _check_groups(r)
    k = r.shape[1]
    return r - (r.sum(dim=1, keepdim=True) - r) / (k - 1)


def grpo_advantages(r: Tensor, eps: float = 1e-6) -> Tensor:
    """GRPO advantages [G, K]: A_j = (r_j − mean r)/(std r + ε), std the population std (÷K)."""
    _check_groups(r)
    centred = r - r.mean(dim=1, keepdim=True)
    return centred / (r.std(dim=1, keepdim=True, unbiased=False) + eps)


def kl_penalty(logp: Tensor, ref_logp: Tensor, kind: Literal["k1", "k3"] = "k1") -> Tensor:
    """Per-token KL estimate: k1 = logp − ref_logp; k3 = exp(ref_logp − logp) − (ref_logp − logp) − 1."""
    if logp.shape != ref_logp.shape:
        raise ValueError(f"ref_logp shape {tuple(ref_logp.shape)} does not match logp shape {tuple(logp.shape)}")
    if kind == "k1":
        return logp - ref_logp
    if kind == "k3":
        log_ratio = ref_logp - logp
        return torch.exp(log_ratio) - log_ratio - 1.0
    raise ValueError(f"kind must be 'k1' or 'k3', got {kind!r}")


def behaviour_weights(
    sampler_logp: Tensor, behaviour_logp: Tensor, mask: Tensor, stale: Tensor, cap: float
) -> tuple[Tensor, dict[str, float]]:
    """Per-token w = min(exp(log π_{t,τ} − log μ), C) on the response tokens of stale rows, 1 elsewhere.

    ``sampler_logp`` the current weights' log-probs at the sampling temperature, ``behaviour_logp``
    the ones the engine sampled with, ``mask`` [B, T]; ``stale`` [B] bool, the rows drawn with
    older weights. Stats over the stale rows' tokens: ``behaviour_weight_mean``,
    ``behaviour_weight_capped`` (the share at C), ``behaviour_log_ratio`` (mean log π_{t,τ} − log μ).
    """
    if cap < 1:
        raise ValueError(f"the behaviour weight cap must be >= 1, got {cap}")
    for name, value in (("behaviour_logp", behaviour_logp), ("mask", mask)):
        if value.shape != sampler_logp.shape:
            raise ValueError(
                f"{name} shape {tuple(value.shape)} does not match sampler_logp {tuple(sampler_logp.shape)}"
            )
    if stale.shape != sampler_logp.shape[:1]:
        raise ValueError(f"stale must be [B]=[{sampler_logp.shape[0]}], got shape {tuple(stale.shape)}")
    real = (mask != 0) & stale.unsqueeze(-1)
    log_ratio = torch.where(real, sampler_logp - behaviour_logp, torch.zeros_like(sampler_logp))
    weight = torch.exp(torch.clamp(log_ratio, max=math.log(cap)))
    stats: dict[str, float] = {}
    if real.any():
        stats = {
            "behaviour_weight_mean": float(weight[real].mean()),
            "behaviour_weight_capped": float((log_ratio[real] >= math.log(cap)).float().mean()),
            "behaviour_log_ratio": float(log_ratio[real].mean()),
        }
    return weight, stats


def _reduce(x: Tensor, mask: Tensor, token_mean: bool) -> Tensor:
    """Token mean over the batch, or mean over sequences of each sequence's token mean."""
    if token_mean:
        return masked_mean(x, mask)
    return masked_mean(x, mask, dim=-1).mean()


def clipped_policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
    kl: Tensor | None = None,
    kl_coef: float = 0.0,
    token_mean: bool = True,
    behaviour_weight: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Clipped PPO loss L = mean_t[−w_t·min(ρ_t A, clip(ρ_t, 1−ε, 1+ε) A)] + β_KL · mean_t KL_t.

    ``behaviour_weight`` [B, T]: the async loop's w_t (``behaviour_weights``); None = 1 (on-policy
    samples, the synchronous loop, whose numbers are then exactly those without the argument).

    ``logp``, ``old_logp``, ``mask`` [B, T]; ``advantages`` [B] per sequence, broadcast to its
    tokens; ``kl`` [B, T] a per-token estimate (``kl_penalty``) or None. ``token_mean``: average
    over every real token of the batch (True) or per sequence first (False). Stats (floats):
    ``pg_loss``, ``kl`` (0 if None), ``clip_fraction`` (share of real tokens whose clipped
    term is the active, gradient-free one), ``approx_kl`` (k3 estimate of KL(π_old‖π)),
    ``ratio_mean``.
    """
    if logp.dim() != 2:
        raise ValueError(f"logp must be [B, T], got shape {tuple(logp.shape)}")
    for name, value in (("old_logp", old_logp), ("mask", mask)):
        if value.shape != logp.shape:
            raise ValueError(f"{name} shape {tuple(value.shape)} does not match logp shape {tuple(logp.shape)}")
    if advantages.shape != logp.shape[:1]:
        raise ValueError(
            f"advantages must be [B]=[{logp.shape[0]}] (one per sequence), got shape {tuple(advantages.shape)}"
        )
    if clip_eps <= 0:
        raise ValueError(f"clip_eps must be positive, got {clip_eps}")
    if kl is None and kl_coef != 0.0:
        raise ValueError("kl_coef is non-zero but no per-token kl tensor was given")
    if kl is not None and kl.shape != logp.shape:
        raise ValueError(f"kl shape {tuple(kl.shape)} does not match logp shape {tuple(logp.shape)}")
    if behaviour_weight is not None and behaviour_weight.shape != logp.shape:
        raise ValueError(
            f"behaviour_weight shape {tuple(behaviour_weight.shape)} does not match logp shape {tuple(logp.shape)}"
        )

    old_logp = old_logp.detach()
    adv = advantages.detach().to(logp.dtype).unsqueeze(-1)
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -ratio * adv
    clipped = -torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv
    per_token = torch.maximum(unclipped, clipped)
    if behaviour_weight is not None:
        per_token = per_token * behaviour_weight.detach().to(per_token.dtype)
    pg_loss = _reduce(per_token, mask, token_mean)
    loss = pg_loss
    kl_value = torch.zeros((), dtype=logp.dtype, device=logp.device)
    if kl is not None:
        kl_value = _reduce(kl, mask, token_mean)
        loss = loss + kl_coef * kl_value

    with torch.no_grad():
        stats = {
            "pg_loss": float(pg_loss),
            "kl": float(kl_value),
            "clip_fraction": float(masked_mean((clipped > unclipped).to(logp.dtype), mask)),
            "approx_kl": float(masked_mean(kl_penalty(old_logp, logp.detach(), "k3"), mask)),
            "ratio_mean": float(masked_mean(ratio, mask)),
        }
    return loss, stats


def group_advantages(rewards: Tensor, k: int, algo: str) -> Tensor:
    """Per-sequence advantages [B] from rewards [B] grouped K per prompt (`algo`: grpo or rloo)."""
    grouped = rewards.view(-1, k)
    adv = grpo_advantages(grouped) if algo == "grpo" else rloo_advantages(grouped)
    return adv.reshape(-1)
