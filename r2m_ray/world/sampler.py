"""Seeded response sampler: correct, near-miss and wrong answers with style material.

A response is `[lead-in] answer { . [lead-in] answer } [. filler-phrase]`: the
lead-in ("the answer is") with p_lead_in, 1..max_repeats extra copies of the
answer with p_repeat, the filler phrase at the end with p_filler. Answer
quality is drawn from p_correct / p_partial (a near miss) / p_wrong.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from r2m_ray.world.config import WorldConfig
from r2m_ray.world.tasks import SCALAR_FAMILIES, Task

Quality = Literal["correct", "partial", "wrong"]
QUALITIES: tuple[Quality, ...] = ("correct", "partial", "wrong")


def pick(cdf: list[float], rng: np.random.Generator) -> int:
    """Index drawn from a cumulative distribution (much faster than Generator.choice with p)."""
    u = rng.random() * cdf[-1]
    for index, edge in enumerate(cdf):
        if u < edge:
            return index
    return len(cdf) - 1


def lazy_answer(task: Task) -> list[str]:
    """The systematic mistake: the input copied back (sort, reverse), the first number (add, max,
    min), or every letter counted (count). It may by chance be right (a sorted input, say)."""
    if task.family in ("sort", "reverse"):
        return list(task.items)
    if task.family == "count":
        return [str(len(task.items))]
    return [task.items[0]]


class ResponseSampler:
    """Draws responses for tasks from one numpy Generator (so splits are reproducible)."""

    def __init__(self, cfg: WorldConfig, rng: np.random.Generator) -> None:
        self.cfg = cfg
        self.rng = rng
        s = cfg.sampler
        weights = np.array([s.p_correct, s.p_partial, s.p_wrong], dtype=float)
        self._quality_cdf = np.cumsum(weights / weights.sum()).tolist()
        sft = cfg.sft
        sft_weights = np.array([sft.p_correct, sft.p_partial, sft.p_wrong], dtype=float)
        self._sft_quality_cdf = np.cumsum(sft_weights / sft_weights.sum()).tolist()
        self._lead_in = s.lead_in
        self._phrase = cfg.bias.phrase

    def quality(self) -> Quality:
        """Draw an answer quality from the sampler mix."""
        return QUALITIES[pick(self._quality_cdf, self.rng)]

    def answer(self, task: Task, quality: Quality) -> list[str]:
        """An answer of the given quality (wrong answers may by chance be right)."""
        target = task.answer_tokens()
        if quality == "correct":
            return target
        if quality == "wrong" and self.cfg.sampler.p_lazy > 0 and self.rng.random() < self.cfg.sampler.p_lazy:
            return lazy_answer(task)
        if task.family in SCALAR_FAMILIES:
            return [str(self._near_miss(task, int(target[0])) if quality == "partial" else self._wrong_scalar(task))]
        if quality == "partial":
            return self._swap_two(target)
        return self._wrong_list(task, target)

    def _near_miss(self, task: Task, value: int) -> int:
        if task.family in ("max", "min"):
            # the runner-up is the plausible mistake
            others = sorted({int(x) for x in task.items} - {value}, reverse=task.family == "max")
            if others:
                return others[0]
        offset = int(self.rng.integers(1, self.cfg.sampler.near_miss_max + 1))
        if value - offset < 0 or self.rng.random() < 0.5:
            return value + offset
        return value - offset

    def _wrong_scalar(self, task: Task) -> int:
        if task.family == "count":
            return int(self.rng.integers(0, len(task.items) + 1))
        numbers = [int(x) for x in task.items]
        lo, hi = min(numbers), max(numbers)
        if task.family == "add":
            return int(self.rng.integers(0, 2 * hi + 1))
        return int(self.rng.integers(lo, hi + 1))

    def _swap_two(self, tokens: list[str]) -> list[str]:
        out = list(tokens)
        if len(out) < 2:
            return out
        i, j = self.rng.choice(len(out), size=2, replace=False)
        out[i], out[j] = out[j], out[i]
        return out

    def _wrong_list(self, task: Task, target: list[str]) -> list[str]:
        if task.family == "reverse" and self.rng.random() < 0.5:
            return list(task.items)  # forgot to reverse
        return [str(x) for x in self.rng.permutation(np.array(task.items, dtype=object))]

    def render(self, answer: list[str], p_lead_in: float, p_repeat: float, p_filler: float) -> str:
        """Wrap an answer in optional lead-in, repetition and filler."""
        body = " ".join(answer)
        if self.rng.random() < p_lead_in:
            body = f"{self._lead_in} {body}"
        copies = 1
        if self.rng.random() < p_repeat:
            copies += int(self.rng.integers(1, self.cfg.sampler.max_repeats + 1))
        text = " . ".join([body] * copies)
        if self.rng.random() < p_filler:
            text = f"{text} . {self._phrase}"
        return text

    def response(self, task: Task) -> str:
        """One response with the sampler's quality and style mix."""
        s = self.cfg.sampler
        return self.render(self.answer(task, self.quality()), s.p_lead_in, s.p_repeat, s.p_filler)

    def sft_completion(self, task: Task) -> str:
        """A completion in the sft style (mostly concise): correct, or drawn from the sft quality mix."""
        s = self.cfg.sft
        if s.always_correct():
            answer = task.answer_tokens()
        else:
            answer = self.answer(task, QUALITIES[pick(self._sft_quality_cdf, self.rng)])
        return self.render(answer, s.p_lead_in, s.p_repeat, s.p_filler)
