"""Advantages, KL estimators and the clipped policy loss against hand-computed values."""

import math

import pytest
import torch

from r2m_ray.algos.policy_loss import (
    behaviour_weights,
    clipped_policy_loss,
    entropy_from_logits,
    grpo_advantages,
    kl_penalty,
    masked_mean,
    rloo_advantages,
)


def test_rloo_hand_values():
    # [1, 2, 3]: 1 − (2+3)/2, 2 − (1+3)/2, 3 − (1+2)/2
    r = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 2.0]])
    assert rloo_advantages(r).tolist() == [[-1.5, 0.0, 1.5], [3.0, -3.0, 0.0]]
    with pytest.raises(ValueError, match="K >= 2"):
        rloo_advantages(torch.zeros(4, 1))


def test_grpo_hand_values():
    # [1, 3]: mean 2, population std 1 → ±1/(1+ε)
    a = grpo_advantages(torch.tensor([[1.0, 3.0]]), eps=1e-6)
    assert a.tolist()[0] == pytest.approx([-1 / (1 + 1e-6), 1 / (1 + 1e-6)], abs=1e-7)
    # [1, 2, 3]: population std √(2/3)
    s = math.sqrt(2 / 3)
    assert grpo_advantages(torch.tensor([[1.0, 2.0, 3.0]]), eps=0.0).tolist()[0] == pytest.approx([-1 / s, 0, 1 / s])
    assert grpo_advantages(torch.full((1, 4), 7.0)).abs().max().item() == 0.0  # tied group: no signal, no NaN


def test_kl_estimators():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert kl_penalty(logp, ref, "k1").item() == pytest.approx(math.log(2))
    # u = ref − logp = −log 2: e^u − u − 1 = 0.5 + log 2 − 1
    assert kl_penalty(logp, ref, "k3").item() == pytest.approx(0.5 + math.log(2) - 1)
    x = torch.randn(100)
    assert kl_penalty(x, x, "k3").abs().max().item() == 0.0
    assert (kl_penalty(x, torch.randn(100), "k3") >= 0).all()
    with pytest.raises(ValueError, match="kind"):
        kl_penalty(x, x, "k2")


def _clip_case():
    """Seq 0: A=+1, ρ=[1.5, 1.0]; seq 1: A=−1, ρ=[0.5, 1.1] with its second token padding."""
    old = torch.zeros(2, 2)
    logp = torch.log(torch.tensor([[1.5, 1.0], [0.5, 1.1]])).requires_grad_(True)
    adv = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1, 1], [1, 0]])
    return logp, old, adv, mask


