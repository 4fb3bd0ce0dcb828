"""GRM regulariser and sequence log-probs against hand-computed values."""

import math

import pytest
import torch

from r2m_ray.algos.grm import grm_loss, grm_regulariser, sequence_logprobs


def _toy_batch():
    """One row: ids [a, p, y1, y2]; prompt = a, p; response = y1, y2 (mask in input_ids coordinates)."""
    input_ids = torch.tensor([[0, 2, 1, 2]])
    response_mask = torch.tensor([[0, 0, 1, 1]])
    logits = torch.zeros(1, 4, 3)
    logits[0, 0] = torch.tensor([5.0, -3.0, 7.0])  # predicts prompt token p: must be ignored
    logits[0, 1] = torch.tensor([0.0, math.log(2.0), 0.0])  # predicts y1 = 1 with p = 2/4
    logits[0, 2] = torch.tensor([0.0, 0.0, 0.0])  # predicts y2 = 2 with p = 1/3
    logits[0, 3] = torch.tensor([9.0, 1.0, -4.0])  # after the last token: must be ignored
    return logits, input_ids, response_mask


def test_sequence_logprobs_hand_value():
    logits, ids, mask = _toy_batch()
    expected = math.log(0.5) + math.log(1 / 3)
    assert sequence_logprobs(logits, ids, mask).item() == pytest.approx(expected, abs=1e-6)


def test_sequence_logprobs_gradient_only_at_response_predicting_positions():
    logits, ids, mask = _toy_batch()
    logits.requires_grad_(True)
    sequence_logprobs(logits, ids, mask).sum().backward()
    grad_norm_per_pos = logits.grad[0].abs().sum(dim=-1)
    assert grad_norm_per_pos[0].item() == 0.0 and grad_norm_per_pos[3].item() == 0.0
    assert grad_norm_per_pos[1].item() > 0 and grad_norm_per_pos[2].item() > 0


def test_sequence_logprobs_padding_side_and_batch():
    logits, ids, mask = _toy_batch()
    # Same sequence left-padded by one token: shift everything right.
    ids_left = torch.cat([torch.tensor([[0]]), ids], dim=1)
    mask_left = torch.cat([torch.tensor([[0]]), mask], dim=1)
    logits_left = torch.cat([torch.randn(1, 1, 3), logits], dim=1)
    right = sequence_logprobs(
        torch.cat([logits, torch.randn(1, 1, 3)], 1),
        torch.cat([ids, torch.tensor([[0]])], 1),
        torch.cat([mask, torch.tensor([[0]])], 1),
    )
    left = sequence_logprobs(logits_left, ids_left, mask_left)
    assert left.item() == pytest.approx(right.item(), abs=1e-6)


def test_sequence_logprobs_bad_inputs():
    logits, ids, mask = _toy_batch()
    with pytest.raises(ValueError, match="position 0"):
        sequence_logprobs(logits, ids, torch.tensor([[1, 0, 1, 1]]))
    with pytest.raises(ValueError, match="response_mask shape"):
        sequence_logprobs(logits, ids, mask[:, :3])


def test_regulariser_hand_values():
    logp_c, logp_r = torch.tensor([-10.0]), torch.tensor([-12.0])
    ref_c, ref_r = torch.tensor([-10.0]), torch.tensor([-13.0])
    # sft: −log σ(0.1·−10) = log(1 + e^1)
    assert grm_regulariser("sft", logp_c).item() == pytest.approx(math.log(1 + math.e), abs=1e-6)
    assert grm_regulariser("sft_plain", logp_c).item() == pytest.approx(10.0)
    # dpo_noref: −log σ(0.1·(−10 + 12)) = log(1 + e^-0.2)
    got = grm_regulariser("dpo_noref", logp_c, logp_r)
    assert got.item() == pytest.approx(math.log(1 + math.exp(-0.2)), abs=1e-6)
    # dpo: −log σ(0.1·(2 − 3)) = log(1 + e^0.1)
    got = grm_regulariser("dpo", logp_c, logp_r, ref_c, ref_r, beta=0.1)
    assert got.item() == pytest.approx(math.log(1 + math.exp(0.1)), abs=1e-6)


def test_regulariser_weighted_and_gradients():
    logp_c = torch.tensor([-10.0, -20.0], requires_grad=True)
    ref_c = torch.tensor([-10.0, -20.0], requires_grad=True)
    ref_r = torch.tensor([-11.0, -21.0], requires_grad=True)
    logp_r = torch.tensor([-12.0, -20.0], requires_grad=True)
    w = torch.tensor([1.0, 3.0])
    # sft_plain weighted: (1·10 + 3·20)/4
    assert grm_regulariser("sft_plain", logp_c, weights=w).item() == pytest.approx(17.5)
    loss = grm_regulariser("dpo", logp_c, logp_r, ref_c, ref_r)
    loss.backward()
    assert logp_c.grad is not None and (logp_c.grad < 0).all()  # raising log π(y_c) lowers the loss
    assert logp_r.grad is not None and (logp_r.grad > 0).all()
    assert ref_c.grad is None and ref_r.grad is None  # the reference is frozen


def test_regulariser_missing_inputs_and_bad_kind():
    logp_c = torch.tensor([-1.0])
    with pytest.raises(ValueError, match="logp_r"):
        grm_regulariser("dpo_noref", logp_c)
    with pytest.raises(ValueError, match="ref_logp_c, ref_logp_r"):
        grm_regulariser("dpo", logp_c, torch.tensor([-2.0]))
    with pytest.raises(ValueError, match="kind"):
        grm_regulariser("kto", logp_c)


def test_grm_loss_mix():
    # 0.01·2 + 0.99·1 = 1.01
    assert grm_loss(torch.tensor(1.0), torch.tensor(2.0)).item() == pytest.approx(1.01)
    assert grm_loss(torch.tensor(1.0), torch.tensor(2.0), alpha=0.5).item() == pytest.approx(1.5)
    with pytest.raises(ValueError, match="alpha"):
        grm_loss(torch.tensor(1.0), torch.tensor(2.0), alpha=2.0)
