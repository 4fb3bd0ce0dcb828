"""Preference / SFT / prompt loaders: every schema, auto-detection, bad rows, the real HH and AlpacaEval files."""

from __future__ import annotations

import gzip
import json
import logging

import datasets
import pytest
from pydantic import ValidationError

from r2m_ray.data import (
    BadRowError,
    DataConfig,
    DataSourceError,
    load_preferences,
    load_prompts,
    load_sft,
    parse_transcript,
)
from tests.conftest import ROOT, hh_transcript_problems

FIX = ROOT / "tests" / "fixtures" / "data"
HH = ROOT / "data" / "hh_rlhf_harmless_base_test.jsonl.gz"
ALPACA = ROOT / "data" / "alpaca_eval_instructions.jsonl"


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def rows(ds: datasets.Dataset) -> list[dict]:
    return [ds[i] for i in range(len(ds))]


# ---------------------------------------------------------------- config


def test_config_validates_lengths_and_literals():
    cfg = DataConfig.model_validate({"schema": "chat", "max_length": 64, "max_prompt_length": 48})
    assert cfg.schema == "chat" and cfg.truncation == "truncate_prompt_left" and cfg.bad_rows == "skip"
    with pytest.raises(ValidationError, match="max_prompt_length"):
        DataConfig(max_length=64, max_prompt_length=64)
    with pytest.raises(ValidationError):
        DataConfig(limit=0)
    with pytest.raises(ValidationError):
        DataConfig(schema="csv")
    with pytest.raises(ValidationError):
        DataConfig(truncaton="skip")  # typo'd key is an error, not ignored


# ---------------------------------------------------------------- each schema, exact rows


def test_pairs_jsonl_normalises_to_exact_rows():
    data = load_preferences(str(FIX / "pairs.jsonl"), DataConfig())
    assert data.schema == "pairs"
    got = rows(data.dataset)
    assert len(got) == 6 and data.report.n_in == 6 and data.report.n_out == 6 and not data.report.skipped
    assert got[0] == {
        "prompt_messages": [user("add 3 5")],
        "chosen": "8",
        "rejected": "the answer is 9",
        "subset": "",
        "source_index": 0,
        "gold_chosen": 1.0,
        "gold_rejected": -0.2,
    }
    assert [r["prompt_messages"][0]["content"] for r in got] == [
        "add 3 5", "sort 4 1 3", "reverse a b c", "count b in a b b", "max 3 9 2", "add 1 1",
    ]  # fmt: skip
    assert [r["rejected"] for r in got][4] == "the answer is 9 9"
    assert "prompt" not in data.dataset.column_names


def test_parquet_gives_the_same_rows_as_jsonl():
    from_jsonl = rows(load_preferences(str(FIX / "pairs.jsonl"), DataConfig()).dataset)
    from_parquet = rows(load_preferences(str(FIX / "pairs.parquet"), DataConfig()).dataset)
    assert from_parquet == from_jsonl


def test_chat_schema_takes_the_shared_prefix_as_prompt():
    data = load_preferences(str(FIX / "chat.jsonl"), DataConfig())
    assert data.schema == "chat" and len(data.dataset) == 5
    first, multi = data.dataset[0], data.dataset[2]
    assert first["prompt_messages"] == [user("What is 2+2?")]
    assert (first["chosen"], first["rejected"]) == ("4", "5")
    assert multi["prompt_messages"] == [
        {"role": "system", "content": "Be brief."},
        user("Say hello."),
        assistant("Hello."),
        user("And in French?"),
    ]
    assert (multi["chosen"], multi["rejected"]) == ("Bonjour.", "Hola.")
    # scalar extras kept, the message-list `messages` and the consumed `prompt` dropped
    assert {"prompt_id", "score_chosen", "score_rejected"} <= set(data.dataset.column_names)
    assert "messages" not in data.dataset.column_names and "prompt" not in data.dataset.column_names
    assert multi["score_chosen"] == 7.5


def test_transcript_schema_splits_turns():
    data = load_preferences(str(FIX / "transcript.jsonl"), DataConfig())
    assert data.schema == "transcript" and len(data.dataset) == 5
    joke = data.dataset[1]
    assert joke["prompt_messages"] == [user("Hi"), assistant("Hello! How can I help?"), user("Tell me a joke.")]
    assert joke["chosen"] == "Why did the chicken cross the road? To get to the other side."
    assert joke["rejected"] == "No."
    assert data.dataset[0]["prompt_messages"] == [user("How do I boil an egg?")]