def test_clipped_loss_hand_values_token_and_sequence_mean():
    logp, old, adv, mask = _clip_case()
    # per token: −min(1.5, 1.2) = −1.2 (clipped); −1; −min(−0.5, −0.8) = 0.8 (clipped); padding
    loss, stats = clipped_policy_loss(logp, old, adv, mask, clip_eps=0.2)
    assert loss.item() == pytest.approx((-1.2 - 1.0 + 0.8) / 3, abs=1e-6)
    assert stats["clip_fraction"] == pytest.approx(2 / 3)
    assert stats["ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    # approx_kl = mean(ρ − 1 − log ρ)
    kl = ((0.5 - math.log(1.5)) + 0.0 + (-0.5 - math.log(0.5))) / 3
    assert stats["approx_kl"] == pytest.approx(kl, abs=1e-6)
    loss.backward()
    # clipped tokens get no gradient; the unclipped one gets −ρA/3 = −1/3; padding none
    assert logp.grad.tolist()[0] == pytest.approx([0.0, -1 / 3], abs=1e-6)
    assert logp.grad.tolist()[1] == pytest.approx([0.0, 0.0], abs=1e-6)
    logp, old, adv, mask = _clip_case()
    seq_loss, _ = clipped_policy_loss(logp, old, adv, mask, token_mean=False)
    assert seq_loss.item() == pytest.approx(((-1.2 - 1.0) / 2 + 0.8) / 2, abs=1e-6)


def test_clipped_loss_pessimistic_side_is_not_clipped():
    # ρ = 1.5 with A = −1: min(−1.5, −1.2) = −1.5 → unclipped term active, gradient flows
    logp = torch.log(torch.tensor([[1.5]])).requires_grad_(True)
    loss, stats = clipped_policy_loss(logp, torch.zeros(1, 1), torch.tensor([-1.0]), torch.ones(1, 1))
    assert loss.item() == pytest.approx(1.5, abs=1e-6)
    assert stats["clip_fraction"] == 0.0
    loss.backward()
    assert logp.grad.item() == pytest.approx(1.5, abs=1e-6)  # d(−ρA)/d logp = −ρA = 1.5


def test_clipped_loss_with_kl_term():
    logp, old, adv, mask = _clip_case()
    kl = torch.tensor([[0.3, 0.6], [0.9, 100.0]])  # padded KL must be ignored
    loss, stats = clipped_policy_loss(logp, old, adv, mask, kl=kl, kl_coef=0.1)
    assert stats["kl"] == pytest.approx(0.6, abs=1e-6)
    assert loss.item() == pytest.approx((-1.2 - 1.0 + 0.8) / 3 + 0.1 * 0.6, abs=1e-6)
    with pytest.raises(ValueError, match="kl_coef"):
        clipped_policy_loss(logp, old, adv, mask, kl_coef=0.1)
    with pytest.raises(ValueError, match="advantages"):
        clipped_policy_loss(logp, old, adv.view(2, 1), mask)


def test_behaviour_weights_hand_values():
    # row 0 stale: log π_{t,τ} − log μ = [log 1.5, log 3 (capped at 2)]; row 1 fresh: weight 1
    sampler = torch.log(torch.tensor([[0.3, 0.6], [0.2, 0.5]]))
    mu = torch.log(torch.tensor([[0.2, 0.2], [0.9, 0.1]]))
    mask = torch.tensor([[1, 1], [1, 0]])
    w, stats = behaviour_weights(sampler, mu, mask, torch.tensor([True, False]), cap=2.0)
    assert w.tolist()[0] == pytest.approx([1.5, 2.0], abs=1e-6)
    assert w.tolist()[1] == [1.0, 1.0]  # a fresh row and padding are never reweighted
    assert stats["behaviour_weight_mean"] == pytest.approx(1.75, abs=1e-6)
    assert stats["behaviour_weight_capped"] == 0.5
    assert stats["behaviour_log_ratio"] == pytest.approx((math.log(1.5) + math.log(3)) / 2, abs=1e-6)
    _, none = behaviour_weights(sampler, mu, mask, torch.tensor([False, False]), cap=2.0)
    assert none == {}  # no stale row: nothing to report
    with pytest.raises(ValueError, match="stale"):
        behaviour_weights(sampler, mu, mask, torch.tensor([True]), cap=2.0)
    with pytest.raises(ValueError, match="cap"):
        behaviour_weights(sampler, mu, mask, torch.tensor([True, False]), cap=0.5)


def test_behaviour_weight_scales_each_token_and_ones_change_nothing():
    logp, old, adv, mask = _clip_case()
    plain, _ = clipped_policy_loss(logp, old, adv, mask)
    ones, _ = clipped_policy_loss(logp, old, adv, mask, behaviour_weight=torch.ones(2, 2))
    assert ones.item() == plain.item()  # bit for bit: weight 1 is the synchronous loop
    w = torch.tensor([[2.0, 0.5], [1.5, 9.0]])  # the padded token's weight must not count
    loss, _ = clipped_policy_loss(logp, old, adv, mask, behaviour_weight=w)
    assert loss.item() == pytest.approx((2 * -1.2 + 0.5 * -1.0 + 1.5 * 0.8) / 3, abs=1e-6)
    loss.backward()
    assert logp.grad.tolist()[0] == pytest.approx([0.0, -0.5 / 3], abs=1e-6)  # w·(−ρA)/3 on the unclipped token
    with pytest.raises(ValueError, match="behaviour_weight"):
        clipped_policy_loss(logp, old, adv, mask, behaviour_weight=torch.ones(2, 3))


def test_old_logp_gets_no_gradient():
    logp = torch.zeros(1, 2, requires_grad=True)
    old = torch.zeros(1, 2, requires_grad=True)
    loss, _ = clipped_policy_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 2))
    loss.backward()
    assert old.grad is None and logp.grad is not None


def test_masked_mean():
    x = torch.tensor([[1.0, float("nan")], [3.0, 5.0]])
    mask = torch.tensor([[1, 0], [1, 1]])
    assert masked_mean(x, mask).item() == pytest.approx(3.0)  # (1 + 3 + 5)/3, NaN ignored
    assert masked_mean(x, mask, dim=1).tolist() == pytest.approx([1.0, 4.0])
    with pytest.raises(ValueError, match="no real entry"):
        masked_mean(x, torch.zeros(2, 2))
    with pytest.raises(ValueError, match="dim 1"):
        masked_mean(x, torch.tensor([[0, 0], [1, 1]]), dim=1)


def test_entropy_from_logits():
    logits = torch.zeros(1, 2, 4)
    logits[0, 1] = torch.tensor([0.0, math.log(3.0), -math.inf, -math.inf])  # p = [¼, ¾, 0, 0]
    ent = entropy_from_logits(logits)
    assert ent.shape == (1, 2)
    assert ent[0, 0].item() == pytest.approx(math.log(4))
    expected = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert ent[0, 1].item() == pytest.approx(expected, abs=1e-6)
    leaf = logits.clone().requires_grad_(True)
    entropy_from_logits(leaf).sum().backward()
    assert torch.isfinite(leaf.grad).all()
    assert leaf.grad[0, 0].abs().max().item() < 1e-7  # uniform is the entropy maximum
