"""Row-level parsing shared by the loaders: schema detection, message lists, HH transcripts.

Every parser either returns clean values or raises `RowProblem(reason, detail)`; the loaders
turn problems into counted skips or a `BadRowError`, so this module never decides policy.
Reasons are short snake_case keys (`empty_chosen`, `prompt_mismatch`, ...); details name the
field and what is wrong with it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

import datasets

Message = dict[str, str]

SCHEMA_COLUMNS: dict[str, tuple[str, ...]] = {
    "pairs": ("prompt", "chosen", "rejected"),
    "chat": ("chosen", "rejected"),
    "transcript": ("chosen", "rejected"),
    "rewardbench": ("prompt", "chosen", "rejected", "subset"),
}
ROLE_ALIASES = {"user": "user", "human": "user", "assistant": "assistant", "system": "system", "tool": "tool"}
# An HH-RLHF turn marker: "\n\nHuman:" / "\n\nAssistant:", or the same at the very start.
TRANSCRIPT_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")
TRANSCRIPT_ROLES = {"Human": "user", "Assistant": "assistant"}
# "Human:"/"Assistant:" without the "\n\n" of a real turn boundary: kept as text, counted as a note.
ROLE_MARKER = re.compile(r"\b(?:Human|Assistant):")


class RowProblem(ValueError):
    """One row fails a check: `reason` is the count key, `detail` the human-readable cause."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def text_field(row: dict[str, Any], name: str, value: Any = None) -> str:
    """The row's `name` as a non-empty string, else RowProblem missing_/non_string_/empty_<name>."""
    value = row.get(name) if value is None else value
    if value is None:
        raise RowProblem(f"missing_{name}", f"field '{name}' is missing")
    if not isinstance(value, str):
        raise RowProblem(f"non_string_{name}", f"field '{name}' is {type(value).__name__}, expected a string")
    if not value.strip():
        raise RowProblem(f"empty_{name}", f"field '{name}' is empty")
    return value


def message_list(value: Any, name: str) -> list[Message]:
    """Validate a chat message list ([{role, content}, ...]) and keep only role/content."""
    if value is None:
        raise RowProblem(f"missing_{name}", f"field '{name}' is missing")
    if not isinstance(value, list) or not value:
        raise RowProblem(f"bad_messages_{name}", f"field '{name}' is not a non-empty list of messages")
    messages = []
    for k, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise RowProblem(f"bad_messages_{name}", f"{name}[{k}] is {type(msg).__name__}, expected a message dict")
        role, content = msg.get("role"), msg.get("content")
        if not isinstance(role, str) or role.lower() not in ROLE_ALIASES:
            raise RowProblem(f"bad_messages_{name}", f"{name}[{k}].role is {role!r}, expected user/assistant/system")
        if not isinstance(content, str):
            raise RowProblem(
                f"non_string_{name}", f"{name}[{k}].content is {type(content).__name__}, expected a string"
            )
        messages.append({"role": ROLE_ALIASES[role.lower()], "content": content})
    return messages


def is_list_feature(feature: Any) -> bool:
    """True when a datasets feature holds one list per row (List/Sequence/LargeList)."""
    return isinstance(feature, (datasets.List, datasets.Sequence, datasets.LargeList, list))


def detect_schema(columns: Iterable[str], is_list: Callable[[str], bool], label: str) -> str:
    """Pick the preference schema from column names and whether `chosen` holds lists, or explain.

    `is_list(name)` tells whether a column holds message lists (see `Source.is_list_column`).
    """
    cols = set(columns)
    if "chosen" in cols and "rejected" in cols:
        if is_list("chosen"):
            return "chat"
        if "prompt" in cols:
            return "rewardbench" if "subset" in cols else "pairs"
        if "prompt_messages" in cols:  # already normalised (e.g. re-loaded output of this loader)
            return "pairs"
        return "transcript"
    missing = [c for c in ("chosen", "rejected") if c not in cols]
    raise ValueError(
        f"{label}: no preference schema fits: missing column {' and '.join(repr(m) for m in missing)}; "
        f"columns found: {sorted(cols)} (pairs needs prompt/chosen/rejected strings, chat needs chosen/rejected "
        "message lists, transcript needs chosen/rejected HH transcripts, "
        "rewardbench needs prompt/chosen/rejected/subset)"
    )


def check_schema_columns(schema: str, features: Iterable[str], label: str) -> None:
    """Raise naming the first missing column when an explicitly chosen schema cannot apply."""
    for col in SCHEMA_COLUMNS[schema]:
        if col == "prompt" and schema == "pairs" and "prompt_messages" in features:
            continue
        if col not in features:
            raise ValueError(f"{label}: schema '{schema}' needs column '{col}'; columns found: {sorted(features)}")


def parse_transcript(text: Any, name: str) -> list[Message]:
    """Split an HH transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...") into stripped messages."""
    text = text_field({}, name, text)
    parts = TRANSCRIPT_TURN.split(text)
    if parts[0].strip():
        raise RowProblem(f"unparseable_{name}", f"{name}: text before the first 'Human:' turn")
    if len(parts) < 3:
        raise RowProblem(f"unparseable_{name}", f"{name}: no 'Human:'/'Assistant:' turns")
    return [{"role": TRANSCRIPT_ROLES[s], "content": c.strip()} for s, c in zip(parts[1::2], parts[2::2])]


def merge_consecutive_turns(messages: list[Message]) -> tuple[list[Message], int]:
    """Merge runs of same-role turns into one message; returns (messages, number merged).

    HH-RLHF has a few stray "\\n\\nAssistant:" markers inside a reply, giving two assistant
    turns in a row; chat templates expect alternating roles, and the text itself is intact.
    """
    out: list[Message] = []
    merged = 0
    for msg in messages:
        if out and out[-1]["role"] == msg["role"]:
            out[-1] = {"role": msg["role"], "content": (out[-1]["content"] + "\n\n" + msg["content"]).strip()}
            merged += 1
        else:
            out.append(dict(msg))
    return out, merged


