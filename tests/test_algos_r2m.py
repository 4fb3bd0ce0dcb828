"""R2M pieces: ω schedule, sequence-to-token cross-attention, mixing, GREBT, self-labelled pairs."""

import itertools
import math

import pytest
import torch
from torch import nn

from r2m_ray.algos.r2m import (
    SequenceToTokenCrossAttention,
    grebt_loss,
    mix_hidden,
    omega,
    self_labelled_pairs,
)


def test_omega_schedule():
    assert omega(0, 100, 0.6) == pytest.approx(1.0)
    assert omega(100, 100, 0.6) == pytest.approx(0.6)
    assert omega(50, 100, 0.6) == pytest.approx(0.6)  # ½cos(π/2)+½ = ½ < Ω
    assert omega(50, 100, 0.3) == pytest.approx(0.5)
    assert omega(25, 100, 0.0) == pytest.approx(0.5 * math.cos(math.pi / 4) + 0.5)
    assert omega(150, 100, 0.3) == pytest.approx(0.3)  # clamped: no rise after T
    values = [omega(t, 100, 0.3) for t in range(121)]
    assert all(a >= b for a, b in itertools.pairwise(values))
    tensor_values = omega(torch.arange(0, 121), 100, 0.3)
    assert tensor_values.tolist() == pytest.approx(values)
    with pytest.raises(ValueError, match="T"):
        omega(0, 0, 0.6)


def _module(n_heads=1, seed=0):
    torch.manual_seed(seed)
    return SequenceToTokenCrossAttention(d_rm=6, d_policy=5, d_attn=8, n_heads=n_heads).double()


def test_cross_attention_masked_tokens_change_nothing():
    attn = _module()
    h_last = torch.randn(2, 6, dtype=torch.float64)
    h = torch.randn(2, 4, 5, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])
    out = attn(h_last, h, mask)
    h2 = h.clone()
    h2[0, 3] = torch.randn(5, dtype=torch.float64) * 100
    h2[1, 0] = float("nan")  # even NaN padding must not leak
    assert torch.equal(attn(h_last, h2, mask), out)
    h3 = h.clone()
    h3[0, 1] += 1.0  # a real token does matter
    assert not torch.allclose(attn(h_last, h3, mask), out)


def test_cross_attention_single_real_token_is_exactly_its_value():
    attn = _module()
    h_last = torch.randn(1, 6, dtype=torch.float64)
    h = torch.randn(1, 3, 5, dtype=torch.float64)
    out = attn(h_last, h, torch.tensor([[0, 1, 0]]))
    expected = attn.w_o(attn.w_v(h[:, 1]))  # softmax over one token = 1 → v W_o
    # equal up to float64 rounding: a 3-row and a 1-row GEMM may accumulate in another order (they
    # differ in the last bit on some CPUs); a leak from a masked token would be of order 0.1
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("n_heads", [1, 2])
def test_cross_attention_matches_manual_formula(n_heads):
    attn = _module(n_heads)
    h_last = torch.randn(2, 6, dtype=torch.float64)
    h = torch.randn(2, 3, 5, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    out = attn(h_last, h, mask)
    d_head = 8 // n_heads
    for b in range(2):
        real = mask[b].bool()
        q = h_last[b] @ attn.w_q.weight.T
        k = h[b, real] @ attn.w_k.weight.T
        v = h[b, real] @ attn.w_v.weight.T
        heads = []
        for n in range(n_heads):
            sl = slice(n * d_head, (n + 1) * d_head)
            a = torch.softmax(k[:, sl] @ q[sl] / math.sqrt(d_head), dim=0)
            heads.append(a @ v[:, sl])
        manual = torch.cat(heads) @ attn.w_o.weight.T
        assert torch.allclose(out[b], manual, atol=1e-12)


def test_cross_attention_bad_inputs():
    attn = _module()
    with pytest.raises(ValueError, match="no real token"):
        attn(torch.zeros(2, 6), torch.zeros(2, 3, 5), torch.tensor([[1, 0, 0], [0, 0, 0]]))
    with pytest.raises(ValueError, match="h must be"):
        attn(torch.zeros(2, 6), torch.zeros(2, 3, 4), torch.ones(2, 3))
    with pytest.raises(ValueError, match="multiple of n_heads"):
        SequenceToTokenCrossAttention(4, 4, d_attn=10, n_heads=3)


def test_mix_hidden_hand_values():
    h_hat, h_last = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 4.0]])
    assert mix_hidden(h_hat, h_last, 0.25).tolist() == [[1.5, 1.0]]
    w = torch.tensor([1.0, 0.0])
    out = mix_hidden(h_hat.repeat(2, 1), h_last.repeat(2, 1), w)
    assert out.tolist() == [[0.0, 4.0], [2.0, 0.0]]


