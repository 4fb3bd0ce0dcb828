"""The `data:` section: where preference, SFT and prompt data come from and how rows are checked.

A source is a local file (.json, .jsonl, .jsonl.gz, .parquet, .arrow), a directory written by
`Dataset.save_to_disk`, or a hub dataset name (optionally `name:split`). `None` means "the
synthetic world of this run": the pipeline fills in the world's files.
"""

from __future__ import annotations

import warnings
from typing import Literal

from pydantic import Field, model_validator

from r2m_ray.config_base import Section

Schema = Literal["auto", "pairs", "chat", "transcript", "rewardbench"]
Truncation = Literal["truncate_prompt_left", "skip", "error"]
BadRows = Literal["skip", "error"]


# `schema` is the natural key name but shadows BaseModel's deprecated `schema()` classmethod;
# the field wins (cfg.schema is the value) and pydantic's warning about it is noise.
warnings.filterwarnings("ignore", message='Field name "schema" in "DataConfig"', category=UserWarning)


class DataConfig(Section):
    """Data sources, schema detection, length limits and the policy for bad or over-long rows."""

    train: str | None = None
    test_id: str | None = None
    test_ood: str | None = None
    extra_eval: list[str] = []
    sft: str | None = None
    prompts: str | None = None

    schema: Schema = "auto"
    column_map: dict[str, str] = {}

    # split data.train into train and test (the "id" evaluation) by a hash of each prompt
    # (data/split.py); the assignment is written to the run directory's data_split.json
    test_fraction: float | None = Field(default=None, gt=0, lt=1)
    split_salt: str = "r2m-ray"

    train_split: str = "train"
    eval_split: str = "test"
    hub_config: str | None = None
    hub_revision: str | None = None
    cache_dir: str | None = None

    max_length: int = Field(default=256, gt=1)
    max_prompt_length: int = Field(default=192, gt=0)
    truncation: Truncation = "truncate_prompt_left"
    bad_rows: BadRows = "skip"
    dedup: bool = True
    limit: int | None = Field(default=None, gt=0)
    num_proc: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _check_split(self) -> DataConfig:
        if self.test_fraction is not None and self.test_id is not None:
            raise ValueError("data.test_fraction splits data.train into train/test; do not also set data.test_id")
        return self

    @model_validator(mode="after")
    def _check_lengths(self) -> DataConfig:
        if self.max_prompt_length >= self.max_length:
            raise ValueError(
                f"max_prompt_length ({self.max_prompt_length}) must be < max_length ({self.max_length}) "
                "so every example keeps room for its response"
            )
        return self