def split_final_turn(messages: list[Message], name: str) -> tuple[list[Message], str]:
    """(prompt messages, final assistant content), checking the final turn is the assistant's."""
    if messages[-1]["role"] != "assistant":
        raise RowProblem("final_turn_not_assistant", f"{name}: last turn is '{messages[-1]['role']}', not assistant")
    return messages[:-1], messages[-1]["content"]


def check_prompt(prompt: list[Message]) -> None:
    """A prompt needs at least one non-empty message and must not end on an assistant turn."""
    if not prompt or not any(m["content"].strip() for m in prompt):
        raise RowProblem("empty_prompt", "prompt has no non-empty message")
    if prompt[-1]["role"] == "assistant":
        raise RowProblem("prompt_ends_with_assistant", "prompt ends with an assistant turn (two replies in a row)")


def normalise_preference(row: dict[str, Any], schema: str) -> tuple[list[Message], str, str, str, list[str]]:
    """One raw row -> (prompt_messages, chosen, rejected, subset, notes) or RowProblem.

    Notes name harmless quirks worth counting (kept rows), e.g. merged_consecutive_turns.
    """
    notes: list[str] = []
    if schema == "pairs" and "prompt" not in row and "prompt_messages" in row:
        prompt = message_list(row["prompt_messages"], "prompt_messages")
        chosen, rejected = text_field(row, "chosen"), text_field(row, "rejected")
    elif schema in ("pairs", "rewardbench"):
        prompt = [{"role": "user", "content": text_field(row, "prompt")}]
        chosen, rejected = text_field(row, "chosen"), text_field(row, "rejected")
    elif schema == "chat":
        prompt_c, chosen = split_final_turn(message_list(row.get("chosen"), "chosen"), "chosen")
        prompt_r, rejected = split_final_turn(message_list(row.get("rejected"), "rejected"), "rejected")
        if prompt_c != prompt_r:
            raise RowProblem("prompt_mismatch", "chosen and rejected have different conversation prefixes")
        prompt = prompt_c
        if not prompt and isinstance(row.get("prompt"), str):
            prompt = [{"role": "user", "content": text_field(row, "prompt")}]
        chosen, rejected = text_field({}, "chosen", chosen), text_field({}, "rejected", rejected)
    elif schema == "transcript":
        # Split off the final turns before merging, so a stray marker never glues a prompt turn
        # onto a response: such pairs then show up as prompt_mismatch / prompt_ends_with_assistant.
        prompt, chosen = split_final_turn(parse_transcript(row.get("chosen"), "chosen"), "chosen")
        prompt_r, rejected = split_final_turn(parse_transcript(row.get("rejected"), "rejected"), "rejected")
        if prompt != prompt_r:
            raise RowProblem("prompt_mismatch", "chosen and rejected transcripts have different dialogue prefixes")
        chosen, rejected = text_field({}, "chosen", chosen), text_field({}, "rejected", rejected)
        if prompt and prompt[-1]["role"] == "assistant":
            raise RowProblem("prompt_ends_with_assistant", "two assistant turns before the final reply")
        prompt, merged = merge_consecutive_turns(prompt)
        if merged:
            notes.append("merged_consecutive_turns")
        if any(ROLE_MARKER.search(text) for text in (chosen, rejected)):
            notes.append("role_marker_inside_response")
    else:
        raise ValueError(f"unknown preference schema '{schema}'")
    check_prompt(prompt)
    if chosen == rejected:
        raise RowProblem("identical_responses", "chosen == rejected")
    subset = row.get("subset")
    if schema == "rewardbench":
        subset = text_field(row, "subset")
    return prompt, chosen, rejected, "" if subset is None else str(subset), notes


def prompt_from_row(row: dict[str, Any]) -> list[Message]:
    """The prompt of any supported row: a prompt string, a message list, a chat pair or a transcript."""
    if isinstance(row.get("prompt"), str):
        return [{"role": "user", "content": text_field(row, "prompt")}]
    for name in ("prompt_messages", "messages", "chosen"):
        value = row.get(name)
        if isinstance(value, list):
            msgs = message_list(value, name)
            prompt = msgs[:-1] if msgs[-1]["role"] == "assistant" else msgs
            check_prompt(prompt)
            return prompt
        if name == "chosen" and value is not None:
            msgs = parse_transcript(value, name)
            prompt, _ = merge_consecutive_turns(msgs[:-1] if msgs[-1]["role"] == "assistant" else msgs)
            check_prompt(prompt)
            return prompt
    raise RowProblem("missing_prompt", "no 'prompt', 'messages' or 'chosen' field to take a prompt from")


def sft_from_row(row: dict[str, Any]) -> tuple[list[Message], str]:
    """(prompt_messages, completion) from {prompt, completion|response} strings or a `messages` list."""
    if isinstance(row.get("messages"), list):
        prompt, completion = split_final_turn(message_list(row["messages"], "messages"), "messages")
        check_prompt(prompt)
        return prompt, text_field({}, "completion", completion)
    name = "completion" if "completion" in row or "response" not in row else "response"
    prompt = [{"role": "user", "content": text_field(row, "prompt")}]
    return prompt, text_field(row, name)


def last_user_text(prompt: list[Message]) -> str:
    """The content of the last user turn (the task text for single-turn prompts)."""
    return next((m["content"] for m in reversed(prompt) if m["role"] == "user"), "")
