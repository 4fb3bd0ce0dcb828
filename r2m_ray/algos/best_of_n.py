"""Best-of-n sampling: the expected value of the response a reward model picks out of n, and its KL.

For one prompt with N samples, sort them by the selecting (proxy) reward, r_(1) ≤ … ≤ r_(N).
Best-of-n draws n of the N without replacement and keeps the one with the largest proxy reward;
the kept sample is the i-th smallest with probability

    P(i) = C(i−1, n−1) / C(N, n),        i = n … N,

so for any per-sample quantity f (proxy reward, a judge's reward, gold reward, length)

    E[f(best of n)] = Σ_i P(i) · f_(i)          (unbiased for every n ≤ N, from one set of N)

(Nakano et al. 2021, WebGPT, App. G; ties in the proxy reward are broken by sample order).
The policy that best-of-n induces is at most

    KL(π_bon ‖ π) ≤ log n − (n−1)/n

nats from the sampling policy (Stiennon et al. 2020; tight up to ties; Beirami et al. 2024).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def selection_weights(N: int, n: int) -> Tensor:
    """P(i) for i = 1..N (1-based rank by ascending proxy reward): float64 [N], sums to 1."""
    if not 1 <= n <= N:
        raise ValueError(f"best-of-n needs 1 <= n <= N, got n={n}, N={N}")
    ranks = torch.arange(1, N + 1, dtype=torch.float64)
    # log C(i−1, n−1) − log C(N, n) through lgamma: exact enough for N in the thousands
    log_c = torch.lgamma(ranks) - torch.lgamma(torch.tensor(float(n))) - torch.lgamma(ranks - n + 1)
    log_total = math.lgamma(N + 1) - math.lgamma(n + 1) - math.lgamma(N - n + 1)
    weights = torch.where(ranks >= n, torch.exp(log_c - log_total), torch.zeros_like(ranks))
    return weights / weights.sum()


def best_of_n_expectation(proxy: Tensor, values: Tensor, n: int) -> Tensor:
    """E[values of the best-of-n sample by `proxy`] per prompt: proxy, values [P, N] → [P] (float64)."""
    if proxy.shape != values.shape or proxy.dim() != 2:
        raise ValueError(f"proxy {tuple(proxy.shape)} and values {tuple(values.shape)} must both be [P, N]")
    if not torch.isfinite(proxy).all():
        raise ValueError("best-of-n: the selecting rewards contain NaN/inf")
    order = torch.sort(proxy.double(), dim=1, stable=True).indices  # ascending
    ranked = torch.gather(values.double(), 1, order)
    return ranked @ selection_weights(proxy.shape[1], n)


def kl_bound(n: int) -> float:
    """log n − (n−1)/n: the KL (nats) of best-of-n from the sampling policy, at most."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return math.log(n) - (n - 1) / n


def n_grid(N: int) -> list[int]:
    """1, 2, 4, … up to N (and N itself when it is not a power of two)."""
    grid, n = [], 1
    while n < N:
        grid.append(n)
        n *= 2
    return grid + [N]
