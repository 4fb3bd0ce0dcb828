"""Pad-free packing (data/packing.py): the bins, the packed layout, and a forward equal to the padded one."""

from __future__ import annotations

import pytest
import torch

from r2m_ray.data.packing import first_fit_decreasing, pack_right_padded


def test_first_fit_decreasing_by_hand():
    # longest first: 5 -> bin0 (room 1), 4 -> bin1 (room 2), 3 -> bin2, 2 -> bin1, 1 -> bin0
    assert first_fit_decreasing([5, 3, 4, 2, 1], 6) == [[0, 4], [2, 3], [1]]
    with pytest.raises(ValueError, match="sequence 1 has 7 tokens"):
        first_fit_decreasing([2, 7], 6)


def test_pack_layout_positions_mask_and_last_tokens():
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0], [3, 0, 0, 0]])
    attn = (ids != 0).long()
    p = pack_right_padded(ids, attn)
    # lengths 3, 2, 1 into rows of 4: [seq0 | seq2] and [seq1 | tail]
    assert p.input_ids.tolist() == [[5, 6, 7, 3], [8, 9, 0, 0]]
    assert p.position_ids.tolist() == [[0, 1, 2, 0], [0, 1, 0, 0]]
    assert p.segment_ids.tolist() == [[1, 1, 1, 3], [2, 2, 0, 0]]
    # where each sequence's last real token went (row, column), in input order
    assert p.source_row.tolist() == [0, 1, 0] and (p.source_start + p.lengths - 1).tolist() == [2, 1, 3]
    m = p.attention_mask_4d[:, 0]
    assert m[0, 3].tolist() == [False, False, False, True]  # seq2 sees only itself
    assert m[0, 2].tolist() == [True, True, True, False]  # causal within seq0
    assert m[1, 3].tolist() == [False, False, False, True]  # the tail attends to itself only


def test_pack_refuses_a_left_padded_batch():
    ids = torch.tensor([[0, 5, 6], [7, 8, 9]])
    with pytest.raises(ValueError, match="not right-padded"):
        pack_right_padded(ids, (ids != 0).long())


def test_packed_forward_equals_the_padded_forward_and_its_gradients(small_cfg, world_paths, tiny_model_dir):
    from r2m_ray.data.collate import PreferenceCollator, stack_pair_batch
    from r2m_ray.data.preference import load_preferences
    from r2m_ray.data.tokenize import tokenize_preferences
    from r2m_ray.models.registry import load_tokenizer
    from r2m_ray.models.reward_model import RewardModel

    tok = load_tokenizer(tiny_model_dir)
    ds = tokenize_preferences(load_preferences(str(world_paths["train"]), small_cfg.data), tok, small_cfg.data)
    batch = PreferenceCollator(tok.pad_token_id)(ds.dataset[:16])
    ids, attn, resp = stack_pair_batch(batch)
    assert (attn == 0).any(), "the batch must have padding for this test to mean anything"
    model = RewardModel.from_backbone_dir(tiny_model_dir, head_dropout=0.0)
    grads = []
    outs = []
    for packed in (False, True):
        model.zero_grad()
        out = model(ids, attn, response_mask=resp, packed=packed)
        (out.rewards.sum() + out.seq_logps.sum()).backward()
        outs.append(out)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    padded, packed = outs
    torch.testing.assert_close(packed.rewards, padded.rewards, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed.seq_logps, padded.seq_logps, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-4, rtol=1e-4)
    assert padded.seq_logps.lt(0).all()  # a real log-probability on every row


def test_packed_decoder_states_equal_the_padded_ones_on_real_tokens(tiny_model_dir):
    from r2m_ray.data.packing import packed_decoder_states
    from r2m_ray.models.registry import load_causal_lm
    from r2m_ray.models.reward_model import position_ids_from_mask

    lm = load_causal_lm(tiny_model_dir).eval()
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([7, 3, 12, 1, 5, 12])
    attn = (torch.arange(12)[None, :] < lengths[:, None]).long()
    ids = torch.randint(3, lm.config.vocab_size, (6, 12), generator=g) * attn
    with torch.no_grad():
        padded = lm.base_model(input_ids=ids, attention_mask=attn, position_ids=position_ids_from_mask(attn))
        packed = packed_decoder_states(lm.base_model, ids, attn)
    expected = padded.last_hidden_state * attn[..., None]
    torch.testing.assert_close(packed, expected, atol=1e-5, rtol=1e-5)
    assert packed[1, 3:].abs().sum() == 0  # zeros on pads
