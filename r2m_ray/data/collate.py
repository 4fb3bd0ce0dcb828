"""Batch collation: token lists -> padded LongTensors with attention and response masks.

`PreferenceCollator` pads chosen and rejected to ONE common length, so `stack_pair_batch`
can put both sides in a single [2B, T] batch (chosen rows first) for one forward pass.
Numeric scalar columns (weight, margin, gold_*, source_index, ...) come along as tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch

PaddingSide = Literal["left", "right"]
PAIR_TOKEN_COLUMNS = ("chosen_input_ids", "chosen_response_mask", "rejected_input_ids", "rejected_response_mask")
SFT_TOKEN_COLUMNS = ("input_ids", "response_mask")
IGNORE_INDEX = -100


def _as_rows(batch: Sequence[dict[str, Any]] | dict[str, list]) -> list[dict[str, Any]]:
    """Accept a list of rows (DataLoader) or a dict of columns (dataset slice)."""
    if isinstance(batch, dict):
        names = list(batch)
        return [dict(zip(names, values)) for values in zip(*(batch[n] for n in names))]
    return list(batch)


def pad_sequences(seqs: Sequence[Sequence[int]], value: int, length: int, side: PaddingSide) -> torch.Tensor:
    """Pad integer lists to `length` on `side` with `value` -> LongTensor [N, length]."""
    out = torch.full((len(seqs), length), value, dtype=torch.long)
    for i, seq in enumerate(seqs):
        if len(seq):
            row = torch.as_tensor(seq, dtype=torch.long)
            if side == "right":
                out[i, : len(seq)] = row
            else:
                out[i, length - len(seq) :] = row
    return out


def pad_ids(
    seqs: Sequence[Sequence[int]], pad_token_id: int, side: PaddingSide = "right"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token lists to their longest -> (input_ids, attention_mask), LongTensors [N, T]."""
    length = max(len(s) for s in seqs)
    ids = pad_sequences(seqs, pad_token_id, length, side)
    attn = pad_sequences([[1] * len(s) for s in seqs], 0, length, side)
    return ids, attn


def _scalar_tensors(rows: list[dict[str, Any]], skip: Sequence[str]) -> dict[str, torch.Tensor]:
    """Numeric per-row columns as tensors: float -> float32, int -> long, bool -> bool; strings are left out."""
    out = {}
    for name in rows[0]:
        if name in skip:
            continue
        values = [row[name] for row in rows]
        if all(isinstance(v, bool) for v in values):
            out[name] = torch.tensor(values, dtype=torch.bool)
        elif all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            out[name] = torch.tensor(values, dtype=torch.long)
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            out[name] = torch.tensor(values, dtype=torch.float32)
    return out


class PreferenceCollator:
    """Rows of `tokenize_preferences` -> chosen_/rejected_ input_ids, attention_mask, response_mask.

    Both sides are padded to the same length (the longest sequence of either side).
    `keep_strings=True` also passes string columns (e.g. subset) through as lists.
    """

    def __init__(self, pad_token_id: int, padding_side: PaddingSide = "right", keep_strings: bool = False) -> None:
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.pad_token_id = int(pad_token_id)
        self.padding_side = padding_side
        self.keep_strings = keep_strings

    def __call__(self, batch: Sequence[dict[str, Any]] | dict[str, list]) -> dict[str, Any]:
        """Collate a list of rows (or a dict of columns) into a dict of tensors."""
        rows = _as_rows(batch)
        if not rows:
            raise ValueError("cannot collate an empty batch")
        length = max(len(row[f"{side}_input_ids"]) for row in rows for side in ("chosen", "rejected"))
        out: dict[str, Any] = {}
        for side in ("chosen", "rejected"):
            ids = [row[f"{side}_input_ids"] for row in rows]
            out[f"{side}_input_ids"] = pad_sequences(ids, self.pad_token_id, length, self.padding_side)
            out[f"{side}_attention_mask"] = pad_sequences([[1] * len(s) for s in ids], 0, length, self.padding_side)
            out[f"{side}_response_mask"] = pad_sequences(
                [row[f"{side}_response_mask"] for row in rows], 0, length, self.padding_side
            )
        out.update(_scalar_tensors(rows, PAIR_TOKEN_COLUMNS))
        if self.keep_strings:
            out.update({n: [r[n] for r in rows] for n, v in rows[0].items() if isinstance(v, str)})
        return out


def stack_pair_batch(
    batch: dict[str, torch.Tensor], pad_token_id: int = 0, padding_side: PaddingSide = "right"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, response_mask) of shape [2B, T]: chosen rows first, then rejected.

    Sides of different lengths (batches not built by PreferenceCollator) are padded to the
    longer one with `pad_token_id` on `padding_side`.
    """
    length = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])
    stacked = []
    for key, fill in (("input_ids", pad_token_id), ("attention_mask", 0), ("response_mask", 0)):
        parts = []
        for side in ("chosen", "rejected"):
            t = batch[f"{side}_{key}"]
            gap = length - t.shape[1]
            if gap:
                pad = (0, gap) if padding_side == "right" else (gap, 0)
                t = torch.nn.functional.pad(t, pad, value=fill)
            parts.append(t)
        stacked.append(torch.cat(parts, dim=0))
    return stacked[0], stacked[1], stacked[2]


class SFTCollator:
    """Rows of `tokenize_sft` -> input_ids, attention_mask, response_mask and labels (-100 off the completion)."""

    def __init__(self, pad_token_id: int, padding_side: PaddingSide = "right") -> None:
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.pad_token_id = int(pad_token_id)
        self.padding_side = padding_side

    def __call__(self, batch: Sequence[dict[str, Any]] | dict[str, list]) -> dict[str, torch.Tensor]:
        """Collate a list of rows (or a dict of columns) into a dict of tensors."""
        rows = _as_rows(batch)
        if not rows:
            raise ValueError("cannot collate an empty batch")
        ids = [row["input_ids"] for row in rows]
        length = max(len(s) for s in ids)
        out = {
            "input_ids": pad_sequences(ids, self.pad_token_id, length, self.padding_side),
            "attention_mask": pad_sequences([[1] * len(s) for s in ids], 0, length, self.padding_side),
            "response_mask": pad_sequences([row["response_mask"] for row in rows], 0, length, self.padding_side),
        }
        out["labels"] = out["input_ids"].masked_fill(out["response_mask"] == 0, IGNORE_INDEX)
        out.update(_scalar_tensors(rows, SFT_TOKEN_COLUMNS))
        return out
