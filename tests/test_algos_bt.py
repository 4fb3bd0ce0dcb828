"""Bradley-Terry losses and baselines against hand-computed values."""

import math

import pytest
import torch

from r2m_ray.algos.bt import (
    bt_loss,
    ensemble_reduce,
    label_smoothing_loss,
    margin_loss,
    pairwise_accuracy,
    weighted_mean,
)

LOG1P_EXP_NEG1 = math.log(1 + math.exp(-1))  # −log σ(1)
LOG2 = math.log(2)  # −log σ(0)


def test_bt_loss_hand_value():
    r_c, r_r = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0])
    # Δ = [1, 0] → mean(log(1+e^-1), log 2)
    expected = (LOG1P_EXP_NEG1 + LOG2) / 2
    assert bt_loss(r_c, r_r).item() == pytest.approx(expected, abs=1e-6)


def test_bt_loss_weighted_hand_value_and_no_grad_into_weights():
    r_c, r_r = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0])
    w = torch.tensor([3.0, 1.0], requires_grad=True)
    expected = (3 * LOG1P_EXP_NEG1 + 1 * LOG2) / 4
    loss = bt_loss(r_c, r_r, weights=w)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert not loss.requires_grad  # rewards are constants here; weights must not make it differentiable


def test_bt_loss_gradient():
    r_c = torch.tensor([0.0, 2.0], requires_grad=True)
    r_r = torch.tensor([0.0, 0.0], requires_grad=True)
    bt_loss(r_c, r_r).backward()
    # d/dr_c of −log σ(Δ)/B = −(1 − σ(Δ))/B
    expected = [-(1 - 0.5) / 2, -(1 - 1 / (1 + math.exp(-2))) / 2]
    assert r_c.grad.tolist() == pytest.approx(expected, abs=1e-6)
    assert r_r.grad.tolist() == pytest.approx([-g for g in expected], abs=1e-6)


def test_bt_loss_stable_for_huge_gaps():
    loss = bt_loss(torch.tensor([-1000.0]), torch.tensor([0.0]))
    assert loss.item() == pytest.approx(1000.0, rel=1e-6)


def test_margin_loss_float_and_tensor_margin():
    # Δ = 2, m = 1 → −log σ(1)
    assert margin_loss(torch.tensor([2.0]), torch.tensor([0.0]), 1.0).item() == pytest.approx(LOG1P_EXP_NEG1, abs=1e-6)
    # Δ = [2, 1], m = [1, 0] → both −log σ(1); weights [1, 0] → first only
    r_c, r_r, m = torch.tensor([2.0, 1.0]), torch.tensor([0.0, 0.0]), torch.tensor([1.0, 0.0])
    assert margin_loss(r_c, r_r, m).item() == pytest.approx(LOG1P_EXP_NEG1, abs=1e-6)
    # Δ − m = [1, 3] with weights [0, 1] → −log σ(3)
    out = margin_loss(torch.tensor([2.0, 3.0]), r_r, m, weights=torch.tensor([0.0, 1.0]))
    assert out.item() == pytest.approx(math.log(1 + math.exp(-3)), abs=1e-6)
    with pytest.raises(ValueError, match="margin"):
        margin_loss(r_c, r_r, torch.tensor([1.0, 2.0, 3.0]))


def test_label_smoothing_hand_value():
    # Δ = 1, ε = 0.1 → 0.9·log(1+e^-1) + 0.1·log(1+e^1)
    expected = 0.9 * LOG1P_EXP_NEG1 + 0.1 * math.log(1 + math.e)
    got = label_smoothing_loss(torch.tensor([1.0]), torch.tensor([0.0]), eps=0.1)
    assert got.item() == pytest.approx(expected, abs=1e-6)
    r_c, r_r = torch.tensor([1.0, -0.5]), torch.tensor([0.0, 0.3])
    assert label_smoothing_loss(r_c, r_r, eps=0.0).item() == pytest.approx(bt_loss(r_c, r_r).item(), abs=1e-7)


def test_pairwise_accuracy_ties_count_half():
    # pair 1 correct, pair 2 tie (½), pair 3 wrong → 1.5 / 3
    assert pairwise_accuracy(torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 0.0, 3.0])) == pytest.approx(0.5)
    assert pairwise_accuracy(torch.tensor([1.0, 1.0]), torch.tensor([0.0, 0.5])) == pytest.approx(1.0)


def test_ensemble_reduce():
    rewards = torch.tensor([[1.0, 4.0], [3.0, 0.0], [2.0, 2.0]])
    assert ensemble_reduce(rewards, "mean").tolist() == pytest.approx([2.0, 2.0])
    assert ensemble_reduce(rewards, "min").tolist() == pytest.approx([1.0, 0.0])
    with pytest.raises(ValueError, match="mode"):
        ensemble_reduce(rewards, "max")
    with pytest.raises(ValueError, match="N_models"):
        ensemble_reduce(torch.tensor([1.0, 2.0]), "mean")


def test_bad_inputs_raise_named_errors():
    with pytest.raises(ValueError, match="r_r shape"):
        bt_loss(torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match="weights sum to zero"):
        bt_loss(torch.zeros(2), torch.zeros(2), weights=torch.zeros(2))
    with pytest.raises(ValueError, match="non-negative"):
        weighted_mean(torch.zeros(2), torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="eps"):
        label_smoothing_loss(torch.zeros(2), torch.zeros(2), eps=1.5)