def test_r2m_at_t0_is_the_rm_and_grads_reach_only_trainable_parts():
    """Frozen backbone → H_last; cross-attention + head φ train; ω(0)=1 reproduces the RM exactly."""
    torch.manual_seed(0)
    backbone = nn.Linear(3, 6).requires_grad_(False)  # stands in for the frozen RM
    head = nn.Linear(6, 1)
    attn = SequenceToTokenCrossAttention(6, 5, d_attn=8)
    x = torch.randn(4, 3)
    h_policy = torch.randn(4, 7, 5, requires_grad=True)  # policy states: feedback, not trained here
    mask = torch.ones(4, 7)
    h_last = backbone(x)
    h_fin = mix_hidden(attn(h_last, h_policy.detach(), mask), h_last, omega(0, 10, 0.6))
    assert torch.equal(head(h_fin), head(h_last))

    h_fin = mix_hidden(attn(h_last, h_policy.detach(), mask), h_last, omega(10, 10, 0.6))
    r = head(h_fin).view(2, 2)
    loss, _ = grebt_loss(r, torch.tensor([0, 1]), torch.tensor([1, 0]))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in attn.parameters())
    assert all(p.grad is not None for p in head.parameters())
    assert all(p.grad is None for p in backbone.parameters())
    assert h_policy.grad is None


def test_grebt_hand_values_k2():
    # r = [3, 1]: centred [1, −1], population std 1 → z = [1, −1], p = [σ(2), σ(−2)]
    r = torch.tensor([[3.0, 1.0]])
    bt = math.log(1 + math.exp(-2))
    p1, p2 = 1 / (1 + math.exp(-2)), 1 / (1 + math.exp(2))
    gre = -(p1 * math.log(p1) + p2 * math.log(p2))
    loss, parts = grebt_loss(r, torch.tensor([0]), torch.tensor([1]), alpha=0.3)
    assert parts["bt"] == pytest.approx(bt, abs=1e-6)
    assert parts["gre"] == pytest.approx(gre, abs=1e-6)
    assert loss.item() == pytest.approx(0.7 * bt + 0.3 * gre, abs=1e-6)
    loss_no_bt, _ = grebt_loss(r, torch.tensor([0]), torch.tensor([1]), use_bt=False)
    loss_no_gre, _ = grebt_loss(r, torch.tensor([0]), torch.tensor([1]), use_gre=False)
    assert loss_no_bt.item() == pytest.approx(gre, abs=1e-6)
    assert loss_no_gre.item() == pytest.approx(bt, abs=1e-6)
    with pytest.raises(ValueError, match="both False"):
        grebt_loss(r, torch.tensor([0]), torch.tensor([1]), use_bt=False, use_gre=False)


def test_grebt_hand_values_k3_two_groups():
    # group 0: r = [1, 0, −1], w=0, l=2: Δ=2; std = √(2/3) → z = [1/s, 0, −1/s]
    # group 1: r = [0, 0, 3],  w=2, l=0: Δ=3; centred [−1, −1, 2], std = √2
    r = torch.tensor([[1.0, 0.0, -1.0], [0.0, 0.0, 3.0]], dtype=torch.float64)

    def entropy(z):
        e = [math.exp(v) for v in z]
        p = [v / sum(e) for v in e]
        return -sum(v * math.log(v) for v in p)

    s0, s1 = math.sqrt(2 / 3 + 1e-8), math.sqrt(2 + 1e-8)
    gre = (entropy([1 / s0, 0, -1 / s0]) + entropy([-1 / s1, -1 / s1, 2 / s1])) / 2
    bt = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(-3))) / 2
    loss, parts = grebt_loss(r, torch.tensor([0, 2]), torch.tensor([2, 0]), alpha=0.3)
    assert parts["gre"] == pytest.approx(gre, abs=1e-9)
    assert parts["bt"] == pytest.approx(bt, abs=1e-9)
    assert loss.item() == pytest.approx(0.7 * bt + 0.3 * gre, abs=1e-9)


def test_gre_minimisation_sharpens_and_is_finite_for_tied_groups():
    r = torch.tensor([[0.3, 0.1, -0.2, 0.0]], requires_grad=True)
    opt = torch.optim.SGD([r], lr=0.5)
    first = None
    for _ in range(30):
        opt.zero_grad()
        loss, parts = grebt_loss(r, torch.tensor([0]), torch.tensor([2]), use_bt=False)
        first = parts["gre"] if first is None else first
        loss.backward()
        opt.step()
    assert parts["gre"] < first - 0.05  # entropy falls: the group's rewards sharpen
    tied = torch.zeros(2, 3, requires_grad=True)
    loss, parts = grebt_loss(tied, torch.tensor([0, 0]), torch.tensor([2, 2]))
    loss.backward()
    assert torch.isfinite(tied.grad).all()
    assert parts["gre"] == pytest.approx(math.log(3), abs=1e-6)


def test_grebt_bad_indices():
    r = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="winner_idx equals loser_idx"):
        grebt_loss(r, torch.tensor([0, 1]), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="loser_idx has entries outside"):
        grebt_loss(r, torch.tensor([0, 1]), torch.tensor([3, 2]))


def test_self_labelled_pairs_and_ties():
    r = torch.tensor([[1.0, 3.0, 2.0], [5.0, 5.0, 0.0], [2.0, 2.0, 2.0], [0.0, 1.0, 0.0]])
    winner, loser = self_labelled_pairs(r)
    # first max / last min; an all-tied group still gets winner ≠ loser (0, K−1)
    assert winner.tolist() == [1, 0, 0, 1]
    assert loser.tolist() == [0, 2, 2, 2]
    with pytest.raises(ValueError, match="K >= 2"):
        self_labelled_pairs(torch.zeros(3, 1))