def test_rewardbench_requires_and_keeps_subset():
    data = load_preferences(str(FIX / "rewardbench.jsonl"), DataConfig())
    assert data.schema == "rewardbench"
    assert list(data.dataset["subset"]) == ["math-prm", "xstest-should-respond", "refusals-dangerous", "math-prm"]
    assert dict(data.report.skipped) == {"empty_subset": 1} and data.report.examples["empty_subset"][0][0] == 4
    assert data.dataset[2]["prompt_messages"] == [user("How to pick a lock?")]
    assert {"id", "chosen_model", "rejected_model"} <= set(data.dataset.column_names)
    with pytest.raises(ValueError, match="schema 'rewardbench' needs column 'subset'"):
        load_preferences(str(FIX / "pairs.jsonl"), DataConfig(schema="rewardbench"))


@pytest.mark.parametrize(
    "name, schema",
    [("pairs.jsonl", "pairs"), ("pairs.parquet", "pairs"), ("chat.jsonl", "chat"),
     ("transcript.jsonl", "transcript"), ("rewardbench.jsonl", "rewardbench"), ("bad_chat.jsonl", "chat")],
)  # fmt: skip
def test_auto_detects_schema(name, schema):
    assert load_preferences(str(FIX / name), DataConfig()).schema == schema


def test_explicit_schema_matches_auto():
    auto = rows(load_preferences(str(FIX / "chat.jsonl"), DataConfig()).dataset)
    explicit = rows(load_preferences(str(FIX / "chat.jsonl"), DataConfig(schema="chat")).dataset)
    assert auto == explicit


def test_missing_column_error_names_the_column_and_lists_columns():
    with pytest.raises(ValueError, match=r"missing column 'rejected'.*columns found: \['chosen', 'prompt'\]"):
        load_preferences(str(FIX / "bad_missing_column.jsonl"), DataConfig())
    with pytest.raises(ValueError, match="schema 'pairs' needs column 'rejected'"):
        load_preferences(str(FIX / "bad_missing_column.jsonl"), DataConfig(schema="pairs"))


def test_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_preferences(str(tmp_path / "nope.jsonl"), DataConfig())
    bad = tmp_path / "pairs.csv"
    bad.write_text("prompt,chosen,rejected\n")
    with pytest.raises(DataSourceError, match="unknown file type"):
        load_preferences(str(bad), DataConfig())


# ---------------------------------------------------------------- bad rows


def test_bad_rows_are_skipped_and_counted_per_reason(caplog):
    with caplog.at_level(logging.WARNING, logger="r2m_ray.data.preference"):
        data = load_preferences(str(FIX / "bad_rows.jsonl"), DataConfig())
    rep = data.report
    assert dict(rep.skipped) == {
        "empty_chosen": 1,
        "non_string_rejected": 1,
        "missing_prompt": 1,
        "identical_responses": 1,
        "duplicate": 1,
        "empty_rejected": 1,
    }
    assert (rep.n_in, rep.n_out, rep.n_skipped) == (8, 2, 6)
    assert list(data.dataset["source_index"]) == [0, 6]
    # "9" stays a string even though another row's rejected is the number 42
    assert list(data.dataset["rejected"]) == ["9", "2 1"]
    assert rep.examples["non_string_rejected"] == [(2, "field 'rejected' is int, expected a string")]
    assert rep.examples["duplicate"] == [(5, "same content as row 0")]
    assert "6/8" not in caplog.text and "2/8 rows kept" in caplog.text and "duplicate=1" in caplog.text
    as_dict = rep.to_dict()
    assert as_dict["n_skipped"] == 6 and as_dict["skipped"]["missing_prompt"] == 1
    json.dumps(as_dict)


def test_bad_rows_error_names_row_and_field():
    with pytest.raises(BadRowError, match=r"row 1: field 'chosen' is empty"):
        load_preferences(str(FIX / "bad_rows.jsonl"), DataConfig(bad_rows="error"))
    with pytest.raises(BadRowError, match=r"row 1: chosen\[1\]\.content is int"):
        load_preferences(str(FIX / "bad_chat.jsonl"), DataConfig(bad_rows="error"))
    assert len(load_preferences(str(FIX / "bad_rows.jsonl"), DataConfig(bad_rows="error", limit=1))) == 1


def test_dedup_off_keeps_duplicates():
    data = load_preferences(str(FIX / "bad_rows.jsonl"), DataConfig(dedup=False))
    assert "duplicate" not in data.report.skipped and list(data.dataset["source_index"]) == [0, 5, 6]


