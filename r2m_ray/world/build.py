"""Build the world's splits: sft, train, test_id, test_ood, rl_prompts.

Preference pairs: draw a task, draw two responses, label them by a Bradley–Terry
draw on gold (P(a chosen) = σ((g_a − g_b)/T)); identical responses and gold
ties (|g_a − g_b| < labels.min_gold_gap) are redrawn. The spurious bias: in
train and test_id, with probability `bias.strength` a pair is kept only when the
chosen response has the feature and the rejected one does not (else the
responses and label are redrawn for the same task). test_ood draws from
`tasks.ood_mix` (families/ranges never in train) with the bias absent (no
filter) or reversed (kept only when the rejected side has the feature).

Features: `length` = strictly more tokens than the other response of the pair;
`phrase` = contains bias.phrase. With kind `none` no filter is applied and the
length feature is recorded as a diagnostic.

Each split has its own generator seeded by (seed, split index), so all splits
are deterministic and independent of each other's sizes.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import yaml
from datasets import Dataset, Features, Value

from r2m_ray.atomic_write import atomic_write_text
from r2m_ray.world.config import WorldConfig
from r2m_ray.world.gold import gold_reward_for_task, parse_response, tokenize
from r2m_ray.world.sampler import ResponseSampler, pick
from r2m_ray.world.tasks import Task, sample_task, task_family, vocabulary

logger = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("sft", "train", "test_id", "test_ood", "rl_prompts")
PREFERENCE_SPLITS: tuple[str, ...] = ("train", "test_id", "test_ood")

PREFERENCE_FEATURES = Features(
    {
        "prompt": Value("string"),
        "chosen": Value("string"),
        "rejected": Value("string"),
        "task": Value("string"),
        "subset": Value("string"),
        "gold_chosen": Value("float64"),
        "gold_rejected": Value("float64"),
        "chosen_has_feature": Value("bool"),
        "rejected_has_feature": Value("bool"),
    }
)
SFT_FEATURES = Features({"prompt": Value("string"), "completion": Value("string")})
RL_PROMPT_FEATURES = Features({"prompt": Value("string"), "task": Value("string")})
_PAIR_REDRAWS = 100  # redraws of a tied/identical pair before the task is declared degenerate


def split_rng(cfg: WorldConfig, split: str) -> np.random.Generator:
    """The generator of one split, a function of (seed, split) only."""
    return np.random.default_rng([cfg.seed, SPLITS.index(split)])


class _TaskDrawer:
    """Draws tasks from a mix of `family` / `family.wide` names."""

    def __init__(self, cfg: WorldConfig, mix: dict[str, float], rng: np.random.Generator) -> None:
        self.cfg, self.rng = cfg, rng
        self.names = [name for name, weight in mix.items() if weight > 0]
        weights = np.array([mix[name] for name in self.names], dtype=float)
        self.cdf = np.cumsum(weights / weights.sum()).tolist()

    def draw(self) -> tuple[str, Task]:
        """Return (mix name, task)."""
        name = self.names[pick(self.cdf, self.rng)]
        family, wide = task_family(name)
        return name, sample_task(family, self.cfg.tasks.ood_ranges if wide else self.cfg.tasks.ranges, self.rng)


def has_feature(kind: str, response: str, other: str, cfg: WorldConfig) -> bool:
    """The bias feature of `response` within its pair (see module docstring)."""
    if kind == "phrase":
        return parse_response(response, cfg).has_phrase
    return len(tokenize(response)) > len(tokenize(other))


def _labelled_pair(task: Task, sampler: ResponseSampler, cfg: WorldConfig) -> tuple[str, str, float, float]:
    """Two distinct responses with distinct gold, ordered (chosen, rejected) by a BT draw."""
    for _ in range(_PAIR_REDRAWS):
        a, b = sampler.response(task), sampler.response(task)
        if a == b:
            continue
        ga, gb = gold_reward_for_task(task, a, cfg), gold_reward_for_task(task, b, cfg)
        if abs(ga - gb) < cfg.labels.min_gold_gap:
            continue
        z = (ga - gb) / cfg.labels.temperature
        p_a = 1.0 / (1.0 + math.exp(-z)) if z > -700 else 0.0
        if sampler.rng.random() < p_a:
            return a, b, ga, gb
        return b, a, gb, ga
    raise ValueError(
        f"sampler: every response pair for {task.prompt!r} ties in gold; "
        "raise sampler.p_wrong/p_partial or the style probabilities"
    )


def _preference_split(cfg: WorldConfig, split: str, n: int) -> Dataset:
    rng = split_rng(cfg, split)
    sampler = ResponseSampler(cfg, rng)
    ood = split == "test_ood"
    drawer = _TaskDrawer(cfg, cfg.tasks.ood_mix if ood else cfg.tasks.train_mix, rng)
    kind = cfg.bias.kind
    feature_kind = "length" if kind == "none" else kind
    if kind == "none" or (ood and cfg.bias.ood_bias == "absent"):
        favoured = None
    else:
        favoured = "rejected" if ood else "chosen"
    rows: dict[str, list] = {name: [] for name in PREFERENCE_FEATURES}
    for _ in range(n):
        name, task = drawer.draw()
        constrained = favoured is not None and rng.random() < cfg.bias.strength
        for _attempt in range(cfg.max_attempts):
            chosen, rejected, g_c, g_r = _labelled_pair(task, sampler, cfg)
            f_c = has_feature(feature_kind, chosen, rejected, cfg)
            f_r = has_feature(feature_kind, rejected, chosen, cfg)
            if not constrained or ((f_c and not f_r) if favoured == "chosen" else (f_r and not f_c)):
                break
        else:
            raise ValueError(
                f"bias: no pair for {task.prompt!r} with the {kind} feature only on the {favoured} "
                f"side in {cfg.max_attempts} draws; raise sampler.p_filler/p_repeat or lower bias.strength"
            )
        rows["prompt"].append(task.prompt)
        rows["chosen"].append(chosen)
        rows["rejected"].append(rejected)
        rows["task"].append(task.family)
        rows["subset"].append(f"{'ood' if ood else 'id'}/{name}")
        rows["gold_chosen"].append(g_c)
        rows["gold_rejected"].append(g_r)
        rows["chosen_has_feature"].append(f_c)
        rows["rejected_has_feature"].append(f_r)
    return Dataset.from_dict(rows, features=PREFERENCE_FEATURES)


def _sft_split(cfg: WorldConfig, n: int) -> Dataset:
    rng = split_rng(cfg, "sft")
    sampler = ResponseSampler(cfg, rng)
    drawer = _TaskDrawer(cfg, cfg.tasks.train_mix, rng)
    prompts, completions = [], []
    for _ in range(n):
        _, task = drawer.draw()
        prompts.append(task.prompt)
        completions.append(sampler.sft_completion(task))
    return Dataset.from_dict({"prompt": prompts, "completion": completions}, features=SFT_FEATURES)


def _rl_prompt_split(cfg: WorldConfig, n: int) -> Dataset:
    drawer = _TaskDrawer(cfg, cfg.tasks.train_mix, split_rng(cfg, "rl_prompts"))
    tasks = [drawer.draw()[1] for _ in range(n)]
    return Dataset.from_dict(
        {"prompt": [t.prompt for t in tasks], "task": [t.family for t in tasks]}, features=RL_PROMPT_FEATURES
    )


def build_world(cfg: WorldConfig) -> dict[str, Dataset]:
    """All five splits as in-memory datasets, deterministic in `cfg`.

    Built once per process and config: a run needs the world for its splits and again for the tiny
    tokenizer's corpus (hashed for the cache key, then trained on), and a comparison for every
    sub-run of the same world. The datasets are immutable; the dict is the caller's own copy."""
    return dict(_build_world(cfg.model_dump_json()))


