"""Chat-template rendering and prompt/response tokenisation with an exact loss boundary.

The rendered prompt and the response (+ eos) are tokenised SEPARATELY and concatenated, so
`response_mask` marks exactly the response tokens: no retokenisation drift at the boundary.
Over-long examples follow `truncation`: "truncate_prompt_left" drops the oldest prompt tokens
(keeping bos), never response tokens, and an example whose response alone leaves no room for
a prompt is counted as `response_too_long` (or raised under bad_rows="error"); "skip" drops
and counts (`too_long`); "error" raises naming the row, field and lengths.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import jinja2

from r2m_ray.data.collate import PreferenceCollator, SFTCollator, stack_pair_batch
from r2m_ray.data.config import DataConfig
from r2m_ray.data.preference import PreferenceData
from r2m_ray.data.prompts import load_prompts
from r2m_ray.data.report import BadRowError, SkipReport, check_rows
from r2m_ray.data.schemas import RowProblem
from r2m_ray.data.sft import load_sft

# Collators and the SFT/prompt loaders are re-exported so the whole text->batch path is one import.
__all__ = [
    "EncodedSequence",
    "PreferenceCollator",
    "SFTCollator",
    "TokenizedPreferences",
    "encode_prompt",
    "encode_prompt_response",
    "load_prompts",
    "load_sft",
    "pad_token_id",
    "render_prompt",
    "stack_pair_batch",
    "tokenize_preferences",
    "tokenize_prompts",
    "tokenize_sft",
]

logger = logging.getLogger(__name__)

ROLE_NAMES = {"user": "User", "assistant": "Assistant", "system": "System", "tool": "Tool"}
TOKENS = datasets.List(datasets.Value("int32"))
MASK = datasets.List(datasets.Value("int8"))
LENGTH_HINTS = {
    "too_long": "set data.truncation=truncate_prompt_left or skip, or raise data.max_length",
    "response_too_long": "raise data.max_length, or set data.bad_rows=skip to skip and count such rows",
}


@dataclass
class EncodedSequence:
    """Token ids of prompt + response + eos, with 1s in `response_mask` on the response part."""

    input_ids: list[int]
    response_mask: list[int]
    prompt_tokens_dropped: int = 0

    @property
    def prompt_length(self) -> int:
        """Number of prompt tokens kept (the first 0s of `response_mask`)."""
        return len(self.response_mask) - sum(self.response_mask)


@dataclass
class TokenizedPreferences:
    """Token columns for both sides of each pair, the report of dropped rows, and the pad id."""

    dataset: datasets.Dataset
    report: SkipReport
    pad_token_id: int

    def __len__(self) -> int:
        return len(self.dataset)


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, falling back to eos (padding is masked out either way)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")
    return int(pad)


def render_prompt(tokenizer: Any, prompt_messages: Sequence[dict[str, str]]) -> str:
    """The prompt as text ending where the assistant's reply starts.

    Uses the tokenizer's chat template (with the generation prompt) when it has one, else a
    plain "User: ...\\nAssistant:" transcript. A template error raises RowProblem
    (reason `chat_template_error`), which the tokenize_* functions count or raise per bad_rows.
    """
    messages = [{"role": m["role"], "content": m["content"]} for m in prompt_messages]
    if getattr(tokenizer, "chat_template", None):
        try:
            return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except (jinja2.TemplateError, ValueError) as err:
            # e.g. templates that reject a system turn or non-alternating roles: a bad row, not a crash
            roles = "/".join(m["role"] for m in messages)
            raise RowProblem("chat_template_error", f"chat template rejected roles {roles}: {err}") from None
    lines = [f"{ROLE_NAMES.get(m['role'], m['role'].title())}: {m['content']}" for m in messages]
    return "\n".join(lines) + "\nAssistant:"


def _prompt_ids(tokenizer: Any, prompt_messages: Sequence[dict[str, str]]) -> list[int]:
    """Rendered prompt ids, with bos prepended when the tokenizer has one and the template did not add it."""
    ids = tokenizer(render_prompt(tokenizer, prompt_messages), add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos):
        ids = [bos, *ids]
    return ids


def _response_ids(tokenizer: Any, response: str) -> list[int]:
    """Response ids + eos, tokenised on their own so the prompt/response boundary is exact."""
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no eos token; responses must end with one")
    return [*tokenizer(response, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]


def _fit_prompt(
    prompt: list[int],
    longest_response: int,
    bos: int | None,
    max_length: int,
    max_prompt_length: int,
    truncation: str,
    name: str,
) -> list[int]:
    """The prompt ids that fit beside a response of `longest_response` tokens, or RowProblem."""
    if len(prompt) <= max_prompt_length and len(prompt) + longest_response <= max_length:
        return prompt
    detail = (
        f"{name}: prompt {len(prompt)} + response {longest_response} tokens exceed "
        f"max_length={max_length} (max_prompt_length={max_prompt_length})"
    )
    if truncation != "truncate_prompt_left":
        raise RowProblem("too_long", detail)
    head = 1 if bos is not None and prompt and prompt[0] == bos else 0
    tail = min(max_prompt_length, max_length - longest_response) - head
    if tail < 1:
        detail = (
            f"{name}: response has {longest_response} tokens (with eos); "
            f"max_length={max_length} leaves no room for a prompt"
        )
        raise RowProblem("response_too_long", detail)
    return prompt[:head] + prompt[len(prompt) - tail :]


def _join(prompt: list[int], response: list[int], dropped: int) -> EncodedSequence:
    return EncodedSequence([*prompt, *response], [0] * len(prompt) + [1] * len(response), dropped)


def encode_prompt_response(
    tokenizer: Any,
    prompt_messages: Sequence[dict[str, str]],
    response: str,
    max_length: int,
    max_prompt_length: int,
    truncation: str = "truncate_prompt_left",
) -> EncodedSequence | None:
    """Tokenise prompt and response (+eos) separately and concatenate; None when skipped.

    Returns None for an over-long example under truncation="skip", or under
    "truncate_prompt_left" when the response alone leaves no room for a prompt token;
    truncation="error" raises BadRowError with the lengths (RowProblem if the template fails).
    """
    prompt, resp = _prompt_ids(tokenizer, prompt_messages), _response_ids(tokenizer, response)
    try:
        fitted = _fit_prompt(
            prompt, len(resp), tokenizer.bos_token_id, max_length, max_prompt_length, truncation, "response"
        )
    except RowProblem as problem:
        if truncation == "error":
            raise BadRowError(f"{problem.detail} ({LENGTH_HINTS['too_long']})") from None
        return None
    return _join(fitted, resp, len(prompt) - len(fitted))


def encode_prompt(
    tokenizer: Any,
    prompt_messages: Sequence[dict[str, str]],
    max_prompt_length: int,
    truncation: str = "truncate_prompt_left",
) -> list[int] | None:
    """Prompt ids for generation (bos + rendered prompt), fitted to `max_prompt_length` like above."""
    prompt = _prompt_ids(tokenizer, prompt_messages)
    try:
        return _fit_prompt(
            prompt, 0, tokenizer.bos_token_id, max_prompt_length + 1, max_prompt_length, truncation, "prompt"
        )
    except RowProblem as problem:
        if truncation == "error":
            raise BadRowError(f"{problem.detail} ({LENGTH_HINTS['too_long']})") from None
        return None


def _length_options(cfg: DataConfig) -> dict[str, Any]:
    """check_rows options for tokenisation: over-long rows follow `truncation`, the rest `bad_rows`."""
    return {
        "policy": {"*": cfg.bad_rows, "too_long": "error" if cfg.truncation == "error" else "skip"},
        "dedup": False,
        "num_proc": cfg.num_proc,
        "hints": LENGTH_HINTS,
    }


def _kept_scalars(ds: datasets.Dataset, drop: set[str]) -> list[str]:
    return [n for n, f in ds.features.items() if n not in drop and isinstance(f, (datasets.Value, datasets.ClassLabel))]


def tokenize_preferences(
    data: PreferenceData, tokenizer: Any, cfg: DataConfig, keep_text: bool = False
) -> TokenizedPreferences:
    """Tokenise both sides of every pair (one datasets.map); over-long rows are counted in the report.

    Columns: chosen_input_ids, chosen_response_mask, rejected_input_ids, rejected_response_mask,
    plus the scalar columns (subset, source_index, gold_*, weight, ...). Both sides share one
    prompt truncation (fitted to the longer response), so the pair always has the same prompt.
    `keep_text` also keeps the chosen/rejected strings.
    """
    # Cumulative: n_in is the source's row count, skips include those made while loading.
    report = data.report.derive("tokenize")
    bos = tokenizer.bos_token_id

    def parse(row: dict[str, Any]) -> dict[str, Any]:
        prompt = _prompt_ids(tokenizer, row["prompt_messages"])
        chosen, rejected = _response_ids(tokenizer, row["chosen"]), _response_ids(tokenizer, row["rejected"])
        longest = max(len(chosen), len(rejected))
        fitted = _fit_prompt(
            prompt, longest, bos, cfg.max_length, cfg.max_prompt_length, cfg.truncation, "chosen/rejected"
        )
        out = {}
        for side, resp in (("chosen", chosen), ("rejected", rejected)):
            enc = _join(fitted, resp, len(prompt) - len(fitted))
            out[f"{side}_input_ids"], out[f"{side}_response_mask"] = enc.input_ids, enc.response_mask
        out["_note"] = "prompt_truncated" if len(fitted) < len(prompt) else ""
        return out

    drop = {"prompt_messages"} | (set() if keep_text else {"chosen", "rejected"})
    out_features = {
        "chosen_input_ids": TOKENS,
        "chosen_response_mask": MASK,
        "rejected_input_ids": TOKENS,
        "rejected_response_mask": MASK,
    }
    keep = _kept_scalars(data.dataset, drop)
    ds = check_rows(data.dataset, parse, out_features, keep, report, desc="tokenizing pairs", **_length_options(cfg))
    report.log(logger)
    return TokenizedPreferences(dataset=ds, report=report, pad_token_id=pad_token_id(tokenizer))


def tokenize_sft(ds: datasets.Dataset, tokenizer: Any, cfg: DataConfig) -> datasets.Dataset:
    """input_ids + response_mask (loss only on the completion + eos) for a `load_sft` dataset."""
    report = SkipReport(source="sft [tokenize]", n_in=len(ds))

    def parse(row: dict[str, Any]) -> dict[str, Any]:
        prompt, resp = _prompt_ids(tokenizer, row["prompt_messages"]), _response_ids(tokenizer, row["completion"])
        fitted = _fit_prompt(
            prompt,
            len(resp),
            tokenizer.bos_token_id,
            cfg.max_length,
            cfg.max_prompt_length,
            cfg.truncation,
            "completion",
        )
        enc = _join(fitted, resp, len(prompt) - len(fitted))
        return {
            "input_ids": enc.input_ids,
            "response_mask": enc.response_mask,
            "_note": "prompt_truncated" if enc.prompt_tokens_dropped else "",
        }

    drop = {"prompt_messages", "prompt", "completion"}
    out_features = {"input_ids": TOKENS, "response_mask": MASK}
    keep = _kept_scalars(ds, drop)
    out = check_rows(ds, parse, out_features, keep, report, desc="tokenizing sft", **_length_options(cfg))
    report.log(logger)
    return out


def tokenize_prompts(ds: datasets.Dataset, tokenizer: Any, cfg: DataConfig) -> datasets.Dataset:
    """Add `prompt_input_ids` (bos + rendered prompt, left-truncated to max_prompt_length) for generation."""
    report = SkipReport(source="prompts [tokenize]", n_in=len(ds))

    def parse(row: dict[str, Any]) -> dict[str, Any]:
        prompt = _prompt_ids(tokenizer, row["prompt_messages"])
        fitted = _fit_prompt(
            prompt,
            0,
            tokenizer.bos_token_id,
            cfg.max_prompt_length + 1,
            cfg.max_prompt_length,
            cfg.truncation,
            "prompt",
        )
        return {"prompt_input_ids": fitted, "_note": "prompt_truncated" if len(fitted) < len(prompt) else ""}

    keep = [c for c in ds.column_names if c != "prompt_input_ids"]
    out_features = {"prompt_input_ids": TOKENS}
    out = check_rows(ds, parse, out_features, keep, report, desc="tokenizing prompts", **_length_options(cfg))
    report.log(logger)
    return out