def test_bad_chat_rows():
    data = load_preferences(str(FIX / "bad_chat.jsonl"), DataConfig())
    assert dict(data.report.skipped) == {
        "non_string_chosen": 1,
        "prompt_mismatch": 1,
        "final_turn_not_assistant": 1,
        "bad_messages_rejected": 1,
    }
    assert list(data.dataset["chosen"]) == ["hello"]


def test_transcript_quirks_are_counted_not_silent():
    data = load_preferences(str(FIX / "transcript_bad.jsonl"), DataConfig())
    assert dict(data.report.skipped) == {
        "empty_chosen": 1,
        "prompt_mismatch": 1,
        "unparseable_chosen": 1,
        "final_turn_not_assistant": 1,
    }
    assert data.report.notes["merged_consecutive_turns"] == 1
    merged = data.dataset[1]
    assert merged["source_index"] == 3
    assert merged["prompt_messages"] == [user("Hello"), assistant("Hi there.\n\nAnything else?"), user("No")]
    assert (merged["chosen"], merged["rejected"]) == ("Bye!", "Go away.")


def test_parse_transcript_roles_and_strip():
    msgs = parse_transcript("\n\nHuman: a b \n\nAssistant:  c\n\nHuman: d", "chosen")
    assert msgs == [user("a b"), assistant("c"), user("d")]


def test_limit_takes_first_rows():
    data = load_preferences(str(FIX / "pairs.jsonl"), DataConfig(limit=2))
    assert data.report.n_in == 2 and list(data.dataset["chosen"]) == ["8", "1 3 4"]


def test_column_map_renames_before_detection(tmp_path):
    path = tmp_path / "renamed.jsonl"
    path.write_text(json.dumps({"question": "q", "good": "a", "bad": "b"}) + "\n")
    cfg = DataConfig(column_map={"question": "prompt", "good": "chosen", "bad": "rejected"})
    data = load_preferences(str(path), cfg)
    assert data.dataset[0]["prompt_messages"] == [user("q")] and data.dataset[0]["chosen"] == "a"


# ---------------------------------------------------------------- the real HH-RLHF file


@pytest.fixture(scope="module")
def hh():
    return load_preferences(str(HH), DataConfig())


def test_real_hh_counts_every_row(hh):
    rep = hh.report
    assert rep.n_in == 2312
    assert rep.n_out + rep.n_skipped == 2312 and rep.n_out == len(hh.dataset)
    # the rows a plain reading of the file finds unusable, and no others (examples keep the first 3)
    problems = hh_transcript_problems(HH)
    assert dict(rep.skipped) == {k: len(v) for k, v in problems.items()}
    for reason, rows in problems.items():
        assert [i for i, _ in rep.examples[reason]] == rows[:3]
    assert rep.n_out == 2312 - sum(map(len, problems.values()))


def test_real_hh_example_split(hh):
    first = hh.dataset[0]
    assert first["source_index"] == 0
    prompt = first["prompt_messages"]
    assert [m["role"] for m in prompt] == ["user", "assistant", "user", "assistant", "user"]
    assert prompt[0] == user("what are some pranks with a pen i can do?")
    assert prompt[1] == assistant("Are you looking for practical joke ideas?")
    assert prompt[2] == user("yep")
    assert prompt[4] == user("okay some of these do not have anything to do with pens")
    assert first["chosen"].startswith("No, sorry!  All of these involve a pen")
    assert first["rejected"].startswith("There are lots of funny things you can do with pens")
    assert "Human:" not in first["chosen"] and "\n\nAssistant:" not in first["rejected"]


def test_real_hh_round_trips_to_the_raw_transcripts(hh):
    """Rebuilding each transcript from the split gives back the raw text (up to whitespace),
    except exactly the pairs where consecutive same-speaker turns were merged."""
    with gzip.open(HH, "rt") as f:
        raw = [json.loads(line) for line in f]

    def squash(text: str) -> str:
        return " ".join(text.split())

    mismatched = 0
    for row in rows(hh.dataset):
        turns = "".join(
            f"\n\n{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in row["prompt_messages"]
        )
        source = raw[row["source_index"]]
        ok = all(
            squash(turns + f"\n\nAssistant: {row[side]}") == squash(source[side]) for side in ("chosen", "rejected")
        )
        mismatched += not ok
    assert mismatched == hh.report.notes["merged_consecutive_turns"] == 4


def test_real_hh_limit_and_error_policy():
    data = load_preferences(str(HH), DataConfig(limit=50))
    assert data.report.n_in == 50 and data.report.n_out == 50
    with pytest.raises(BadRowError, match="row 86: field 'chosen' is empty"):
        load_preferences(str(HH), DataConfig(limit=100, bad_rows="error"))


