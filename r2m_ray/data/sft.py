"""Load supervised fine-tuning data: {prompt, completion} strings or chat `messages` lists.

Output columns: `prompt_messages` (list of {"role", "content"}), `prompt` (the last user turn as
text, e.g. for the world's gold reward), `completion` (the final assistant turn),
`source_index`, and the source's other scalar columns. Bad rows and duplicates are skipped and
counted (logged), or raise `BadRowError` under `bad_rows="error"`.
"""

from __future__ import annotations

import logging
from typing import Any

import datasets

from r2m_ray.data.config import DataConfig
from r2m_ray.data.preference import MESSAGES_FEATURE
from r2m_ray.data.report import SkipReport, check_rows, row_key
from r2m_ray.data.schemas import last_user_text, sft_from_row
from r2m_ray.data.sources import open_source

logger = logging.getLogger(__name__)

SFT_COLUMNS = ("prompt_messages", "prompt", "completion", "response", "messages", "source_index")


def load_sft(source: str, cfg: DataConfig, split: str = "train") -> datasets.Dataset:
    """Load SFT examples from a hub name or local file into prompt_messages/prompt/completion."""
    src = open_source(source, cfg, split)
    raw, label = src.dataset, src.label
    cols = set(raw.column_names)
    if "messages" not in cols and not ("prompt" in cols and cols & {"completion", "response"}):
        raise ValueError(
            f"{label}: SFT data needs 'prompt' + 'completion' (or 'response') columns, or a 'messages' "
            f"column; columns found: {sorted(cols)}"
        )
    report = SkipReport(source=label, n_in=len(raw))

    def parse(row: dict[str, Any]) -> dict[str, Any]:
        prompt, completion = sft_from_row(row)
        return {
            "prompt_messages": prompt,
            "prompt": last_user_text(prompt),
            "completion": completion,
            "_key": row_key(prompt, completion),
        }

    out_features = {
        "prompt_messages": MESSAGES_FEATURE,
        "prompt": datasets.Value("string"),
        "completion": datasets.Value("string"),
        "source_index": datasets.Value("int64"),
    }
    keep = src.scalar_columns(exclude=set(SFT_COLUMNS))
    ds = check_rows(
        raw,
        parse,
        out_features,
        keep,
        report,
        policy=cfg.bad_rows,
        dedup=cfg.dedup,
        num_proc=cfg.num_proc,
        desc="checking sft rows",
        json_columns=src.json_columns,
    )
    report.log(logger)
    return ds
