"""Load prompts for RL and best-of-n: {prompt} strings, chat message lists, or transcript prefixes.

Output columns: `prompt_messages` (list of {"role", "content"}, ending on a user turn), `prompt`
(the last user turn as text), `source_index`, and the source's other scalar columns (e.g. the
AlpacaEval `source`). Preference files work too: the prompt is the pair's shared prefix.
"""

from __future__ import annotations

import logging
from typing import Any

import datasets

from r2m_ray.data.config import DataConfig
from r2m_ray.data.preference import MESSAGES_FEATURE
from r2m_ray.data.report import SkipReport, check_rows, row_key
from r2m_ray.data.schemas import last_user_text, prompt_from_row
from r2m_ray.data.sources import open_source

logger = logging.getLogger(__name__)

PROMPT_SOURCE_COLUMNS = ("prompt", "prompt_messages", "messages", "chosen")
CONSUMED_COLUMNS = ("prompt", "prompt_messages", "messages", "chosen", "rejected", "source_index")


def load_prompts(source: str, cfg: DataConfig, split: str = "train") -> datasets.Dataset:
    """Load prompts from a hub name or local file into prompt_messages/prompt (+ scalar columns)."""
    src = open_source(source, cfg, split)
    raw, label = src.dataset, src.label
    if not set(raw.column_names) & set(PROMPT_SOURCE_COLUMNS):
        raise ValueError(
            f"{label}: no prompt column: need one of {list(PROMPT_SOURCE_COLUMNS)}; columns found: {raw.column_names}"
        )
    report = SkipReport(source=label, n_in=len(raw))

    def parse(row: dict[str, Any]) -> dict[str, Any]:
        prompt = prompt_from_row(row)
        return {"prompt_messages": prompt, "prompt": last_user_text(prompt), "_key": row_key(prompt)}

    out_features = {
        "prompt_messages": MESSAGES_FEATURE,
        "prompt": datasets.Value("string"),
        "source_index": datasets.Value("int64"),
    }
    keep = src.scalar_columns(exclude=set(CONSUMED_COLUMNS))
    ds = check_rows(
        raw,
        parse,
        out_features,
        keep,
        report,
        policy=cfg.bad_rows,
        dedup=cfg.dedup,
        num_proc=cfg.num_proc,
        desc="checking prompts",
        json_columns=src.json_columns,
    )
    report.log(logger)
    return ds
