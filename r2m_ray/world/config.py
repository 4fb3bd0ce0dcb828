"""Configuration of the synthetic preference world.

Every knob of the world (task mix, ranges, response sampler, gold λ terms, the
spurious bias, label noise, split sizes, seed) is a key here, so a new world is a
YAML file. Unknown keys and out-of-range values raise errors that name the field.

The small-data regime (GRM's gains are largest there) is the override
`world.splits.train=2000`, or `WorldConfig.small_data()`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from r2m_ray.config_base import Section

#: Task families the world knows; see tasks.py for their grammar.
FAMILIES: tuple[str, ...] = ("add", "sort", "reverse", "count", "max", "min")
#: Suffix of a task variant drawn from `tasks.ood_ranges` instead of `tasks.ranges`.
WIDE_SUFFIX = ".wide"
#: Families whose novelty under `.wide` comes from longer lists, not from new numbers.
LETTER_FAMILIES: frozenset[str] = frozenset({"reverse", "count"})


class RangeConfig(Section):
    """Difficulty knobs: number range, list lengths and the letter alphabet."""

    num_lo: int = Field(default=0, ge=0)
    num_hi: int = Field(default=20, ge=0)
    list_min: int = Field(default=3, ge=1)
    list_max: int = Field(default=5, ge=1)
    letters: str = "abcdefgh"
    count_alphabet: int = Field(default=3, ge=1)  # letters per count prompt; small so counts vary

    @field_validator("letters")
    @classmethod
    def _letters_are_distinct_lowercase(cls, value: str) -> str:
        if len(value) < 2 or not value.isascii() or not value.isalpha() or not value.islower():
            raise ValueError("letters must be at least two lowercase ascii letters")
        if len(set(value)) != len(value):
            raise ValueError("letters must not repeat")
        return value

    @model_validator(mode="after")
    def _ordered(self) -> RangeConfig:
        if self.num_lo > self.num_hi:
            raise ValueError(f"num_lo ({self.num_lo}) must be <= num_hi ({self.num_hi})")
        if self.list_min > self.list_max:
            raise ValueError(f"list_min ({self.list_min}) must be <= list_max ({self.list_max})")
        return self


def _disjoint(lo_a: int, hi_a: int, lo_b: int, hi_b: int) -> bool:
    return hi_a < lo_b or hi_b < lo_a


class TasksConfig(Section):
    """Which tasks appear where. A mix maps a task name to its sampling weight.

    `train_mix` names plain families (used by sft, train, test_id, rl_prompts).
    `ood_mix` (test_ood only) names either a family absent from train_mix, or
    `<family>.wide`: that family drawn from `ood_ranges`, which must not overlap
    the train ranges (numbers for add, list lengths for reverse/count, either for
    sort/max/min), so every OOD task is a variant never seen in train.
    """

    train_mix: dict[str, float] = Field(
        default_factory=lambda: {"add": 1.0, "sort": 1.0, "reverse": 1.0, "count": 1.0, "max": 1.0}
    )
    ood_mix: dict[str, float] = Field(
        default_factory=lambda: {
            "min": 1.0,
            "add.wide": 1.0,
            "sort.wide": 1.0,
            "reverse.wide": 1.0,
            "count.wide": 1.0,
            "max.wide": 1.0,
        }
    )
    ranges: RangeConfig = RangeConfig()
    ood_ranges: RangeConfig = RangeConfig(num_lo=21, num_hi=40, list_min=6, list_max=7)

    @field_validator("train_mix")
    @classmethod
    def _train_mix_valid(cls, mix: dict[str, float]) -> dict[str, float]:
        _check_weights(mix)
        for name in mix:
            if name not in FAMILIES:
                raise ValueError(f"unknown task family {name!r} (known: {', '.join(FAMILIES)})")
        return mix

    @field_validator("ood_mix")
    @classmethod
    def _ood_mix_valid(cls, mix: dict[str, float]) -> dict[str, float]:
        _check_weights(mix)
        for name in mix:
            family = name.removesuffix(WIDE_SUFFIX)
            if family not in FAMILIES:
                raise ValueError(
                    f"unknown task {name!r}: use a family ({', '.join(FAMILIES)}) or <family>{WIDE_SUFFIX}"
                )
        return mix

    @model_validator(mode="after")
    def _ood_is_unseen(self) -> TasksConfig:
        seen = {name for name, weight in self.train_mix.items() if weight > 0}
        ranges, wide = self.ranges, self.ood_ranges
        new_numbers = _disjoint(ranges.num_lo, ranges.num_hi, wide.num_lo, wide.num_hi)
        new_lengths = _disjoint(ranges.list_min, ranges.list_max, wide.list_min, wide.list_max)
        for name, weight in self.ood_mix.items():
            if weight <= 0:
                continue
            family = name.removesuffix(WIDE_SUFFIX)
            if name == family and family in seen:
                raise ValueError(
                    f"ood_mix: {name!r} is also in train_mix, so it is not out of distribution "
                    f"(use {name}{WIDE_SUFFIX} or drop it from train_mix)"
                )
            if name != family:
                unseen = (
                    new_numbers
                    if family == "add"
                    else new_lengths
                    if family in LETTER_FAMILIES
                    else new_numbers or new_lengths
                )
                if not unseen:
                    raise ValueError(
                        f"ood_ranges: {name!r} overlaps the train ranges; make ood_ranges "
                        "disjoint from ranges (num_lo/num_hi or list_min/list_max)"
                    )
        return self


def _check_weights(mix: dict[str, float]) -> None:
    if not mix:
        raise ValueError("the mix must name at least one task")
    for name, weight in mix.items():
        if weight < 0:
            raise ValueError(f"weight of {name!r} must be >= 0, got {weight}")
    if sum(mix.values()) <= 0:
        raise ValueError("at least one weight must be > 0")


class SamplerConfig(Section):
    """The response sampler: answer quality mix and style material.

    p_correct/p_partial/p_wrong are relative weights (normalised). `partial` is a
    near miss: a list with two items swapped, or a number off by 1..near_miss_max
    (or the runner-up for max/min), which scalar tasks score 0. A wrong answer is the
    lazy mistake with probability p_lazy, else a random one.
    """

    p_correct: float = Field(default=0.45, ge=0.0, le=1.0)
    p_partial: float = Field(default=0.30, ge=0.0, le=1.0)
    p_wrong: float = Field(default=0.25, ge=0.0, le=1.0)
    near_miss_max: int = Field(default=2, ge=1)
    # share of wrong answers that are the LAZY mistake: the input copied back (sort, reverse), the
    # first number (add, max, min), every letter counted (count). A systematic error that one
    # global change of the policy removes and a reward model can check against the prompt.
    p_lazy: float = Field(default=0.0, ge=0.0, le=1.0)
    lead_in: str = "the answer is"
    p_lead_in: float = Field(default=0.5, ge=0.0, le=1.0)
    p_filler: float = Field(default=0.25, ge=0.0, le=1.0)
    p_repeat: float = Field(default=0.25, ge=0.0, le=1.0)
    max_repeats: int = Field(default=2, ge=1)

    @field_validator("lead_in")
    @classmethod
    def _lead_in_is_words(cls, value: str) -> str:
        return _check_phrase(value)

    @model_validator(mode="after")
    def _some_quality(self) -> SamplerConfig:
        if self.p_correct + self.p_partial + self.p_wrong <= 0:
            raise ValueError("p_correct + p_partial + p_wrong must be > 0")
        return self


class SftStyleConfig(Section):
    """Style and quality of sft completions. A little filler/repetition is kept so the policy
    can express the verbosity a biased proxy RM rewards during RL.

    Quality: correct by default. `p_correct` < 1 mixes in near misses and wrong answers
    (relative weights p_correct : p_partial : p_wrong, as in the response sampler): a
    mixed-quality SFT policy whose correctness RL can still raise, so that gold first rises
    under a proxy that has also learned correctness (jobs/overopt.yaml).
    """

    p_lead_in: float = Field(default=0.5, ge=0.0, le=1.0)
    p_filler: float = Field(default=0.1, ge=0.0, le=1.0)
    p_repeat: float = Field(default=0.1, ge=0.0, le=1.0)
    p_correct: float = Field(default=1.0, ge=0.0, le=1.0)
    p_partial: float = Field(default=0.0, ge=0.0, le=1.0)
    p_wrong: float = Field(default=0.0, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _some_quality(self) -> SftStyleConfig:
        if self.p_correct + self.p_partial + self.p_wrong <= 0:
            raise ValueError("p_correct + p_partial + p_wrong must be > 0")
        return self

    def always_correct(self) -> bool:
        """True when every completion is correct (then no quality is drawn: older worlds stay identical)."""
        return self.p_partial == 0 and self.p_wrong == 0


class GoldConfig(Section):
    """Gold reward g = correctness − lambda_len·excess_tokens − lambda_phrase·[filler present].

    excess_tokens = tokens beyond the minimal correct answer, where the first
    lead-in is free when `free_lead_in` (so "the answer is 8" scores 1.0).
    """

    lambda_len: float = Field(default=0.05, ge=0.0)
    lambda_phrase: float = Field(default=0.2, ge=0.0)
    free_lead_in: bool = True


class BiasConfig(Section):
    """The spurious prompt-free feature that predicts the label in train and test_id."""

    kind: Literal["none", "length", "phrase"] = "length"
    phrase: str = "i hope this helps"
    strength: float = Field(default=0.8, ge=0.0, le=1.0)
    ood_bias: Literal["absent", "reversed"] = "absent"

    @field_validator("phrase")
    @classmethod
    def _phrase_is_words(cls, value: str) -> str:
        return _check_phrase(value)


def _check_phrase(value: str) -> str:
    words = value.split()
    if not words or " ".join(words) != value or not all(w.isascii() and w.isalpha() and w.islower() for w in words):
        raise ValueError(f"{value!r} must be lowercase ascii words separated by single spaces")
    return value


class LabelConfig(Section):
    """Bradley–Terry labels: P(a chosen) = σ((g_a − g_b)/temperature)."""

    temperature: float = Field(default=0.15, gt=0.0)
    min_gold_gap: float = Field(default=1e-6, ge=0.0)  # pairs closer than this in gold are redrawn


class SplitSizes(Section):
    """Rows per split (pairs for preference splits)."""

    sft: int = Field(default=4000, ge=0)
    train: int = Field(default=6000, ge=0)
    test_id: int = Field(default=1000, ge=0)
    test_ood: int = Field(default=1000, ge=0)
    rl_prompts: int = Field(default=512, ge=0)


class WorldConfig(Section):
    """The whole synthetic world; `build_world(cfg)` is a pure function of it."""

    seed: int = Field(default=0, ge=0)
    tasks: TasksConfig = TasksConfig()
    sampler: SamplerConfig = SamplerConfig()
    sft: SftStyleConfig = SftStyleConfig()
    gold: GoldConfig = GoldConfig()
    bias: BiasConfig = BiasConfig()
    labels: LabelConfig = LabelConfig()
    splits: SplitSizes = SplitSizes()
    max_attempts: int = Field(default=2000, ge=1)  # redraws per pair before giving up with an error

    @model_validator(mode="after")
    def _phrase_not_lead_in(self) -> WorldConfig:
        if self.bias.phrase == self.sampler.lead_in:
            raise ValueError("bias.phrase must differ from sampler.lead_in")
        return self

    @classmethod
    def small_data(cls, **overrides: object) -> WorldConfig:
        """The small-data regime: 2000 training pairs, everything else default."""
        return cls(splits=SplitSizes(train=2000), **overrides)
