"""Per-step RL measurements on the samples the policy optimised (pure torch, no Ray).

- Sequence KL of the sampling policy π to the reference, from the experience pass:
      KL_seq = mean_b Σ_t m_bt · k(t),   k3(t) = e^u − u − 1,  k1(t) = −u,  u = log π_ref − log π
  (per-token estimates summed over the response: the chain rule makes the sum an unbiased
  estimate of KL(π(·|x) ‖ π_ref(·|x)) for samples y ~ π; k3 is never negative).
- On-policy order agreement of a reward with gold within each prompt's group of K samples:
      A = Σ_g Σ_{i<j, g_i≠g_j} [ 1{sign(r_i−r_j) = sign(g_i−g_j)} + ½·1{r_i = r_j} ] / #pairs
  pairs that tie in gold carry no order and are left out.
- Reward-hacked samples: the proxy scores y above every gold-optimal response of its prompt
  while gold scores y below them ("proxy up, gold down", world.optimal_responses).
- GREBT label accuracy: over the groups the head trains on, the share whose winner is gold-better
  than its loser (ties ½) — how good the self-labels are; 1 by construction for oracle labels.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from r2m_ray.algos.policy_loss import kl_penalty


def sequence_kl(logp: Tensor, ref_logp: Tensor, response_mask: Tensor, estimator: str = "k3") -> float:
    """Mean over sequences of the summed per-token KL estimate (``estimator`` k1 or k3); [B, T] inputs."""
    if logp.shape != response_mask.shape:
        raise ValueError(f"response_mask {tuple(response_mask.shape)} does not match logp {tuple(logp.shape)}")
    per_token = kl_penalty(logp.double(), ref_logp.double(), estimator)  # type: ignore[arg-type]
    mask = response_mask != 0
    return float(torch.where(mask, per_token, torch.zeros_like(per_token)).sum(dim=1).mean())


def group_order_agreement(reward: Tensor, gold: Tensor) -> float:
    """Share of within-group sample pairs a reward orders as gold does (reward ties ½); [G, K] inputs.

    NaN when no pair in any group differs in gold (nothing to agree on).
    """
    if reward.shape != gold.shape or reward.dim() != 2:
        raise ValueError(f"reward {tuple(reward.shape)} and gold {tuple(gold.shape)} must both be [G, K]")
    i, j = torch.triu_indices(reward.shape[1], reward.shape[1], offset=1)
    dr = reward[:, i] - reward[:, j]
    dg = gold[:, i] - gold[:, j]
    ordered = dg != 0
    if not ordered.any():
        return math.nan
    score = (torch.sign(dr) == torch.sign(dg)).double() + 0.5 * (dr == 0).double()
    return float(score[ordered].mean())


def hacked_mask(proxy: Tensor, proxy_optimal: Tensor, gold: Tensor, gold_optimal: float = 1.0) -> Tensor:
    """[B] bool: proxy(y) > proxy of the best gold-optimal response and gold(y) < the optimal gold.

    ``proxy_optimal`` [B] is, per sample, the highest proxy reward among its prompt's gold-optimal
    responses.
    """
    if not (proxy.shape == proxy_optimal.shape == gold.shape):
        raise ValueError(f"shapes differ: {tuple(proxy.shape)}, {tuple(proxy_optimal.shape)}, {tuple(gold.shape)}")
    return (proxy > proxy_optimal) & (gold < gold_optimal - 1e-9)


def label_accuracy(gold: Tensor, winner: Tensor, loser: Tensor, keep: Tensor | None = None) -> float:
    """Share of the (kept) groups whose winner beats its loser in gold, ties ½; gold [G, K], the rest [G].

    NaN when no group is kept.
    """
    rows = torch.arange(gold.shape[0])
    g_w, g_l = gold[rows, winner.long()], gold[rows, loser.long()]
    score = (g_w > g_l).double() + 0.5 * (g_w == g_l).double()
    if keep is not None:
        score = score[keep.bool()]
    return float(score.mean()) if score.numel() else math.nan
