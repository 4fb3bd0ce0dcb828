"""Best-of-n estimator against brute force over every n-subset, and the KL bound by hand."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from r2m_ray.algos.best_of_n import best_of_n_expectation, kl_bound, n_grid, selection_weights


def brute_force(proxy: torch.Tensor, values: torch.Tensor, n: int) -> torch.Tensor:
    """Average over every n-subset of the value of its proxy-argmax sample."""
    out = []
    for p in range(proxy.shape[0]):
        picks = [
            values[p, max(c, key=lambda k: proxy[p, k])].item()
            for c in itertools.combinations(range(proxy.shape[1]), n)
        ]
        out.append(sum(picks) / len(picks))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7])
def test_expectation_equals_the_average_over_all_subsets(n):
    gen = torch.Generator().manual_seed(n)
    proxy, values = torch.randn(4, 7, generator=gen), torch.randn(4, 7, generator=gen)
    assert torch.allclose(best_of_n_expectation(proxy, values, n), brute_force(proxy, values, n), atol=1e-12)


def test_end_points_and_monotone_proxy():
    proxy = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    assert best_of_n_expectation(proxy, proxy, 1).item() == pytest.approx(1.5)  # the mean
    assert best_of_n_expectation(proxy, proxy, 4).item() == pytest.approx(3.0)  # the max
    # n=2 by hand: 6 pairs, maxima 3,1,2,3,3,2 → 14/6
    assert best_of_n_expectation(proxy, proxy, 2).item() == pytest.approx(14 / 6)
    curve = [best_of_n_expectation(proxy, proxy, n).item() for n in range(1, 5)]
    assert curve == sorted(curve)
    assert selection_weights(4, 2).tolist() == pytest.approx([0, 1 / 6, 2 / 6, 3 / 6])


def test_kl_bound_and_grid():
    assert kl_bound(1) == 0.0
    assert kl_bound(2) == pytest.approx(math.log(2) - 0.5)
    assert kl_bound(16) == pytest.approx(math.log(16) - 15 / 16)
    assert n_grid(16) == [1, 2, 4, 8, 16] and n_grid(12) == [1, 2, 4, 8, 12] and n_grid(1) == [1]
    with pytest.raises(ValueError, match="1 <= n <= N"):
        selection_weights(4, 5)
    with pytest.raises(ValueError, match="NaN"):
        best_of_n_expectation(torch.tensor([[float("nan"), 1.0]]), torch.zeros(1, 2), 1)
