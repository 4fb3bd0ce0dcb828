"""ReferenceActor: the frozen initial backbone, serving reference log-probs.

GRM's `dpo` regulariser needs log π_ref(y|x) for every chosen and rejected
response. The backbone never changes, so the log-probs of a fixed dataset are
computed once, in chunks the driver sends by ref, and cached on disk as Arrow
keyed by (model, dataset fingerprint): a second run over the same data is free.
"""

from __future__ import annotations

from pathlib import Path

import ray
import torch

from r2m_ray.algos.grm import sequence_logprobs
from r2m_ray.data.collate import pad_ids


@ray.remote
class ReferenceActor:
    """Frozen causal LM; returns summed response log-probs."""

    def __init__(self, model_dir: str, pad_token_id: int, torch_threads: int = 1) -> None:
        from r2m_ray.models.registry import load_causal_lm

        torch.set_num_threads(torch_threads)
        self.model = load_causal_lm(Path(model_dir)).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.pad_id = pad_token_id

    @torch.no_grad()
    def logprobs(self, input_ids: list[list[int]], response_mask: list[list[int]]) -> torch.Tensor:
        """log π_ref(y|x) per sequence = sum over response tokens."""
        ids, attn = pad_ids(input_ids, self.pad_id)
        mask, _ = pad_ids(response_mask, 0)
        logits = self.model(input_ids=ids, attention_mask=attn).logits.float()
        return sequence_logprobs(logits, ids, mask)
