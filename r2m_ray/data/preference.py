"""Load preference pairs from any supported schema into one normalised schema.

Output columns: `prompt_messages` (list of {"role", "content"}: the conversation before the
final assistant turn), `chosen`, `rejected` (final assistant contents), `subset` ("" if none),
`source_index` (the row's number in the source, after `limit`), and every other scalar column
of the source (e.g. gold_chosen, margin, weight). Bad rows are skipped and counted per reason
in a `SkipReport`, or raise `BadRowError` naming row and field under `bad_rows="error"`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import datasets

from r2m_ray.data.config import DataConfig
from r2m_ray.data.report import SkipReport, check_rows, row_key
from r2m_ray.data.schemas import check_schema_columns, detect_schema, normalise_preference
from r2m_ray.data.sources import open_source

logger = logging.getLogger(__name__)

MESSAGES_FEATURE = datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")})
NORMALISED_COLUMNS = ("prompt_messages", "chosen", "rejected", "subset", "source_index")


@dataclass
class PreferenceData:
    """Normalised preference pairs and the account of rows dropped on the way."""

    dataset: datasets.Dataset
    report: SkipReport
    schema: str

    def __len__(self) -> int:
        return len(self.dataset)


def load_preferences(source: str, cfg: DataConfig, split: str = "train") -> PreferenceData:
    """Load preference pairs from a hub name or local file, normalised and checked.

    `cfg.schema="auto"` detects pairs / chat / transcript / rewardbench from the columns; an
    unusable column set raises ValueError naming the missing column and listing those found.
    """
    src = open_source(source, cfg, split)
    raw, label = src.dataset, src.label
    if cfg.schema == "auto":
        schema = detect_schema(raw.column_names, src.is_list_column, label)
    else:
        schema = cfg.schema
        check_schema_columns(schema, raw.column_names, label)
    keep_columns = src.scalar_columns(
        exclude={"prompt", "chosen", "rejected", "subset", "messages", *NORMALISED_COLUMNS}
    )
    report = SkipReport(source=label, n_in=len(raw))

    def parse(row: dict[str, Any]) -> dict[str, Any]:
        prompt, chosen, rejected, subset, notes = normalise_preference(row, schema)
        return {
            "prompt_messages": prompt,
            "chosen": chosen,
            "rejected": rejected,
            "subset": subset,
            "_key": row_key(prompt, chosen, rejected),
            "_note": ",".join(notes),
        }

    out_features = {
        "prompt_messages": MESSAGES_FEATURE,
        "chosen": datasets.Value("string"),
        "rejected": datasets.Value("string"),
        "subset": datasets.Value("string"),
        "source_index": datasets.Value("int64"),
    }
    ds = check_rows(
        raw,
        parse,
        out_features,
        keep_columns,
        report,
        policy=cfg.bad_rows,
        dedup=cfg.dedup,
        num_proc=cfg.num_proc,
        desc=f"checking {schema} rows",
        json_columns=src.json_columns,
    )
    report.log(logger)
    return PreferenceData(dataset=ds, report=report, schema=schema)
