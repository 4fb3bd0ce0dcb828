"""Prompt-free gap estimator (our reconstruction of Mao et al. 2025) and prioritisation."""

import math

import pytest
import torch

from r2m_ray.algos.decomposition import (
    importance_weights,
    priorities,
    prompt_free_gap,
    prompt_related_gap,
    sample_by_priority,
)


def _residual(d: torch.Tensor, c: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_i w_i σ(d_i − c) − ½ per row (uniform w by default)."""
    d64 = d.double()
    w = torch.full_like(d64, 1 / d.shape[1]) if w is None else w.double() / w.double().sum(1, keepdim=True)
    return (w * torch.sigmoid(d64 - c.double().unsqueeze(1))).sum(1) - 0.5


def test_prompt_free_gap_hand_cases():
    d = torch.tensor([[0.0, 2.0], [-1.0, 1.0], [1.0, 1.0], [3.0, 3.0]])
    # symmetric pairs → their midpoint; all-equal rows → that value (zero-width bracket)
    assert prompt_free_gap(d).tolist() == pytest.approx([1.0, 0.0, 1.0, 3.0], abs=1e-4)
    # all weight on prompt 0 → σ(d_0 − c) = ½ → c = d_0
    w = torch.tensor([[1.0, 0.0]] * 4)
    assert prompt_free_gap(d, w).tolist() == pytest.approx([0.0, -1.0, 1.0, 3.0], abs=1e-4)


@pytest.mark.parametrize("tol", [1e-1, 1e-3, 1e-6])
def test_bisection_meets_tolerance(tol):
    gen = torch.Generator().manual_seed(0)
    d = torch.randn(50, 7, generator=gen, dtype=torch.float64) * 3
    w = torch.rand(50, 7, generator=gen, dtype=torch.float64)
    exact = prompt_free_gap(d, w, tol=1e-13)
    assert _residual(d, exact, w).abs().max().item() < 1e-12
    approx = prompt_free_gap(d, w, tol=tol)
    assert (approx - exact).abs().max().item() <= tol / 2 + 1e-12
    # root lies inside [min d, max d]
    assert (exact >= d.min(1).values).all() and (exact <= d.max(1).values).all()


def test_bisection_warns_when_max_iter_too_small(caplog):
    d = torch.tensor([[0.0, 100.0, 3.0]])
    with caplog.at_level("WARNING"):
        prompt_free_gap(d, tol=1e-6, max_iter=3)
    assert "not within tol" in caplog.text


def test_planted_prompt_free_part_is_recovered_and_drives_priorities():
    """r(x, y) = a(x, y) + b(y): b prompt-free, a prompt-related and symmetric across prompts."""
    gen = torch.Generator().manual_seed(1)
    n_pairs, n_prompts = 200, 64
    b_c = torch.randn(n_pairs, generator=gen) * 2.0
    b_r = torch.randn(n_pairs, generator=gen) * 2.0
    a_c = torch.randn(n_pairs, n_prompts, generator=gen) * 0.7
    a_r = torch.randn(n_pairs, n_prompts, generator=gen) * 0.7
    d = (a_c + b_c[:, None]) - (a_r + b_r[:, None])  # column 0 = each pair's own prompt
    planted = b_c - b_r

    est = prompt_free_gap(d)
    corr = torch.corrcoef(torch.stack([est, planted]))[0, 1].item()
    assert corr > 0.95
    err = (est - planted).abs().mean().item()
    naive_err = (d[:, 0] - planted).abs().mean().item()  # own-prompt gap alone
    assert err < 0.25 and err < 0.5 * naive_err

    related = prompt_related_gap(d[:, 0], est)
    planted_related = a_c[:, 0] - a_r[:, 0]
    assert torch.corrcoef(torch.stack([related, planted_related]))[0, 1].item() > 0.9

    prio = priorities(est, tau=1.0)
    assert prio.mean().item() == pytest.approx(1.0, abs=1e-5)
    # Largest planted gap gets (near) the lowest priority, smallest gap (near) the highest.
    assert prio[planted.argmax()] <= torch.quantile(prio, 0.02)
    assert prio[planted.argmin()] >= torch.quantile(prio, 0.98)
    rank_p = prio.argsort().argsort().float()
    rank_g = planted.argsort().argsort().float()
    assert torch.corrcoef(torch.stack([rank_p, rank_g]))[0, 1].item() < -0.95


def test_importance_weights_hand_value_and_large_logps():
    # joint = [−2, −3] → w = [1, e^-1]/(1 + e^-1)
    w = importance_weights(torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.0, -1.0]]))
    z = 1 + math.exp(-1)
    assert w[0].tolist() == pytest.approx([1 / z, math.exp(-1) / z], abs=1e-6)
    # sequence log-likelihoods in the −1000s must not underflow to 0/0
    w = importance_weights(torch.tensor([[-1000.0, -1001.0, -5000.0]]), torch.tensor([[-800.0, -800.0, -800.0]]))
    assert torch.isfinite(w).all() and w.sum().item() == pytest.approx(1.0)
    assert w[0, :2].tolist() == pytest.approx([1 / z, math.exp(-1) / z], abs=1e-6)
    with pytest.raises(ValueError, match="no finite entry"):
        importance_weights(torch.full((1, 2), -math.inf), torch.zeros(1, 2))


def test_importance_weights_focus_the_gap_on_likely_prompts():
    d = torch.tensor([[5.0, -3.0, -3.0, -3.0]])
    w = importance_weights(torch.tensor([[0.0, -50.0, -50.0, -50.0]]), torch.zeros(1, 4))
    assert prompt_free_gap(d, w).item() == pytest.approx(5.0, abs=1e-3)
    assert prompt_free_gap(d).item() < 0  # uniform weights: dominated by the three −3 prompts


def test_priorities_hand_value():
    # Δr2 = [0, log 2] → softmax(−Δ) = [1, ½]/1.5 → ×2 = [4/3, 2/3]
    p = priorities(torch.tensor([0.0, math.log(2.0)]))
    assert p.tolist() == pytest.approx([4 / 3, 2 / 3], abs=1e-6)
    # τ = 2 halves the exponent: [1, 2^-½] normalised
    p = priorities(torch.tensor([0.0, math.log(2.0)]), tau=2.0)
    s = 1 + 2**-0.5
    assert p.tolist() == pytest.approx([2 / s, 2 * 2**-0.5 / s], abs=1e-6)
    with pytest.raises(ValueError, match="tau"):
        priorities(torch.zeros(3), tau=0.0)


def test_sample_by_priority():
    gen = torch.Generator().manual_seed(0)
    idx = sample_by_priority(torch.tensor([3.0, 1.0, 0.0]), 8000, gen)
    assert idx.dtype == torch.long and idx.shape == (8000,)
    assert (idx != 2).all()  # zero priority is never drawn
    assert (idx == 0).float().mean().item() == pytest.approx(0.75, abs=0.02)
    # with replacement: more samples than items; same seed → same draw
    again = sample_by_priority(torch.tensor([3.0, 1.0, 0.0]), 8000, torch.Generator().manual_seed(0))
    assert torch.equal(idx, again)
    with pytest.raises(ValueError, match="priorities"):
        sample_by_priority(torch.tensor([0.0, 0.0]), 4)
