"""Accounting for rows dropped on the way from a file to a batch, so no row disappears silently.

Every loader and tokeniser fills one `SkipReport`: rows in, rows out, a count per reason and a
few example row indices (with a one-line detail) per reason. `n_in == n_out + n_skipped` always.
Under `bad_rows="error"` the first bad row raises `BadRowError` instead, naming row and field.
`check_rows` is the one place where rows are parsed, checked, de-duplicated and counted.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import datasets

from r2m_ray.data.schemas import RowProblem

logger = logging.getLogger(__name__)

MAX_EXAMPLES = 3
BAD_ROWS_HINT = "set data.bad_rows=skip to skip and count such rows"
_CHECK_COLUMNS = ("_reason", "_detail", "_key", "_note")


class BadRowError(ValueError):
    """A row fails a check under `bad_rows="error"` (or `truncation="error"`); names row and field."""


@dataclass
class SkipReport:
    """Rows in/out, skip counts per reason, example indices, and non-dropping notes (e.g. repairs)."""

    source: str
    n_in: int = 0
    n_out: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[tuple[int, str]]] = field(default_factory=dict)
    notes: Counter = field(default_factory=Counter)

    @property
    def n_skipped(self) -> int:
        """Total rows dropped, over all reasons."""
        return sum(self.skipped.values())

    def add(self, reason: str, index: int, detail: str = "") -> None:
        """Count one dropped row under `reason`, keeping the first few indices as examples."""
        self.skipped[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < MAX_EXAMPLES:
            shown.append((int(index), detail))

    def check(self) -> None:
        """Assert the books balance; a mismatch is a bug in a loader, not in the data."""
        if self.n_in != self.n_out + self.n_skipped:
            raise AssertionError(f"{self.source}: n_in={self.n_in} != n_out={self.n_out} + skipped={self.n_skipped}")

    def summary(self) -> str:
        """One line: source, counts, and skip reasons with example rows."""
        parts = [f"{self.source}: {self.n_out}/{self.n_in} rows kept"]
        if self.skipped:
            reasons = ", ".join(
                f"{reason}={count} (e.g. rows {[i for i, _ in self.examples.get(reason, [])]})"
                for reason, count in sorted(self.skipped.items())
            )
            parts.append(f"skipped {self.n_skipped}: {reasons}")
        if self.notes:
            parts.append("notes: " + ", ".join(f"{k}={v}" for k, v in sorted(self.notes.items())))
        return "; ".join(parts)

    def log(self, log: logging.Logger | None = None) -> None:
        """Write the summary as one INFO line, or WARNING when rows were dropped."""
        (log or logger).log(logging.WARNING if self.skipped else logging.INFO, "%s", self.summary())

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (for metrics.jsonl and report.md)."""
        return {
            "source": self.source,
            "n_in": self.n_in,
            "n_out": self.n_out,
            "n_skipped": self.n_skipped,
            "skipped": dict(sorted(self.skipped.items())),
            "examples": {k: [{"row": i, "detail": d} for i, d in v] for k, v in sorted(self.examples.items())},
            "notes": dict(sorted(self.notes.items())),
        }

    def derive(self, stage: str) -> SkipReport:
        """A copy to extend in a later stage (e.g. tokenisation): its input is this report's output."""
        return SkipReport(
            source=f"{self.source} [{stage}]" if stage else self.source,
            n_in=self.n_in,
            n_out=self.n_out,
            skipped=Counter(self.skipped),
            examples={k: list(v) for k, v in self.examples.items()},
            notes=Counter(self.notes),
        )


def row_key(*parts: Any) -> str:
    """A short stable hash of a row's content, for de-duplication."""
    return hashlib.sha1(json.dumps(parts, ensure_ascii=False).encode()).hexdigest()


def _empty_value(name: str, feature: Any) -> Any:
    """Placeholder written for a bad row (dropped right after), typed to match the column."""
    if isinstance(feature, (datasets.List, datasets.Sequence, datasets.LargeList)):
        return []
    if isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint")):
        return -1
    if isinstance(feature, datasets.Value) and feature.dtype.startswith("float"):
        return float("nan")
    return ""


