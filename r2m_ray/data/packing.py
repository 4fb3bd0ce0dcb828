"""Pad-free packing of a padded batch: several sequences share one row, each attending only to itself.

A reward-model batch of short pairs is mostly padding (the quickstart's: 48% of the [2B, T]
tokens), and on a CPU the matmuls cost in proportion to every token, pad or not. Packing
puts the rows' real tokens end to end into rows of the same length T (first-fit decreasing),
with positions restarting at 0 in each sequence and a block-diagonal causal mask, so the
model computes exactly what it would on the padded batch (same positions, same visible
tokens), on about half the tokens. Rows stay T long, so attention costs no more than before.
The mask is an explicit [R, 1, T, T] boolean, which transformers' sdpa and eager attention take
as given (the models here load with sdpa); an attention kernel that ignores 4-D masks would not.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor


@dataclass
class PackedBatch:
    """Packed rows [R, T] and where each original sequence went.

    segment_ids: 1 + the index of the original sequence a token belongs to, 0 on the unused tail.
    source_row / source_start / lengths: per original sequence (in input order).
    """

    input_ids: Tensor
    position_ids: Tensor
    segment_ids: Tensor
    attention_mask_4d: Tensor
    source_row: Tensor
    source_start: Tensor
    lengths: Tensor

    def to(self, device: torch.device | str) -> PackedBatch:
        """The same batch with every tensor on `device`."""
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return PackedBatch(**{k: v.to(device) for k, v in moved.items()})


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of sequence indices whose lengths sum to ≤ capacity (every length must be ≤ capacity)."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda k: -lengths[k]):
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"sequence {i} has {n} tokens, more than the row length {capacity}")
        for b, free in enumerate(room):
            if n <= free:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(capacity - n)
    return bins


def pack_right_padded(input_ids: Tensor, attention_mask: Tensor, pad_token_id: int = 0) -> PackedBatch:
    """Pack a right-padded batch [N, T] into [R, T] rows, R ≤ N; the mask is [R, 1, T, T] bool (True = attend).

    A row with no real token is kept as a one-token sequence (its first position), so every
    input sequence has a last token to read, as `last_token_index` gives 0 for such a row.
    """
    if input_ids.shape != attention_mask.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} differ")
    n, width = input_ids.shape
    lengths = attention_mask.long().sum(-1).clamp(min=1)
    # right padding is what PreferenceCollator produces; a left-padded batch would be packed wrongly
    starts_real = attention_mask[:, 0].bool() | (attention_mask.long().sum(-1) == 0)
    if not bool(starts_real.all()):
        raise ValueError("pack_right_padded: the batch is not right-padded (a row starts with padding)")
    bins = first_fit_decreasing(lengths.tolist(), width)
    rows = len(bins)
    ids = torch.full((rows, width), pad_token_id, dtype=input_ids.dtype)
    pos = torch.zeros((rows, width), dtype=torch.long)
    seg = torch.zeros((rows, width), dtype=torch.long)
    source_row = torch.empty(n, dtype=torch.long)
    source_start = torch.empty(n, dtype=torch.long)
    for r, members in enumerate(bins):
        at = 0
        for i in members:
            length = int(lengths[i])
            ids[r, at : at + length] = input_ids[i, :length]
            pos[r, at : at + length] = torch.arange(length)
            seg[r, at : at + length] = i + 1
            source_row[i], source_start[i] = r, at
            at += length
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] > 0)
    # unused tail positions attend to themselves only, so no softmax row is empty (NaN)
    mask = (same & causal) | torch.eye(width, dtype=torch.bool)
    return PackedBatch(ids, pos, seg, mask[:, None], source_row, source_start, lengths)


def unpack(packed_values: Tensor, packed: PackedBatch, attention_mask: Tensor) -> Tensor:
    """Per-token values of the packed rows [R, T, ...] back in the padded layout [N, T, ...], zeros on pads."""
    lengths = attention_mask.long().sum(-1)
    seq, pos = (torch.arange(attention_mask.shape[1], device=lengths.device)[None, :] < lengths[:, None]).nonzero(
        as_tuple=True
    )
    out = packed_values.new_zeros((*attention_mask.shape, *packed_values.shape[2:]))
    out[seq, pos] = packed_values[packed.source_row[seq], packed.source_start[seq] + pos]
    return out


def packed_decoder_states(decoder: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """An HF decoder's last_hidden_state [N, T, D] on a right-padded batch, computed pad-free; zeros on pads."""
    packed = pack_right_padded(input_ids.cpu(), attention_mask.cpu()).to(input_ids.device)
    hidden = decoder(
        input_ids=packed.input_ids,
        attention_mask=packed.attention_mask_4d,
        position_ids=packed.position_ids,
        use_cache=False,
    ).last_hidden_state
    return unpack(hidden, packed, attention_mask)
