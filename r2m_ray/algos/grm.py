"""GRM — hidden-state regularisation of the reward model (Yang et al., NeurIPS 2024).

The reward model and the backbone's own LM head share the final hidden states;
the LM head's log-likelihood of the responses regularises those states
(ALGORITHMS.md §1). With log π(y|x) = Σ_{t ∈ response} log π(y_t | x, y_<t):

- ``sft`` (default):  L_reg = −log σ(β · log π(y_c|x))                       (chosen only)
- ``sft_plain``:      L_reg = −log π(y_c|x)
- ``dpo``:            L_reg = −log σ(β[(log π(y_c) − log π(y_r)) − (log π_ref(y_c) − log π_ref(y_r))])
- ``dpo_noref``:      L_reg = −log σ(β[log π(y_c) − log π(y_r)])
- total:              L = α·L_reg + (1−α)·L_reward,  α = 0.01, β = 0.1 (authors' scripts)

Per-pair weights (the prioritiser's) average the regulariser the same way as
the BT loss: Σ w·l / Σ w.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from r2m_ray.algos.bt import weighted_mean

RegulariserKind = Literal["sft", "sft_plain", "dpo", "dpo_noref"]
REGULARISER_KINDS: tuple[str, ...] = ("sft", "sft_plain", "dpo", "dpo_noref")


def sequence_logprobs(logits: Tensor, input_ids: Tensor, response_mask: Tensor) -> Tensor:
    """Sum of response-token log-probs: log π(y|x) = Σ_t m_t · log softmax(logits[t−1])[input_ids[t]].

    ``logits`` [B, T, V] are the LM head's outputs over ``input_ids`` [B, T]; token t is
    predicted from position t−1. ``response_mask`` [B, T] marks the response tokens in
    ``input_ids`` coordinates (prompt and padding are 0). Returns [B] in float32 (or
    float64 if the logits are), differentiable w.r.t. ``logits``.
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, T, V], got shape {tuple(logits.shape)}")
    if input_ids.shape != logits.shape[:2]:
        raise ValueError(
            f"input_ids shape {tuple(input_ids.shape)} does not match logits [B, T] {tuple(logits.shape[:2])}"
        )
    if response_mask.shape != input_ids.shape:
        raise ValueError(
            f"response_mask shape {tuple(response_mask.shape)} does not match input_ids {tuple(input_ids.shape)}"
        )
    # Position 0 has no preceding logit; a response token there would be silently dropped.
    if (response_mask[:, 0] != 0).any():
        raise ValueError("response_mask marks position 0, which no logit predicts; the prompt must be non-empty")
    # log_softmax in at least float32: bf16 log-probs summed over hundreds of tokens lose the signal.
    compute_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    pred_logits = logits[:, :-1].to(compute_dtype)
    targets = input_ids[:, 1:].long()
    token_logp = torch.gather(F.log_softmax(pred_logits, dim=-1), -1, targets.unsqueeze(-1)).squeeze(-1)
    mask = response_mask[:, 1:].to(compute_dtype)
    return (token_logp * mask).sum(dim=-1)


def _require(kind: str, **inputs: Tensor | None) -> None:
    """Raise a ValueError naming every input that ``kind`` needs but did not get."""
    missing = [name for name, value in inputs.items() if value is None]
    if missing:
        raise ValueError(f"GRM regulariser kind {kind!r} needs {', '.join(missing)}, which were not given")


def grm_regulariser(
    kind: RegulariserKind,
    logp_c: Tensor,
    logp_r: Tensor | None = None,
    ref_logp_c: Tensor | None = None,
    ref_logp_r: Tensor | None = None,
    beta: float = 0.1,
    weights: Tensor | None = None,
) -> Tensor:
    """GRM regulariser L_reg (scalar), weighted mean over pairs of the per-pair term for ``kind``.

    sft:       −log σ(β · log π(y_c|x))
    sft_plain: −log π(y_c|x)
    dpo:       −log σ(β[(log π(y_c) − log π(y_r)) − (log π_ref(y_c) − log π_ref(y_r))])
    dpo_noref: −log σ(β[log π(y_c) − log π(y_r)])

    All log-probs are per-sequence sums [B] (``sequence_logprobs``); the reference
    log-probs are constants (detached).
    """
    if logp_c.dim() != 1:
        raise ValueError(f"logp_c must be a 1-D [B] tensor, got shape {tuple(logp_c.shape)}")
    for name, value in (("logp_r", logp_r), ("ref_logp_c", ref_logp_c), ("ref_logp_r", ref_logp_r)):
        if value is not None and value.shape != logp_c.shape:
            raise ValueError(f"{name} shape {tuple(value.shape)} does not match logp_c shape {tuple(logp_c.shape)}")
    if kind == "sft":
        losses = -F.logsigmoid(beta * logp_c)
    elif kind == "sft_plain":
        losses = -logp_c
    elif kind == "dpo":
        _require(kind, logp_r=logp_r, ref_logp_c=ref_logp_c, ref_logp_r=ref_logp_r)
        ref_margin = (ref_logp_c - ref_logp_r).detach()
        losses = -F.logsigmoid(beta * ((logp_c - logp_r) - ref_margin))
    elif kind == "dpo_noref":
        _require(kind, logp_r=logp_r)
        losses = -F.logsigmoid(beta * (logp_c - logp_r))
    else:
        raise ValueError(f"kind must be one of {REGULARISER_KINDS}, got {kind!r}")
    return weighted_mean(losses, weights)


def grm_loss(reward_loss: Tensor, reg_loss: Tensor, alpha: float = 0.01) -> Tensor:
    """GRM total loss L = α·L_reg + (1−α)·L_reward (α = 0.01 in the authors' scripts)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return alpha * reg_loss + (1.0 - alpha) * reward_loss
