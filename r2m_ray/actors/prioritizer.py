"""Prioritizer: prompt-free gaps and per-pair priorities, beside the RM learners.

The actor keeps its own copy of the reward model, refreshed from a learner weight
snapshot every `refresh_every` steps, and scores the coming batches while the
learners train on the current one. For each pair (x_k, y_c, y_r) it scores the
cross pairs (x_i, y_c), (x_i, y_r) for the pair's own prompt and M−1 other
prompts of the batch, solves for the prompt-free gap Δr2 (algos/decomposition.py)
and turns gaps into priorities (small gap → high priority).

With `weights: reference` it also keeps the frozen starting model and scores the same cross
sequences with its LM head: log π_ref(y|x_i) summed over the response tokens gives the
importance weights w_i ∝ π_ref(y_c|x_i)·π_ref(y_r|x_i) of the bisection.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import ray
import torch

from r2m_ray.algos.decomposition import importance_weights, priorities, prompt_free_gap, prompt_related_gap
from r2m_ray.config import PrioritizerConfig
from r2m_ray.data.collate import pad_ids


def split_prompt_response(input_ids: list[int], response_mask: list[int]) -> tuple[list[int], list[int]]:
    """Token ids of the prompt part and of the response part of one encoded sequence."""
    prompt = [t for t, m in zip(input_ids, response_mask) if not m]
    response = [t for t, m in zip(input_ids, response_mask) if m]
    return prompt, response


def cross_prompt_indices(n: int, m: int, generator: torch.Generator) -> torch.Tensor:
    """[n, m] prompt indices: column 0 is the pair's own prompt, the rest other pairs' prompts."""
    if n < 2:
        raise ValueError("prompt-free gaps need at least 2 pairs in a batch (other prompts to compare)")
    m = min(m, n)
    idx = torch.empty(n, m, dtype=torch.long)
    for k in range(n):
        others = torch.randperm(n - 1, generator=generator)[: m - 1]
        others = others + (others >= k).long()  # skip k itself
        idx[k, 0] = k
        idx[k, 1:] = others
    return idx


@torch.no_grad()
def sequence_rewards(model: Any, seqs: list[list[int]], pad_id: int, batch: int, packed: bool) -> torch.Tensor:
    """The reward model's reward [len(seqs)] of token sequences, right-padded in chunks of `batch`."""
    out = []
    for i in range(0, len(seqs), batch):
        ids, attn = pad_ids(seqs[i : i + batch], pad_id, side="right")
        out.append(model(ids, attn, packed=packed).rewards.float())
    return torch.cat(out)


@torch.no_grad()
def response_logps_of(
    model: Any, seqs: list[list[int]], n_prompt: list[int], pad_id: int, batch: int, packed: bool
) -> torch.Tensor:
    """log π(response | prompt) [len(seqs)] from the model's LM head; the first n_prompt[j] tokens are the prompt."""
    out = []
    for i in range(0, len(seqs), batch):
        chunk = seqs[i : i + batch]
        ids, attn = pad_ids(chunk, pad_id, side="right")
        mask = torch.zeros_like(ids)
        for j, (seq, k) in enumerate(zip(chunk, n_prompt[i : i + batch])):
            mask[j, k : len(seq)] = 1
        out.append(model(ids, attn, response_mask=mask, packed=packed).seq_logps.float())
    return torch.cat(out)


def cross_sequences(
    rows: dict[str, list[list[int]]], idx: torch.Tensor, max_length: int
) -> tuple[list[list[int]], list[int]]:
    """For pair k and each prompt i of idx[k]: (x_i, y_c,k) then (x_i, y_r,k) as token ids, and each
    sequence's prompt length. The response is kept whole; the oldest prompt tokens go if it is too long."""
    chosen = [split_prompt_response(i, m) for i, m in zip(rows["chosen_input_ids"], rows["chosen_response_mask"])]
    rejected = [split_prompt_response(i, m) for i, m in zip(rows["rejected_input_ids"], rows["rejected_response_mask"])]
    seqs: list[list[int]] = []
    n_prompt: list[int] = []
    for k in range(len(chosen)):
        for i in idx[k].tolist():
            prompt = chosen[i][0]
            for response in (chosen[k][1], rejected[k][1]):
                room = max(1, max_length - len(response))
                seqs.append(prompt[-room:] + response)
                n_prompt.append(len(prompt[-room:]))
    return seqs, n_prompt


