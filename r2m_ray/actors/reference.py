"""ReferenceActor: the frozen initial backbone, serving reference log-probs.

GRM's `dpo` regulariser needs log π_ref(y|x) for every chosen and rejected
response. The backbone never changes, so the log-probs of a fixed dataset are
computed once, in chunks the driver sends by ref, and cached on disk as Arrow
keyed by (model, dataset fingerprint): a second run over the same data is free.
The RL stage's KL penalty needs them per token (`token_logprobs`), aligned with the
policy learner's old log-probs.
"""

from __future__ import annotations

import os
from pathlib import Path

import ray
import torch

from r2m_ray.actors.policy_learner import response_token_logprobs
from r2m_ray.algos.grm import sequence_logprobs
from r2m_ray.data.collate import pad_ids
from r2m_ray.models.reward_model import position_ids_from_mask


@ray.remote
class ReferenceActor:
    """Frozen causal LM; returns response log-probs, summed per sequence or per token."""

    def __init__(self, model_dir: str, pad_token_id: int, torch_threads: int = 1) -> None:
        from r2m_ray.models.registry import actor_device, load_causal_lm

        torch.set_num_threads(torch_threads)
        self.device = actor_device()
        self.model = load_causal_lm(Path(model_dir)).eval().to(self.device)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.pad_id = pad_token_id

    def ping(self) -> dict[str, int]:
        """Liveness and process id (the driver counts restarts by a new pid)."""
        return {"pid": os.getpid()}

    @torch.no_grad()
    def logprobs(self, input_ids: list[list[int]], response_mask: list[list[int]]) -> torch.Tensor:
        """log π_ref(y|x) per sequence = sum over response tokens."""
        ids, attn = pad_ids(input_ids, self.pad_id)
        mask, _ = pad_ids(response_mask, 0)
        ids, attn, mask = ids.to(self.device), attn.to(self.device), mask.to(self.device)
        logits = self.model(input_ids=ids, attention_mask=attn).logits.float()
        return sequence_logprobs(logits, ids, mask).cpu()

    @torch.no_grad()
    def token_logprobs(
        self,
        input_ids: list[list[int]] | torch.Tensor,
        attention_mask: list[list[int]] | torch.Tensor | None,
        response_mask: list[list[int]] | torch.Tensor,
    ) -> torch.Tensor:
        """Per-token log π_ref [B, T] float32, aligned like PolicyLearner's ``old_logp``; 0 outside the response.

        ``out[:, t] = log π_ref(input_ids[:, t] | input_ids[:, <t])`` where ``response_mask[:, t]`` is 1.
        Tensors are used as given (any padding side); token lists are right-padded here (their
        ``attention_mask`` may be None). Positions are counted over real tokens, as the learner does.
        """
        if isinstance(input_ids, torch.Tensor):
            ids = input_ids.long()
            attn = torch.ones_like(ids) if attention_mask is None else torch.as_tensor(attention_mask).long()
            mask = torch.as_tensor(response_mask)
        else:
            ids, attn = pad_ids(input_ids, self.pad_id)
            mask, _ = pad_ids(response_mask, 0)
        if attn.shape != ids.shape or mask.shape != ids.shape:
            raise ValueError(
                f"attention_mask {tuple(attn.shape)} / response_mask {tuple(mask.shape)} must match "
                f"input_ids {tuple(ids.shape)}"
            )
        ids, attn, mask = ids.to(self.device), attn.to(self.device), mask.to(self.device)
        logits = self.model(
            input_ids=ids, attention_mask=attn, position_ids=position_ids_from_mask(attn), use_cache=False
        ).logits
        return response_token_logprobs(logits, ids, mask).cpu()
