"""Model FLOPs utilisation (MFU) of a decoder learner: the FLOPs a training step needs over the
GEMM peak this CPU reaches.

Training FLOPs of one micro-batch (forward 1×, backward 2×; PaLM, Chowdhery et al. 2022, app. B):

    F = 6 · N · Σ_s T_s  +  12 · L · d · Σ_s T_s²  +  6 · V · d · R

- N: the decoder's parameters without the token embedding and the LM head (those are a lookup
  and a GEMM counted apart); T_s: the real (non-pad) tokens of sequence s. Pads are not counted:
  a padded batch's wasted work is not useful FLOPs.
- 12·L·d·T² per sequence: QKᵀ and AV in each of the L layers, counted over the full T×T square
  as PaLM does (a causal kernel needs about half; the term is < 10% of F at these lengths).
- 6·V·d·R: the LM head, run on the R positions that predict a response token only (the policy
  learner computes no logits elsewhere).

The peak is measured, not taken from a data sheet: the best of several square fp32 (or bf16)
`torch.mm` runs with the learner's thread count, 2n³ FLOPs each. MFU = F / seconds / peak.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class DecoderShape:
    """What the FLOP count needs from a causal LM."""

    params: int  # N: every parameter except the token embedding and the LM head
    layers: int
    hidden: int
    vocab: int

    @classmethod
    def of(cls, model: nn.Module) -> DecoderShape:
        """The shape of a transformers causal LM (tied or untied LM head)."""
        text = model.config.get_text_config()
        skip = {id(p) for m in (model.get_input_embeddings(), model.get_output_embeddings()) for p in m.parameters()}
        params = sum(p.numel() for p in model.parameters() if id(p) not in skip)
        return cls(params, int(text.num_hidden_layers), int(text.hidden_size), int(text.vocab_size))


def training_flops(shape: DecoderShape, attention_mask: Tensor, lm_head_positions: int) -> float:
    """F above for one forward + backward over a [B, T] batch (pads excluded via `attention_mask`)."""
    lengths = attention_mask.sum(dim=1).double()
    dense = 6.0 * shape.params * float(lengths.sum())
    attention = 12.0 * shape.layers * shape.hidden * float((lengths**2).sum())
    head = 6.0 * shape.vocab * shape.hidden * lm_head_positions
    return dense + attention + head


def gemm_peak_flops(threads: int, dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 5) -> float:
    """The best FLOP/s of `repeats` n×n `torch.mm` runs on `threads` threads (restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        torch.mm(a, b)  # warm-up: first-call allocation and kernel selection
        best = float("inf")
        for _ in range(repeats):
            tick = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - tick)
        return 2.0 * n**3 / best
    finally:
        torch.set_num_threads(before)


def mfu(flops: float, seconds: float, peak_flops_per_second: float) -> float:
    """Achieved FLOP/s over the peak; 0 when no time was measured."""
    return flops / seconds / peak_flops_per_second if seconds > 0 else 0.0
