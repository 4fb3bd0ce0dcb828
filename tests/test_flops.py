"""The MFU arithmetic (eval/flops.py): the parameter count and FLOPs by hand, the measured peak."""

from __future__ import annotations

import torch

from r2m_ray.eval.flops import DecoderShape, gemm_peak_flops, mfu, training_flops
from r2m_ray.models.registry import load_causal_lm


def test_decoder_shape_counts_the_llama_blocks_by_hand(tiny_model_dir):
    model = load_causal_lm(tiny_model_dir)
    c = model.config
    d, inter, layers = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    kv = c.num_key_value_heads * (d // c.num_attention_heads)
    # q and o are d×d, k and v d×kv, the MLP three d×I, two RMSNorms per layer, one final norm
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * inter + 2 * d
    shape = DecoderShape.of(model)
    assert shape == DecoderShape(layers * per_layer + d, layers, d, c.vocab_size)
    # the untied embedding and LM head are the only parameters left out
    assert sum(p.numel() for p in model.parameters()) - shape.params == 2 * c.vocab_size * d


def test_training_flops_by_hand():
    shape = DecoderShape(params=1000, layers=2, hidden=8, vocab=50)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])  # real lengths 3 and 4: pads are not work
    # 6·N·(3+4) + 12·L·d·(3²+4²) + 6·V·d·R with R = 5 LM-head positions
    assert training_flops(shape, mask, 5) == 6 * 1000 * 7 + 12 * 2 * 8 * 25 + 6 * 50 * 8 * 5
    assert mfu(2e9, 2.0, 4e9) == 0.25 and mfu(1.0, 0.0, 1.0) == 0.0


def test_gemm_peak_is_measured_and_threads_restored():
    before = torch.get_num_threads()
    peak = gemm_peak_flops(threads=1, n=256, repeats=2)
    assert torch.get_num_threads() == before
    # any CPU that runs this suite does more than 0.1 GFLOP/s and less than 10 TFLOP/s on one thread
    assert 1e8 < peak < 1e13, peak