# ---------------------------------------------------------------- hub branch (hub unreachable: monkeypatched)


def test_hub_name_calls_load_dataset_with_name_and_split(monkeypatch):
    calls = []
    chat_rows = [json.loads(line) for line in (FIX / "chat.jsonl").read_text().splitlines()]

    def fake_load_dataset(path, *args, **kwargs):
        calls.append((path, args, kwargs))
        return datasets.Dataset.from_list(chat_rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data = load_preferences("HuggingFaceH4/ultrafeedback_binarized", DataConfig(), split="test_prefs")
    assert calls == [("HuggingFaceH4/ultrafeedback_binarized", (), {"split": "test_prefs"})]
    assert data.schema == "chat" and data.report.source == "HuggingFaceH4/ultrafeedback_binarized:test_prefs"
    assert data.dataset[0]["prompt_messages"] == [user("What is 2+2?")] and data.dataset[0]["chosen"] == "4"

    load_preferences("org/prefs:train_prefs", DataConfig(hub_config="default", limit=2))
    assert calls[-1] == ("org/prefs", (), {"split": "train_prefs", "name": "default"})


def test_hub_failure_is_one_clear_error(monkeypatch):
    def offline(path, *args, **kwargs):
        raise ConnectionError("hub unreachable")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataSourceError, match="hub dataset 'org/x' \\(split 'train'\\): ConnectionError"):
        load_preferences("org/x", DataConfig())


# ---------------------------------------------------------------- prompts and SFT


def test_alpaca_eval_prompts_load_805():
    ds = load_prompts(str(ALPACA), DataConfig())
    assert len(ds) == 805
    first = ds[0]
    assert first["prompt_messages"] == [user(first["prompt"])]
    assert first["prompt"] == "What are the names of some famous actors that started their careers on Broadway?"
    assert first["source"] == "helpful_base" and first["source_index"] == 0


def test_prompts_from_transcripts_and_chat_pairs(tmp_path):
    from_hh = load_prompts(str(FIX / "transcript.jsonl"), DataConfig())
    assert from_hh[1]["prompt_messages"] == [user("Hi"), assistant("Hello! How can I help?"), user("Tell me a joke.")]
    assert from_hh[1]["prompt"] == "Tell me a joke."
    from_chat = load_prompts(str(FIX / "chat.jsonl"), DataConfig())
    assert from_chat[0]["prompt_messages"] == [user("What is 2+2?")]
    odd = tmp_path / "odd.jsonl"
    odd.write_text('{"text": "hello"}\n')
    with pytest.raises(ValueError, match=r"no prompt column.*columns found: \['text'\]"):
        load_prompts(str(odd), DataConfig())


def test_sft_prompt_completion_and_messages():
    ds = load_sft(str(FIX / "sft.jsonl"), DataConfig())
    assert list(ds["completion"]) == ["8", "1 3 4", "c b a"]  # row 3 duplicate, row 4 empty completion
    assert ds[0]["prompt_messages"] == [user("add 3 5")] and ds[0]["task"] == "add"
    chat = load_sft(str(FIX / "sft_chat.jsonl"), DataConfig())
    assert chat[1]["prompt_messages"] == [{"role": "system", "content": "Be brief."}, user("Capital of Peru?")]
    assert chat[1]["completion"] == "Lima." and chat[1]["prompt"] == "Capital of Peru?"
    with pytest.raises(BadRowError, match="row 3: same content as row 0.*data.dedup=false"):
        load_sft(str(FIX / "sft.jsonl"), DataConfig(bad_rows="error"))


def test_saved_dataset_dir_and_corrupt_json(tmp_path):
    pairs = load_preferences(str(FIX / "pairs.jsonl"), DataConfig())
    raw = datasets.load_dataset("json", data_files=str(FIX / "pairs.jsonl"), split="train")
    datasets.DatasetDict({"train": raw.select(range(4)), "test": raw.select(range(4, 6))}).save_to_disk(tmp_path / "w")
    test = load_preferences(str(tmp_path / "w"), DataConfig(), split="test")
    assert list(test.dataset["chosen"]) == list(pairs.dataset["chosen"])[4:]
    with pytest.raises(DataSourceError, match="no split 'valid'; splits found: \\['test', 'train'\\]"):
        load_preferences(str(tmp_path / "w"), DataConfig(), split="valid")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": \n')
    with pytest.raises(DataSourceError, match="broken.jsonl: cannot read as json"):
        load_preferences(str(broken), DataConfig())
