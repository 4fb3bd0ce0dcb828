"""A deterministic train/test split of one preference source, by a hash of each pair's prompt.

A pair goes to test when `sha256(salt | prompt messages as JSON)` read as a number in [0, 1)
is below `test_fraction`. The rule depends on nothing but the row's own prompt: the same pair
lands in the same split in every run, on every machine, whatever the file order or `data.limit`,
and pairs that share a dialogue prefix never straddle the split (no prompt leaks into test).
The assignment is written to the run directory (`data_split.json`) with every test prompt id.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from datasets import Dataset

RULE = "test iff int(sha256(salt + '|' + json(prompt_messages))[:16], 16) / 16**16 < test_fraction"


def prompt_id(prompt_messages: list[dict[str, str]], salt: str) -> str:
    """The hex SHA-256 of a prompt (its messages as canonical JSON), salted."""
    text = json.dumps(prompt_messages, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(f"{salt}|{text}".encode()).hexdigest()


def in_test(pid: str, test_fraction: float) -> bool:
    """Where a prompt id falls: the first 64 bits as a fraction of 2^64."""
    return int(pid[:16], 16) / 16**16 < test_fraction


def hashed_split(ds: Dataset, test_fraction: float, salt: str, source: str) -> tuple[set[int], dict[str, Any]]:
    """`source_index` of every test pair in a normalised preference dataset, and the record to keep.

    Raises ValueError if either side would be empty (too few rows for `test_fraction`).
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"data.test_fraction must be in (0, 1), got {test_fraction}")
    test_index: set[int] = set()
    test_ids: set[str] = set()
    train_prompts: set[str] = set()
    for messages, index in zip(ds["prompt_messages"], ds["source_index"]):
        pid = prompt_id(messages, salt)
        if in_test(pid, test_fraction):
            test_index.add(int(index))
            test_ids.add(pid)
        else:
            train_prompts.add(pid)
    n_test = len(test_index)
    if n_test == 0 or n_test == len(ds):
        raise ValueError(
            f"data.test_fraction={test_fraction} puts {n_test} of {len(ds)} pairs of {source} in test; "
            "both splits need pairs (more rows, or another fraction)"
        )
    record = {
        "source": source,
        "rule": RULE,
        "salt": salt,
        "test_fraction": test_fraction,
        "pairs": {"train": len(ds) - n_test, "test": n_test},
        "prompts": {"train": len(train_prompts), "test": len(test_ids)},
        "test_prompt_ids": sorted(test_ids),
        "test_source_indices": sorted(test_index),
    }
    return test_index, record
