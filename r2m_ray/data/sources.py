"""Open a data source as a `datasets.Dataset`: a local file, a saved dataset directory, or a hub name.

Local files go through datasets' own json/parquet/arrow readers (never pickle). A hub name may
carry its split as `name:split`; otherwise the caller's split is used. Column renames
(`cfg.column_map`) and `cfg.limit` (first N rows) are applied here, before any schema logic,
so every loader sees the same rows in the same order.
"""

from __future__ import annotations

import bz2
import codecs
import gzip
import json
import logging
import lzma
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import datasets

from r2m_ray.data.config import DataConfig
from r2m_ray.data.schemas import is_list_feature

logger = logging.getLogger(__name__)

JSON_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz", ".json.bz2", ".jsonl.bz2", ".json.xz", ".jsonl.xz")
PARQUET_SUFFIXES = (".parquet",)
ARROW_SUFFIXES = (".arrow",)
LOCAL_SUFFIXES = JSON_SUFFIXES + PARQUET_SUFFIXES + ARROW_SUFFIXES


class DataSourceError(ValueError):
    """A source cannot be opened or read; the message names the source and what went wrong."""


def is_local(source: str) -> bool:
    """True for an existing path or anything that looks like one (suffix, ./, /, ~)."""
    return (
        os.path.exists(os.path.expanduser(source))
        or source.lower().endswith(LOCAL_SUFFIXES)
        or source.startswith(("/", "./", "../", "~"))
    )


def split_hub_source(source: str, default_split: str) -> tuple[str, str]:
    """'org/name:split' -> ('org/name', 'split'); hub names cannot contain ':' otherwise."""
    name, sep, split = source.partition(":")
    return (name, split) if sep and split else (source, default_split)


def _read_local(path: Path, split: str, cfg: DataConfig) -> datasets.Dataset:
    """Read one local file or saved-dataset directory with datasets' builders."""
    if path.is_dir():
        try:
            loaded = datasets.load_from_disk(str(path))
        except FileNotFoundError:
            raise DataSourceError(f"{path}: a directory but not a dataset saved with save_to_disk") from None
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataSourceError(f"{path}: no split '{split}'; splits found: {sorted(loaded)}")
            return loaded[split]
        return loaded
    name = path.name.lower()
    if name.endswith(ARROW_SUFFIXES):
        return datasets.Dataset.from_file(str(path))
    if name.endswith(PARQUET_SUFFIXES):
        builder = "parquet"
    elif name.endswith(JSON_SUFFIXES):
        builder = "json"
    else:
        raise DataSourceError(f"{path}: unknown file type; use one of {', '.join(LOCAL_SUFFIXES)}")
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cfg.cache_dir)
    except Exception as err:  # noqa: BLE001 -- datasets wraps reader errors several layers deep; surface the root cause
        root = err
        while root.__cause__ is not None:
            root = root.__cause__
        raise DataSourceError(f"{path}: cannot read as {builder}: {type(root).__name__}: {root}") from None


def _read_hub(name: str, split: str, cfg: DataConfig) -> datasets.Dataset:
    """datasets.load_dataset(name, split=...) with only the options the config sets."""
    kwargs = {"split": split}
    if cfg.hub_config is not None:
        kwargs["name"] = cfg.hub_config
    if cfg.hub_revision is not None:
        kwargs["revision"] = cfg.hub_revision
    if cfg.cache_dir is not None:
        kwargs["cache_dir"] = cfg.cache_dir
    try:
        loaded = datasets.load_dataset(name, **kwargs)
    except Exception as err:  # noqa: BLE001 -- offline, missing, gated: all reported the same way
        raise DataSourceError(f"hub dataset '{name}' (split '{split}'): {type(err).__name__}: {err}") from None
    if not isinstance(loaded, datasets.Dataset):
        raise DataSourceError(f"hub dataset '{name}' (split '{split}') gave {type(loaded).__name__}, not a Dataset")
    return loaded


@dataclass
class Source:
    """An opened source: the rows, a display name, and the columns that hold JSON text.

    `json_columns` are columns of mixed JSON types in a local file (e.g. one `rejected` that is
    a number): they hold each value's exact JSON text and are decoded per row by the loaders.
    """

    dataset: datasets.Dataset
    label: str
    json_columns: frozenset[str] = frozenset()

    def is_list_column(self, name: str) -> bool:
        """Whether a column holds lists (e.g. chat messages); JSON-text columns are sampled."""
        if name in self.json_columns:
            sample = self.dataset.select(range(min(100, len(self.dataset))))[name]
            return any(isinstance(json.loads(v), list) for v in sample if v is not None)
        return is_list_feature(self.dataset.features[name])

    def scalar_columns(self, exclude: set[str]) -> list[str]:
        """Columns holding one plain value per row (str/int/float/bool/label), minus `exclude`.

        Other columns (lists, dicts, mixed-type JSON) are dropped, and logged as dropped.
        """
        kept, dropped = [], []
        for name, feature in self.dataset.features.items():
            if name in exclude:
                continue
            if isinstance(feature, (datasets.Value, datasets.ClassLabel)) and name not in self.json_columns:
                kept.append(name)
            else:
                dropped.append(name)
        if dropped:
            logger.info(
                "%s: dropping non-scalar column(s) %s (only scalar extra columns are kept)", self.label, dropped
            )
        return kept