def check_rows(
    ds: datasets.Dataset,
    parse: Callable[[dict[str, Any]], dict[str, Any]],
    out_features: dict[str, Any],
    keep_columns: list[str],
    report: SkipReport,
    policy: str | dict[str, str],
    dedup: bool,
    num_proc: int | None = None,
    desc: str = "checking rows",
    hints: dict[str, str] | None = None,
    json_columns: frozenset[str] = frozenset(),
) -> datasets.Dataset:
    """Map `parse` over the rows, then drop (and count) or raise on bad rows and duplicates.

    `parse(row)` returns the `out_features` columns plus "_key" (content hash, for `dedup`) and
    optionally "_note" (comma-separated notes), or raises RowProblem. A `source_index` output
    column is filled with the row's position; when `source_index` is a kept input column, it
    names rows in messages instead. `policy` is "skip"/"error", or a dict reason -> policy with
    "*" as default. The check runs inside one batched datasets.map, so raw and normalised data
    are never both held as Python lists; the result keeps `keep_columns` + `out_features`.
    `json_columns` hold exact JSON text (see sources.Source) and are decoded before `parse`.
    """
    if len(ds) == 0:
        raise ValueError(f"{report.source}: no rows to check (the input is empty)")
    policies = {"*": policy} if isinstance(policy, str) else dict(policy)
    hints = {"*": BAD_ROWS_HINT, "duplicate": BAD_ROWS_HINT + " or data.dedup=false", **(hints or {})}
    empty = {name: _empty_value(name, f) for name, f in out_features.items() if name != "source_index"}

    def check_batch(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        out: dict[str, list] = {name: [] for name in (*out_features, *_CHECK_COLUMNS)}
        for pos, index in enumerate(indices):
            row = {name: values[pos] for name, values in batch.items()}
            for name in json_columns:
                row[name] = None if row[name] is None else json.loads(row[name])
            try:
                values, reason, detail = parse(row), "", ""
            except RowProblem as problem:
                values, reason, detail = empty, problem.reason, problem.detail
            for name in out_features:
                out[name].append(index if name == "source_index" else values[name])
            out["_reason"].append(reason)
            out["_detail"].append(detail)
            out["_key"].append(values.get("_key", ""))
            out["_note"].append(values.get("_note", ""))
        return out

    features = datasets.Features(
        {
            **{name: ds.features[name] for name in keep_columns},
            **out_features,
            **{name: datasets.Value("string") for name in _CHECK_COLUMNS},
        }
    )
    mapped = ds.map(
        check_batch,
        batched=True,
        with_indices=True,
        remove_columns=[c for c in ds.column_names if c not in keep_columns],
        features=features,
        num_proc=num_proc,
        desc=desc,
    )
    reasons, details, keys, notes = (list(mapped[c]) for c in _CHECK_COLUMNS)
    labels = list(mapped["source_index"]) if "source_index" in mapped.column_names else range(len(mapped))
    keep, first_seen = [], {}
    for pos, (reason, detail, key, label) in enumerate(zip(reasons, details, keys, labels)):
        if not reason and dedup and key:
            if key in first_seen:
                reason, detail = "duplicate", f"same content as row {first_seen[key]}"
            else:
                first_seen[key] = label
        if not reason:
            keep.append(pos)
            for note in filter(None, notes[pos].split(",")):
                report.notes[note] += 1
            continue
        if policies.get(reason, policies["*"]) == "error":
            raise BadRowError(f"{report.source}: row {label}: {detail} ({hints.get(reason, hints['*'])})")
        report.add(reason, label, detail)
    report.n_out = len(keep)
    report.check()
    if not keep:
        raise ValueError(f"no usable rows left: {report.summary()}")
    result = mapped.select(keep) if len(keep) < len(mapped) else mapped
    return result.remove_columns(list(_CHECK_COLUMNS))
