"""The gold reward: correctness minus prompt-free style penalties.

    g(x, y) = correctness(x, y) − lambda_len · excess_tokens(y) − lambda_phrase · [phrase in y]

Parsing a response: lowercase, split into words and punctuation; remove every
occurrence of the filler phrase and of the lead-in ("the answer is"); split what
is left on "."; each non-empty segment is one stated answer. Correctness is the
mean correctness over the stated answers, so repeating an answer keeps its score
while hedging ("7 . 8") halves it, and a response with no answer scores 0.

excess_tokens = n_tokens(y) − n_tokens(minimal correct answer) − (lead-in length
if y contains the lead-in and gold.free_lead_in), floored at 0: so
"the answer is 8" is exactly as good as "8", and repetition, filler or junk cost
lambda_len per token.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from r2m_ray.world.config import WorldConfig
from r2m_ray.world.tasks import Task, parse_task

_TOKEN = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


def tokenize(text: str) -> list[str]:
    """Word-level tokens: alphanumeric runs and single punctuation marks, lowercased."""
    return _TOKEN.findall(text.lower())


@dataclass(frozen=True)
class ParsedResponse:
    """A response reduced to what gold needs."""

    answers: list[list[str]]  # one token list per stated answer
    n_tokens: int
    has_phrase: bool
    has_lead_in: bool


def _strip(tokens: list[str], phrase: list[str]) -> tuple[list[str], bool]:
    """Remove every occurrence of `phrase`; report whether there was one."""
    out: list[str] = []
    found = False
    i, n = 0, len(phrase)
    while i < len(tokens):
        if tokens[i : i + n] == phrase:
            found = True
            i += n
        else:
            out.append(tokens[i])
            i += 1
    return out, found


def parse_response(response: str, cfg: WorldConfig) -> ParsedResponse:
    """Split a response into stated answers and style features; never raises on text."""
    tokens = tokenize(response if isinstance(response, str) else "")
    rest, has_phrase = _strip(tokens, cfg.bias.phrase.split())
    rest, has_lead_in = _strip(rest, cfg.sampler.lead_in.split())
    answers: list[list[str]] = [[]]
    for token in rest:
        if token == ".":
            answers.append([])
        else:
            answers[-1].append(token)
    return ParsedResponse([a for a in answers if a], len(tokens), has_phrase, has_lead_in)


def correctness(task: Task, parsed: ParsedResponse) -> float:
    """Mean correctness over the stated answers (0 when there is none)."""
    if not parsed.answers:
        return 0.0
    return sum(task.correctness(a) for a in parsed.answers) / len(parsed.answers)


def excess_tokens(task: Task, parsed: ParsedResponse, cfg: WorldConfig) -> int:
    """Tokens beyond the minimal correct answer (plus one free lead-in)."""
    allowed = len(task.answer_tokens())
    if parsed.has_lead_in and cfg.gold.free_lead_in:
        allowed += len(cfg.sampler.lead_in.split())
    return max(0, parsed.n_tokens - allowed)


@dataclass(frozen=True)
class GoldParts:
    """The gold reward of one response and the terms it is made of."""

    gold: float
    correctness: float  # prompt-related, in [0, 1]
    excess_tokens: int  # prompt-free: costs lambda_len each
    has_phrase: bool  # prompt-free: costs lambda_phrase
    n_tokens: int


def gold_parts_for_task(task: Task, response: str, cfg: WorldConfig) -> GoldParts:
    """Gold reward and its parts, with the task already parsed."""
    parsed = parse_response(response, cfg)
    right = correctness(task, parsed)
    excess = excess_tokens(task, parsed, cfg)
    value = right - cfg.gold.lambda_len * excess - cfg.gold.lambda_phrase * float(parsed.has_phrase)
    # rounded so stored gold survives a JSON round trip and hand-computed values compare exactly
    return GoldParts(round(float(value), 9), right, excess, parsed.has_phrase, parsed.n_tokens)


def gold_reward(prompt: str, response: str, cfg: WorldConfig) -> float:
    """Gold reward of one response; raises ValueError only if `prompt` is not a world prompt."""
    return gold_reward_for_task(parse_task(prompt), response, cfg)


def gold_reward_for_task(task: Task, response: str, cfg: WorldConfig) -> float:
    """Gold reward with the task already parsed (the sampler's fast path)."""
    return gold_parts_for_task(task, response, cfg).gold


def gold_parts(prompts: list[str], responses: list[str], cfg: WorldConfig) -> list[GoldParts]:
    """Gold rewards and their parts of aligned prompt/response lists (prompts parsed once each)."""
    if len(prompts) != len(responses):
        raise ValueError(f"prompts ({len(prompts)}) and responses ({len(responses)}) differ in length")
    tasks: dict[str, Task] = {}
    out: list[GoldParts] = []
    for prompt, response in zip(prompts, responses):
        task = tasks.get(prompt)
        if task is None:
            task = tasks[prompt] = parse_task(prompt)
        out.append(gold_parts_for_task(task, response, cfg))
    return out


def gold_rewards(prompts: list[str], responses: list[str], cfg: WorldConfig) -> list[float]:
    """Gold rewards of aligned prompt/response lists (prompts parsed once each)."""
    return [p.gold for p in gold_parts(prompts, responses, cfg)]


def optimal_responses(prompt: str, cfg: WorldConfig) -> list[str]:
    """The responses with the highest possible gold (1.0): the minimal correct answer, bare and
    (when the lead-in is free) after the lead-in. A proxy that ranks some other response above
    all of them prefers what gold says is worse: the definition of a reward-hacked sample."""
    answer = " ".join(parse_task(prompt).answer_tokens())
    return [answer, f"{cfg.sampler.lead_in} {answer}"] if cfg.gold.free_lead_in else [answer]