def _has_json(feature: Any) -> bool:
    """True when a feature is, or nests, datasets' mixed-type `Json` feature."""
    if isinstance(feature, datasets.Json):
        return True
    if isinstance(feature, (datasets.List, datasets.Sequence, datasets.LargeList)):
        return _has_json(feature.feature)
    if isinstance(feature, dict):
        return any(_has_json(f) for f in feature.values())
    if isinstance(feature, list):
        return any(_has_json(f) for f in feature)
    return False


def _open_text(path: Path) -> IO[str]:
    """Open a possibly compressed text file by its suffix."""
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    if name.endswith(".bz2"):
        return bz2.open(path, "rt", encoding="utf-8")
    if name.endswith(".xz"):
        return lzma.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _iter_json_rows(path: Path) -> Iterator[dict[str, Any]]:
    """Rows of a JSON-lines file or a JSON array, parsed by the json module (types kept exact)."""
    with _open_text(path) as f:
        head = f.read(1)
        while head and head.isspace():
            head = f.read(1)
        if head == "[":
            yield from json.loads(head + f.read())
            return
        f.seek(0)
        for line in f:
            if line.strip():
                yield json.loads(line)


def _exact_json_columns(ds: datasets.Dataset, path: Path) -> tuple[datasets.Dataset, frozenset[str]]:
    """Rebuild mixed-type columns from the file itself, as exact JSON text per row.

    datasets stores mixed-type JSON columns with its `Json` feature, which cannot tell the
    string "9" from the number 9 when reading back; a type check on such a column would be
    wrong in both directions, so those columns are re-read with the json module.
    """
    names = [name for name, feature in ds.features.items() if _has_json(feature)]
    if not names:
        return ds, frozenset()
    logger.info("%s: column(s) %s mix JSON types; re-reading them exactly", path, names)
    values: dict[str, list[str]] = {name: [] for name in names}
    for row in _iter_json_rows(path):
        for name in names:
            values[name].append(json.dumps(row.get(name), ensure_ascii=False))
    for name in names:
        if len(values[name]) != len(ds):
            raise DataSourceError(f"{path}: read {len(values[name])} rows for column '{name}', datasets read {len(ds)}")
        ds = ds.remove_columns(name).add_column(name, values[name], feature=datasets.Value("string"))
    return ds, frozenset(names)


def check_utf8(path: Path, chunk: int = 1 << 20) -> None:
    """Refuse a JSON file that is not UTF-8, naming the line of the first bad byte.

    Arrow's JSON reader keeps invalid bytes in string columns, which then fail row by row deep
    inside datasets; one streaming pass here (about 1 GB/s) says where instead."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line, offset = 1, 0
    opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}.get(path.suffix.lower(), open)
    with opener(path, "rb") as f:
        while block := f.read(chunk):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as err:
                # the decoder may hold up to 3 bytes of an earlier block; they were valid so far
                bad = max(0, err.start - len(err.object) + len(block))
                line += block[:bad].count(b"\n")
                raise DataSourceError(
                    f"{path}: not UTF-8 text (byte 0x{block[bad]:02x} at offset {offset + bad}, line {line}); "
                    "re-encode the file as UTF-8"
                ) from None
            line += block.count(b"\n")
            offset += len(block)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise DataSourceError(f"{path}: not UTF-8 text (the file ends inside a character)") from None


def open_source(source: str, cfg: DataConfig, split: str = "train") -> Source:
    """Open `source` (file, saved dataset dir, or hub name) after column renames and `cfg.limit`.

    `split` picks the split of a hub dataset or a saved DatasetDict; a single file is its
    own (only) split, so `split` is ignored for files.
    """
    if not isinstance(source, str) or not source.strip():
        raise DataSourceError(f"data source must be a non-empty path or hub name, got {source!r}")
    json_columns: frozenset[str] = frozenset()
    if is_local(source):
        path = Path(os.path.expanduser(source))
        if not path.exists():
            raise FileNotFoundError(f"data file not found: {source}")
        is_json = path.is_file() and path.name.lower().endswith(JSON_SUFFIXES)
        if is_json:
            check_utf8(path)
        ds, label = _read_local(path, split, cfg), str(path)
        if is_json:
            ds, json_columns = _exact_json_columns(ds, path)
    else:
        name, split = split_hub_source(source, split)
        ds, label = _read_hub(name, split, cfg), f"{name}:{split}"
    if cfg.column_map:
        missing = [old for old in cfg.column_map if old not in ds.column_names]
        if missing:
            raise DataSourceError(
                f"{label}: data.column_map renames missing column(s) {missing}; columns found: {ds.column_names}"
            )
        ds = ds.rename_columns(dict(cfg.column_map))
        json_columns = frozenset(cfg.column_map.get(c, c) for c in json_columns)
    if cfg.limit is not None and cfg.limit < len(ds):
        ds = ds.select(range(cfg.limit))
    return Source(ds, label, json_columns)