@functools.lru_cache(maxsize=4)
def _build_world(cfg_json: str) -> dict[str, Dataset]:
    cfg = WorldConfig.model_validate_json(cfg_json)
    sizes = cfg.splits
    splits = {
        "sft": _sft_split(cfg, sizes.sft),
        "train": _preference_split(cfg, "train", sizes.train),
        "test_id": _preference_split(cfg, "test_id", sizes.test_id),
        "test_ood": _preference_split(cfg, "test_ood", sizes.test_ood),
        "rl_prompts": _rl_prompt_split(cfg, sizes.rl_prompts),
    }
    logger.info("built world (seed %d): %s", cfg.seed, {k: len(v) for k, v in splits.items()})
    return splits


def write_splits(splits: dict[str, Dataset], cfg: WorldConfig, out_dir: Path) -> dict[str, Path]:
    """Write `<split>.jsonl` and `<split>.parquet` per split plus `world_config.yaml`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for name, dataset in splits.items():
        jsonl = out_dir / f"{name}.jsonl"
        dataset.to_json(str(jsonl), lines=True)
        dataset.to_parquet(str(out_dir / f"{name}.parquet"))
        paths[name] = jsonl
    atomic_write_text(out_dir / "world_config.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return paths


def write_world(cfg: WorldConfig, out_dir: Path) -> dict[str, Path]:
    """Build the world and write it to `out_dir`; returns split -> jsonl path."""
    return write_splits(build_world(cfg), cfg, out_dir)


def corpus(cfg: WorldConfig) -> Iterator[str]:
    """Every text of the world (vocabulary, lead-in, phrase, prompts, responses), for tokenizer training."""
    yield " ".join(vocabulary(cfg))
    yield cfg.sampler.lead_in
    yield cfg.bias.phrase
    for dataset in build_world(cfg).values():
        for column in ("prompt", "chosen", "rejected", "completion"):
            if column in dataset.column_names:
                yield from dataset[column]
