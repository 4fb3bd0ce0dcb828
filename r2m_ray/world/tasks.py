"""Short verifiable tasks in a small whitespace-separated vocabulary.

Grammar (every token separated by one space, so a word-level tokenizer works):

    add A B                  -> A+B
    sort N1 N2 ...           -> the numbers ascending
    reverse L1 L2 ...        -> the letters in reverse order
    count X in L1 L2 ...     -> how many Li equal X
    max N1 N2 ... / min ...  -> the largest / smallest number

Correctness of an answer (a token list) is in [0, 1]: scalar tasks score 1 for
the exact number and 0 otherwise; list tasks score the fraction of positions
right, over the longer of answer and target (so a dropped item costs too).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from r2m_ray.world.config import FAMILIES, RangeConfig, WorldConfig

SCALAR_FAMILIES: frozenset[str] = frozenset({"add", "count", "max", "min"})


@dataclass(frozen=True)
class Task:
    """One prompt: its family, its item tokens and (for count) the letter to count."""

    family: str
    items: tuple[str, ...]
    target: str | None = None

    @property
    def prompt(self) -> str:
        """The prompt text, e.g. `count b in a b b`."""
        if self.family == "count":
            return f"count {self.target} in {' '.join(self.items)}"
        return f"{self.family} {' '.join(self.items)}"

    def answer_tokens(self) -> list[str]:
        """The minimal correct answer."""
        if self.family == "add":
            return [str(sum(int(x) for x in self.items))]
        if self.family == "sort":
            return [str(x) for x in sorted(int(x) for x in self.items)]
        if self.family == "reverse":
            return list(reversed(self.items))
        if self.family == "count":
            return [str(self.items.count(self.target))]
        if self.family == "max":
            return [str(max(int(x) for x in self.items))]
        if self.family == "min":
            return [str(min(int(x) for x in self.items))]
        raise ValueError(f"unknown task family {self.family!r}")

    def correctness(self, answer: list[str]) -> float:
        """Score an answer's tokens in [0, 1]; anything malformed scores 0."""
        target = self.answer_tokens()
        if not answer:
            return 0.0
        if self.family in SCALAR_FAMILIES:
            return 1.0 if len(answer) == 1 and _as_int(answer[0]) == int(target[0]) else 0.0
        right = sum(a == t for a, t in zip(answer, target))
        return right / max(len(answer), len(target))


def _as_int(token: str) -> int | None:
    return int(token) if token.isascii() and token.isdigit() else None


def parse_task(prompt: str) -> Task:
    """Recover the task from its prompt text; raises ValueError if it is not a world prompt."""
    tokens = prompt.lower().split()
    if not tokens or tokens[0] not in FAMILIES:
        raise ValueError(f"not a world prompt (unknown task family): {prompt!r}")
    family, rest = tokens[0], tokens[1:]
    if family == "count":
        if len(rest) < 3 or rest[1] != "in" or not all(_is_letter(t) for t in [rest[0], *rest[2:]]):
            raise ValueError(f"not a world prompt (expected 'count X in L1 L2 ...'): {prompt!r}")
        return Task("count", tuple(rest[2:]), rest[0])
    if family == "reverse":
        if not rest or not all(_is_letter(t) for t in rest):
            raise ValueError(f"not a world prompt (expected 'reverse L1 L2 ...'): {prompt!r}")
        return Task("reverse", tuple(rest))
    if not rest or any(_as_int(t) is None for t in rest) or (family == "add" and len(rest) != 2):
        raise ValueError(f"not a world prompt (expected '{family}' and numbers): {prompt!r}")
    return Task(family, tuple(str(int(t)) for t in rest))


def _is_letter(token: str) -> bool:
    return len(token) == 1 and token.isascii() and token.isalpha()


def task_family(name: str) -> tuple[str, bool]:
    """Split a mix entry like `sort.wide` into (family, uses ood_ranges)."""
    family, _, variant = name.partition(".")
    return family, variant == "wide"


def sample_task(family: str, ranges: RangeConfig, rng: np.random.Generator) -> Task:
    """Draw one task of `family` within `ranges`."""

    def numbers(n: int) -> tuple[str, ...]:
        return tuple(str(int(x)) for x in rng.integers(ranges.num_lo, ranges.num_hi + 1, size=n))

    length = int(rng.integers(ranges.list_min, ranges.list_max + 1))
    if family == "add":
        return Task("add", numbers(2))
    if family in ("sort", "max", "min"):
        return Task(family, numbers(length))
    letters = list(ranges.letters)
    if family == "reverse":
        return Task("reverse", tuple(letters[i] for i in rng.integers(0, len(letters), size=length)))
    if family == "count":
        # a small per-prompt alphabet makes counts of 0..length all common
        size = min(ranges.count_alphabet, len(letters))
        alphabet = [letters[i] for i in rng.choice(len(letters), size=size, replace=False)]
        items = tuple(alphabet[i] for i in rng.integers(0, size, size=length))
        return Task("count", items, alphabet[int(rng.integers(0, size))])
    raise ValueError(f"unknown task family {family!r}")


def vocabulary(cfg: WorldConfig) -> list[str]:
    """Every token a world text can contain (for tokenizer training)."""
    words: set[str] = set(FAMILIES) | {"in", "."}
    words |= set(cfg.sampler.lead_in.split()) | set(cfg.bias.phrase.split())
    top = 0
    for ranges in (cfg.tasks.ranges, cfg.tasks.ood_ranges):
        words |= set(ranges.letters)
        # add reaches 2·num_hi; near misses go near_miss_max beyond; counts reach list_max
        top = max(top, 2 * ranges.num_hi + cfg.sampler.near_miss_max, ranges.list_max + cfg.sampler.near_miss_max)
    words |= {str(i) for i in range(top + 1)}
    return sorted(words, key=lambda w: (w.isdigit(), int(w) if w.isdigit() else 0, w))
