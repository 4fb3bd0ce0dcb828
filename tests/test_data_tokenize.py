"""Tokenisation boundary, truncation policies, collators and pair stacking, on a word-level test tokenizer."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from r2m_ray.data import (
    BadRowError,
    DataConfig,
    PreferenceCollator,
    SFTCollator,
    encode_prompt,
    encode_prompt_response,
    load_preferences,
    load_prompts,
    load_sft,
    render_prompt,
    stack_pair_batch,
    tokenize_preferences,
    tokenize_prompts,
    tokenize_sft,
)
from tests.conftest import ROOT

FIX = ROOT / "tests" / "fixtures" / "data"
HH = ROOT / "data" / "hh_rlhf_harmless_base_test.jsonl.gz"
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)


def strings_in(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    return [s for v in value for s in strings_in(v)] if isinstance(value, list) else []


def make_tokenizer(chat_template: str | None = TEMPLATE) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the fixture texts: one id per whitespace-separated word."""
    words = set("<user> <assistant> <system> w0 w1 w2 w3 w4 w5 w6 w7 w8 w9 User: Assistant: System:".split())
    for path in FIX.glob("*.jsonl"):
        for line in path.read_text().splitlines():
            words |= {w for text in strings_in(json.loads(line)) for w in text.split()}
    vocab = {tok: i for i, tok in enumerate(SPECIALS + sorted(words - set(SPECIALS)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    if chat_template:
        fast.chat_template = chat_template
    return fast


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return make_tokenizer()


def words(tokenizer, ids) -> list[str]:
    return tokenizer.convert_ids_to_tokens(list(ids))


def test_render_prompt_template_and_fallback(tok):
    msgs = [{"role": "system", "content": "w1"}, {"role": "user", "content": "w2 w3"}]
    assert render_prompt(tok, msgs) == "<system> w1 <user> w2 w3 <assistant> "
    plain = make_tokenizer(chat_template=None)
    assert render_prompt(plain, msgs) == "System: w1\nUser: w2 w3\nAssistant:"


def test_boundary_is_exact(tok):
    prompt = [{"role": "user", "content": "w1 w2 w3"}]
    enc = encode_prompt_response(tok, prompt, "w7 w8", max_length=32, max_prompt_length=16)
    n_prompt = enc.prompt_length
    assert enc.input_ids[0] == tok.bos_token_id and enc.input_ids[-1] == tok.eos_token_id
    assert tok.decode(enc.input_ids[1:n_prompt]) == " ".join(render_prompt(tok, prompt).split())
    assert tok.decode(enc.input_ids[n_prompt:]) == "w7 w8 <eos>"
    assert enc.response_mask == [0] * 6 + [1] * 3  # bos <user> w1 w2 w3 <assistant> | w7 w8 <eos>
    assert len(enc.input_ids) == len(enc.response_mask) == 9 and enc.prompt_tokens_dropped == 0


def test_no_second_bos_when_template_adds_it():
    tok = make_tokenizer(chat_template="<bos> " + TEMPLATE)
    enc = encode_prompt_response(tok, [{"role": "user", "content": "w1"}], "w2", 32, 16)
    assert words(tok, enc.input_ids) == ["<bos>", "<user>", "w1", "<assistant>", "w2", "<eos>"]


def test_truncate_prompt_left_keeps_bos_tail_and_response(tok):
    prompt = [{"role": "user", "content": "w0 w1 w2 w3 w4 w5 w6 w7 w8 w9"}]  # bos + 12 prompt tokens = 13
    enc = encode_prompt_response(tok, prompt, "w5 w6 w7", max_length=10, max_prompt_length=8)
    # response + eos = 4 tokens, so the prompt gets min(8, 10 - 4) = 6: bos + its last 5 tokens
    assert words(tok, enc.input_ids) == ["<bos>", "w6", "w7", "w8", "w9", "<assistant>", "w5", "w6", "w7", "<eos>"]
    assert enc.response_mask == [0] * 6 + [1] * 4 and enc.prompt_tokens_dropped == 7
    # max_prompt_length binds even when the total would fit
    enc = encode_prompt_response(tok, prompt, "w5", max_length=64, max_prompt_length=4)
    assert words(tok, enc.input_ids) == ["<bos>", "w8", "w9", "<assistant>", "w5", "<eos>"]


def test_skip_error_and_response_too_long(tok):
    prompt = [{"role": "user", "content": "w0 w1 w2 w3 w4 w5"}]
    assert encode_prompt_response(tok, prompt, "w1", 6, 4, truncation="skip") is None
    with pytest.raises(BadRowError, match=r"prompt 9 \+ response 2 tokens exceed max_length=6"):
        encode_prompt_response(tok, prompt, "w1", 6, 4, truncation="error")
    # the response alone (5 + eos) leaves no room beside bos: never cut the response
    assert encode_prompt_response(tok, prompt, "w1 w2 w3 w4 w5", 7, 4) is None
    assert encode_prompt_response(tok, prompt, "w1 w2 w3 w4", 7, 4).input_ids[-5:] == tok.convert_tokens_to_ids(
        ["w1", "w2", "w3", "w4", "<eos>"]
    )


def test_tokenize_preferences_pairs(tok):
    data = load_preferences(str(FIX / "pairs.jsonl"), DataConfig())
    out = tokenize_preferences(data, tok, DataConfig())
    ds = out.dataset
    assert set(ds.column_names) == {
        "chosen_input_ids", "chosen_response_mask", "rejected_input_ids", "rejected_response_mask",
        "subset", "source_index", "gold_chosen", "gold_rejected",
    }  # fmt: skip
    row = ds[0]
    assert words(tok, row["chosen_input_ids"]) == ["<bos>", "<user>", "add", "3", "5", "<assistant>", "8", "<eos>"]
    assert row["chosen_response_mask"] == [0] * 6 + [1, 1]
    assert words(tok, row["rejected_input_ids"])[6:] == ["the", "answer", "is", "9", "<eos>"]
    assert row["chosen_input_ids"][:6] == row["rejected_input_ids"][:6] and row["gold_rejected"] == -0.2
    assert out.report.n_out == 6 and out.pad_token_id == tok.pad_token_id


def test_tokenize_preferences_over_long_policies(tok):
    data = load_preferences(str(FIX / "pairs.jsonl"), DataConfig())
    # prompt = bos <user> words <assistant>; a response costs its words + eos. Over 12 tokens:
    # row 2 "reverse a b c" (7) + "well , c a b" (6) = 13 and row 4 "max 3 9 2" (7) + "the answer is 9 9" (6) = 13
    short = DataConfig(max_length=12, max_prompt_length=10, truncation="skip")
    out = tokenize_preferences(data, tok, short)
    assert dict(out.report.skipped) == {"too_long": 2} and [i for i, _ in out.report.examples["too_long"]] == [2, 4]
    assert out.report.n_in == 6 and out.report.n_out == 4 and list(out.dataset["source_index"]) == [0, 1, 3, 5]
    with pytest.raises(
        BadRowError, match="row 2: chosen/rejected: prompt 7 \\+ response 6 tokens exceed max_length=12"
    ):
        tokenize_preferences(data, tok, DataConfig(max_length=12, max_prompt_length=10, truncation="error"))
    left = tokenize_preferences(data, tok, DataConfig(max_length=12, max_prompt_length=10))
    assert left.report.n_out == 6 and left.report.notes["prompt_truncated"] == 2
    row = left.dataset[4]
    # both sides keep the SAME prompt, fitted to the longer response: 12 - 6 = bos + last 5 prompt tokens
    assert words(tok, row["chosen_input_ids"]) == ["<bos>", "max", "3", "9", "2", "<assistant>", "9", "<eos>"]
    assert row["chosen_input_ids"][:6] == row["rejected_input_ids"][:6]
    assert len(row["rejected_input_ids"]) == 12 and sum(row["rejected_response_mask"]) == 6


def test_real_hh_tokenises_within_limits(tok):
    data = load_preferences(str(HH), DataConfig(limit=300))
    cfg = DataConfig(max_length=64, max_prompt_length=48)
    out = tokenize_preferences(data, tok, cfg)
    rep = out.report
    assert rep.n_in == 300 and rep.n_out + rep.n_skipped == 300
    assert set(rep.skipped) <= {"empty_chosen", "response_too_long"} and rep.skipped["response_too_long"] > 0
    assert rep.notes["prompt_truncated"] > 0
    for row in out.dataset.select(range(50)):
        for side in ("chosen", "rejected"):
            ids, mask = row[f"{side}_input_ids"], row[f"{side}_response_mask"]
            assert len(ids) <= 64 and ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
            n_prompt = mask.index(1)
            assert n_prompt <= 48 and mask == [0] * n_prompt + [1] * (len(ids) - n_prompt)


def test_preference_collator_right_and_left_padding():
    rows = [
        {"chosen_input_ids": [5, 6, 7], "chosen_response_mask": [0, 1, 1], "rejected_input_ids": [5, 8],
         "rejected_response_mask": [0, 1], "weight": 0.5, "source_index": 3, "subset": "a"},
        {"chosen_input_ids": [5, 9], "chosen_response_mask": [0, 1], "rejected_input_ids": [5, 9, 9, 9],
         "rejected_response_mask": [0, 1, 1, 1], "weight": 2.0, "source_index": 7, "subset": "b"},
    ]  # fmt: skip
    right = PreferenceCollator(pad_token_id=0)(rows)
    assert right["chosen_input_ids"].tolist() == [[5, 6, 7, 0], [5, 9, 0, 0]]
    assert right["chosen_attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0]]
    assert right["rejected_input_ids"].tolist() == [[5, 8, 0, 0], [5, 9, 9, 9]]
    assert right["rejected_response_mask"].tolist() == [[0, 1, 0, 0], [0, 1, 1, 1]]
    assert right["chosen_input_ids"].dtype == torch.long
    assert right["weight"].dtype == torch.float32 and right["weight"].tolist() == [0.5, 2.0]
    assert right["source_index"].tolist() == [3, 7] and "subset" not in right
    left = PreferenceCollator(pad_token_id=1, padding_side="left", keep_strings=True)(rows)
    assert left["chosen_input_ids"].tolist() == [[1, 5, 6, 7], [1, 1, 5, 9]]
    assert left["chosen_attention_mask"].tolist() == [[0, 1, 1, 1], [0, 0, 1, 1]]
    assert left["chosen_response_mask"].tolist() == [[0, 0, 1, 1], [0, 0, 0, 1]]
    assert left["subset"] == ["a", "b"]
    ids, attn, resp = stack_pair_batch(right)
    assert ids.shape == attn.shape == resp.shape == (4, 4)
    assert ids.tolist() == [[5, 6, 7, 0], [5, 9, 0, 0], [5, 8, 0, 0], [5, 9, 9, 9]]  # chosen rows first
    assert attn.sum().item() == 3 + 2 + 2 + 4 and resp.sum().item() == 2 + 1 + 1 + 3


def test_stack_pair_batch_pads_mismatched_sides():
    batch = {
        "chosen_input_ids": torch.tensor([[4, 5]]), "chosen_attention_mask": torch.ones(1, 2, dtype=torch.long),
        "chosen_response_mask": torch.tensor([[0, 1]]), "rejected_input_ids": torch.tensor([[4, 6, 6]]),
        "rejected_attention_mask": torch.ones(1, 3, dtype=torch.long), "rejected_response_mask": torch.tensor([[0, 1, 1]]),
    }  # fmt: skip
    ids, attn, resp = stack_pair_batch(batch, pad_token_id=9, padding_side="left")
    assert ids.tolist() == [[9, 4, 5], [4, 6, 6]] and attn.tolist() == [[0, 1, 1], [1, 1, 1]]
    assert resp.tolist() == [[0, 0, 1], [0, 1, 1]]


def test_collated_tokenized_pairs_end_to_end(tok):
    out = tokenize_preferences(load_preferences(str(FIX / "chat.jsonl"), DataConfig()), tok, DataConfig())
    batch = PreferenceCollator(out.pad_token_id)([out.dataset[i] for i in range(len(out))])
    ids, attn, resp = stack_pair_batch(batch, out.pad_token_id)
    assert ids.shape[0] == 10 and (ids[attn == 0] == tok.pad_token_id).all()
    # every sequence's response tokens end with eos, and the masks agree with attention
    assert ((resp == 1) & (attn == 0)).sum() == 0
    last = attn.sum(1) - 1
    assert (ids[torch.arange(10), last] == tok.eos_token_id).all()
    assert {"score_chosen", "score_rejected"} <= set(batch)


def test_sft_tokenize_and_collate(tok):
    ds = tokenize_sft(load_sft(str(FIX / "sft.jsonl"), DataConfig()), tok, DataConfig())
    assert set(ds.column_names) == {"input_ids", "response_mask", "task", "source_index"}
    assert words(tok, ds[1]["input_ids"]) == [
        "<bos>",
        "<user>",
        "sort",
        "4",
        "1",
        "3",
        "<assistant>",
        "1",
        "3",
        "4",
        "<eos>",
    ]
    batch = SFTCollator(tok.pad_token_id)([ds[0], ds[1]])
    assert batch["input_ids"].shape == (2, 11)
    assert batch["labels"][0].tolist() == [-100] * 6 + tok.convert_tokens_to_ids(["8", "<eos>"]) + [-100] * 3
    assert batch["attention_mask"][0].tolist() == [1] * 8 + [0] * 3


def test_tokenize_prompts_truncates_left(tok):
    ds = load_prompts(str(FIX / "transcript.jsonl"), DataConfig())
    out = tokenize_prompts(ds, tok, DataConfig(max_length=16, max_prompt_length=6))
    assert all(len(ids) <= 6 and ids[0] == tok.bos_token_id for ids in out["prompt_input_ids"])
    assert words(tok, out[2]["prompt_input_ids"])[-3:] == ["of", "Peru?", "<assistant>"]
    assert encode_prompt(tok, [{"role": "user", "content": "w1"}], 8) == tok.convert_tokens_to_ids(
        ["<bos>", "<user>", "w1", "<assistant>"]
    )
    assert encode_prompt(tok, [{"role": "user", "content": "w1 w2 w3 w4 w5 w6"}], 4, truncation="skip") is None


def test_chat_template_errors_are_counted_rows(tok):
    strict = make_tokenizer(
        chat_template="{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}"
        "{% endif %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}<assistant> {% endif %}"
    )
    data = load_preferences(str(FIX / "chat.jsonl"), DataConfig())
    out = tokenize_preferences(data, strict, DataConfig())
    assert (
        dict(out.report.skipped) == {"chat_template_error": 1} and out.report.examples["chat_template_error"][0][0] == 2
    )
    assert out.report.n_out == 4
    with pytest.raises(BadRowError, match="row 2: chat template rejected roles system/user/assistant/user"):
        tokenize_preferences(data, strict, DataConfig(bad_rows="error"))
