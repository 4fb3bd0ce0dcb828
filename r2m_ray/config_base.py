"""Base class for every section of the typed config tree.

Every section forbids unknown keys and validates on assignment, so a typo in a
YAML file or a dotted override is an error that names the key instead of a
silently ignored setting.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Section(BaseModel):
    """A node of the config tree: strict keys, validated assignment, finite numbers (a NaN or inf
    learning rate, temperature or bound is always a typo that would surface inside an actor)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(), allow_inf_nan=False)


class OptimConfig(Section):
    """AdamW (torch's, never DeepSpeed's fused kernels on CPU) with linear warm-up."""

    lr: float = Field(default=1e-4, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = Field(default=10, ge=0)
    grad_clip: float = Field(default=1.0, gt=0)