def decompose(
    model: Any,
    rows: dict[str, list[list[int]]],
    idx: torch.Tensor,
    cfg: PrioritizerConfig,
    pad_id: int,
    max_length: int,
    batch: int,
    packed: bool,
    reference: Any = None,
) -> dict[str, Any]:
    """Δr2, Δr1 and priorities of a batch of encoded pairs over the prompts idx [n, M] (column 0: own).

    `d` [n, M] holds r(x_i, y_c) − r(x_i, y_r); with a `reference` model the bisection is weighted by
    its importance weights [n, M] (returned as `weights`), else uniformly."""
    n = len(rows["chosen_input_ids"])
    seqs, n_prompt = cross_sequences(rows, idx, max_length)
    r = sequence_rewards(model, seqs, pad_id, batch, packed).view(n, idx.shape[1], 2)
    d = r[..., 0] - r[..., 1]
    weights = None
    if reference is not None:
        logp = response_logps_of(reference, seqs, n_prompt, pad_id, batch, packed).view(n, idx.shape[1], 2)
        weights = importance_weights(logp[..., 0], logp[..., 1])
    delta_r2 = prompt_free_gap(d, weights)
    return {
        "delta_r2": delta_r2,
        "delta_r1": prompt_related_gap(d[:, 0], delta_r2),
        "d": d,
        "priorities": priorities(delta_r2, tau=cfg.tau, normalize=cfg.normalize),
        "weights": weights,
        "prompt_index": idx,
        "sequences_scored": len(seqs),
    }


@ray.remote
class Prioritizer:
    """Holds a recent reward-model copy; returns prompt-free gaps and priorities per batch."""

    def __init__(
        self, cfg_json: str, model_dir: str, pad_token_id: int, max_length: int, seed: int, torch_threads: int = 1
    ) -> None:
        from r2m_ray.models.config import ModelConfig
        from r2m_ray.models.reward_model import RewardModel

        torch.set_num_threads(torch_threads)
        payload = json.loads(cfg_json)
        self.cfg = PrioritizerConfig.model_validate(payload["rm"]["prioritizer"])
        model_cfg = ModelConfig.model_validate(payload["model"])
        self.eval_batch = int(payload["rm"]["eval_batch_size"])
        self.packing = bool(payload["rm"].get("packing", True))  # the cross sequences, pad-free as the learner
        self.model = RewardModel.from_backbone_dir(
            Path(model_dir),
            value_head=model_cfg.value_head,
            head_hidden=model_cfg.head_hidden,
            head_dropout=model_cfg.head_dropout,
            seed=seed,
        ).eval()
        self.reference = None  # the frozen starting model: its LM head gives the importance weights
        if self.cfg.weights == "reference":
            self.reference = RewardModel.from_backbone_dir(Path(model_dir), "linear", seed=seed).eval()
        self.pad_id = pad_token_id
        self.max_length = max_length
        self.generator = torch.Generator().manual_seed(seed)
        self.version = -1

    def refresh(self, state_dict: dict[str, torch.Tensor], version: int) -> int:
        """Load a learner snapshot (passed as an ObjectRef, resolved by Ray)."""
        self.model.load_state_dict(state_dict)
        self.version = version
        return version

    def score(self, rows: dict[str, list[list[int]]]) -> dict[str, Any]:
        """Δr2, Δr1 and priorities for one batch of encoded pairs (column lists)."""
        idx = cross_prompt_indices(len(rows["chosen_input_ids"]), self.cfg.num_prompts, self.generator)
        out = decompose(
            self.model, rows, idx, self.cfg, self.pad_id, self.max_length, self.eval_batch, self.packing, self.reference
        )
        return {**out, "version": self.version}
