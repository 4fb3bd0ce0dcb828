"""Tests of the synthetic preference world: tasks, gold reward, biased splits, files."""

from __future__ import annotations

import hashlib

import pyarrow.parquet as pq
import pytest
import yaml
from datasets import Dataset
from pydantic import ValidationError

from r2m_ray.world import (
    WorldConfig,
    build_world,
    calibrate,
    corpus,
    format_calibration,
    gold_reward,
    gold_rewards,
    parse_task,
    write_world,
)
from r2m_ray.world.gold import correctness, parse_response

PREFERENCE_COLUMNS = [
    "prompt",
    "chosen",
    "rejected",
    "task",
    "subset",
    "gold_chosen",
    "gold_rejected",
    "chosen_has_feature",
    "rejected_has_feature",
]


def small_cfg(splits: dict | None = None, **overrides: object) -> WorldConfig:
    """Sizes large enough for stable bias estimates (±0.01) yet a sub-second build."""
    sizes = {"sft": 50, "train": 2000, "test_id": 300, "test_ood": 1000, "rl_prompts": 30, **(splits or {})}
    return WorldConfig(splits=sizes, **overrides)


@pytest.fixture(scope="module")
def default_small() -> tuple[WorldConfig, dict[str, Dataset]]:
    cfg = small_cfg()
    return cfg, build_world(cfg)


# ---------------------------------------------------------------- gold reward, hand-computed
# defaults: lambda_len=0.05 per excess token, lambda_phrase=0.2, the first lead-in is free
GOLD_CASES = [
    ("add 3 5", "8", 1.0),
    ("add 3 5", "the answer is 8", 1.0),
    ("add 3 5", "The Answer is 8", 1.0),
    ("add 3 5", "9", 0.0),
    ("add 3 5", "the answer is 8 . the answer is 8", 1.0 - 0.05 * 5),  # repetition: 9 tokens, 4 allowed
    ("add 3 5", "8 . i hope this helps", 1.0 - 0.05 * 5 - 0.2),  # filler: 6 tokens, 1 allowed
    ("add 3 5", "7 . 8", 0.5 - 0.05 * 2),  # hedging halves correctness
    ("add 3 5", "8.", 1.0 - 0.05 * 1),  # '8' '.' : one excess token
    ("add 3 5", "8 8", 0.0 - 0.05 * 1),  # not a single number
    ("sort 4 1 3", "1 3 4", 1.0),
    ("sort 4 1 3", "1 4 3", 1 / 3),
    ("sort 4 1 3", "1 3", 2 / 3),  # dropped item: 2 of 3 positions
    ("sort 4 1 3", "1 3 4 9", 3 / 4 - 0.05 * 1),
    ("reverse a b c", "c b a", 1.0),
    ("reverse a b c", "the answer is a b c", 1 / 3),
    ("count b in a b b", "2", 1.0),
    ("count b in a b b", "the answer is 2 . i hope this helps", 1.0 - 0.05 * 5 - 0.2),  # 9 tokens, 4 allowed
    ("count b in a b b", "3", 0.0),
    ("max 3 9 2", "9", 1.0),
    ("max 3 9 2", "3", 0.0),
    ("min 3 9 2", "the answer is 2", 1.0),
    ("max 3 9 2", "hello world !!!", 0.0 - 0.05 * 4),  # garbage: 5 tokens, no answer
    ("max 3 9 2", "", 0.0),
    ("reverse a b c", "i hope this helps", -0.2 - 0.05 * 1),  # filler only: no answer
]


@pytest.mark.parametrize("prompt,response,expected", GOLD_CASES)
def test_gold_reward_hand_computed(prompt: str, response: str, expected: float) -> None:
    assert gold_reward(prompt, response, WorldConfig()) == pytest.approx(expected)


def test_gold_reward_uses_configured_lambdas_and_phrase() -> None:
    cfg = WorldConfig(
        gold={"lambda_len": 0.1, "lambda_phrase": 0.5, "free_lead_in": False},
        bias={"kind": "phrase", "phrase": "trust me"},
    )
    assert gold_reward("add 1 1", "the answer is 2", cfg) == pytest.approx(1.0 - 0.1 * 3)
    assert gold_reward("add 1 1", "2 . trust me", cfg) == pytest.approx(1.0 - 0.1 * 3 - 0.5)
    # the default phrase is no filler in this world, just junk tokens
    assert gold_reward("add 1 1", "2 . i hope this helps", cfg) == pytest.approx(0.5 - 0.1 * 5)


def test_gold_rewards_vectorised_matches_scalar() -> None:
    cfg = WorldConfig()
    prompts = [p for p, _, _ in GOLD_CASES]
    responses = [r for _, r, _ in GOLD_CASES]
    assert gold_rewards(prompts, responses, cfg) == pytest.approx([e for _, _, e in GOLD_CASES])
    with pytest.raises(ValueError, match="differ in length"):
        gold_rewards(prompts, responses[:-1], cfg)


@pytest.mark.parametrize("prompt", ["", "multiply 3 4", "add 3", "add 3 x", "count b a b", "reverse 1 2", "sort"])
def test_parse_task_rejects_non_world_prompts(prompt: str) -> None:
    with pytest.raises(ValueError, match="not a world prompt"):
        parse_task(prompt)


def test_parse_task_round_trips_every_prompt(default_small: tuple[WorldConfig, dict[str, Dataset]]) -> None:
    _, splits = default_small
    for split in ("train", "test_ood", "rl_prompts", "sft"):
        for prompt in splits[split]["prompt"]:
            assert parse_task(prompt).prompt == prompt
    assert [parse_task(p).family for p in splits["rl_prompts"]["prompt"]] == list(splits["rl_prompts"]["task"])


# ---------------------------------------------------------------- splits
def test_same_seed_same_world_different_seed_different() -> None:
    """Built twice from scratch (the process's memo bypassed, so the second build cannot be the
    first's object), the same config gives the same rows; another seed other rows."""
    from r2m_ray.world.build import _build_world

    cfg = WorldConfig(splits={"sft": 40, "train": 60, "test_id": 30, "test_ood": 30, "rl_prompts": 20})
    first = _build_world.__wrapped__(cfg.model_dump_json())
    again = _build_world.__wrapped__(cfg.model_copy(deep=True).model_dump_json())
    other = build_world(cfg.model_copy(update={"seed": 1}))
    assert all(first[split] is not again[split] for split in first)
    for split in first:
        assert first[split].to_dict() == again[split].to_dict(), split
        assert first[split].to_dict() != other[split].to_dict(), split
    memo = build_world(cfg)  # the memo hands out the same rows, in a dict of the caller's own
    assert memo is not build_world(cfg) and all(memo[s].to_dict() == first[s].to_dict() for s in first)


def test_split_schemas_and_sizes(default_small: tuple[WorldConfig, dict[str, Dataset]]) -> None:
    cfg, splits = default_small
    assert set(splits) == {"sft", "train", "test_id", "test_ood", "rl_prompts"}
    for split in ("train", "test_id", "test_ood"):
        ds = splits[split]
        assert ds.column_names == PREFERENCE_COLUMNS
        assert len(ds) == getattr(cfg.splits, split)
        assert ds.features["gold_chosen"].dtype == "float64" and ds.features["chosen_has_feature"].dtype == "bool"
        assert all(c != r for c, r in zip(ds["chosen"], ds["rejected"]))
        assert all(c != r for c, r in zip(ds["gold_chosen"], ds["gold_rejected"]))  # gold ties are redrawn
    assert splits["sft"].column_names == ["prompt", "completion"]
    assert splits["rl_prompts"].column_names == ["prompt", "task"]


def test_stored_gold_matches_gold_reward(default_small: tuple[WorldConfig, dict[str, Dataset]]) -> None:
    cfg, splits = default_small
    rows = splits["test_ood"].select(range(200))
    assert list(rows["gold_chosen"]) == pytest.approx(gold_rewards(rows["prompt"], rows["chosen"], cfg))
    assert list(rows["gold_rejected"]) == pytest.approx(gold_rewards(rows["prompt"], rows["rejected"], cfg))


def test_sft_completions_are_correct(default_small: tuple[WorldConfig, dict[str, Dataset]]) -> None:
    cfg, splits = default_small
    for prompt, completion in zip(splits["sft"]["prompt"], splits["sft"]["completion"]):
        assert correctness(parse_task(prompt), parse_response(completion, cfg)) == 1.0


def test_length_bias_per_split_matches_config(default_small: tuple[WorldConfig, dict[str, Dataset]]) -> None:
    cfg, splits = default_small
    cal = calibrate(splits, cfg)
    assert cal["train"]["p_chosen_feature"] >= 0.8
    assert cal["test_id"]["p_chosen_feature"] >= 0.8
    assert cal["test_ood"]["p_chosen_feature"] <= 0.55
    # the feature really is "chosen strictly longer"
    for row in splits["train"].select(range(300)):
        assert row["chosen_has_feature"] == (len(row["chosen"].split()) > len(row["rejected"].split()))
    # labels are noisy BT draws, but mostly agree with gold
    assert 0.75 <= cal["train"]["p_label_agrees_gold"] <= 0.95
    assert cal["sft"] == {"n": 50} and cal["rl_prompts"] == {"n": 30}
    table = format_calibration(cal)
    assert "train" in table and "test_ood" in table and f"{cal['train']['p_chosen_feature']:.3f}" in table


def test_reversed_ood_bias() -> None:
    cfg = small_cfg(bias={"ood_bias": "reversed"}, splits={"train": 0, "test_id": 0, "test_ood": 1000})
    cal = calibrate(build_world(cfg), cfg)
    assert cal["test_ood"]["p_chosen_feature"] < 0.3
    assert cal["test_ood"]["p_rejected_feature"] > 0.7


def test_no_bias_shows_gold_penalises_length() -> None:
    """Without the filter, longer responses lose more often than they win: learning length is wrong."""
    cfg = small_cfg(bias={"kind": "none"}, splits={"test_ood": 0, "test_id": 0})
    cal = calibrate(build_world(cfg), cfg)["train"]
    assert cal["p_chosen_feature"] < 0.4 < cal["p_rejected_feature"]


def test_phrase_bias_works_with_configured_phrase() -> None:
    cfg = small_cfg(
        bias={"kind": "phrase", "phrase": "trust me on this"}, splits={"train": 1500, "test_id": 0, "test_ood": 600}
    )
    splits = build_world(cfg)
    cal = calibrate(splits, cfg)
    assert cal["train"]["p_chosen_feature"] >= 0.8
    assert cal["test_ood"]["p_chosen_feature"] <= 0.55
    train = splits["train"]
    assert all(f == ("trust me on this" in c) for f, c in zip(train["chosen_has_feature"], train["chosen"]))
    assert not any("i hope this helps" in c for c in train["chosen"])


def test_label_temperature_controls_noise() -> None:
    sizes = {"train": 500, "test_id": 0, "test_ood": 0}
    sharp = small_cfg(bias={"kind": "none"}, labels={"temperature": 1e-4}, splits=sizes)
    noisy = small_cfg(bias={"kind": "none"}, labels={"temperature": 1.0}, splits=sizes)
    assert calibrate(build_world(sharp), sharp)["train"]["p_label_agrees_gold"] == 1.0
    assert calibrate(build_world(noisy), noisy)["train"]["p_label_agrees_gold"] < 0.8


def test_ood_tasks_never_in_train(default_small: tuple[WorldConfig, dict[str, Dataset]]) -> None:
    cfg, splits = default_small
    train_tasks = [parse_task(p) for p in [*splits["train"]["prompt"], *splits["sft"]["prompt"]]]
    assert {t.family for t in train_tasks} <= set(cfg.tasks.train_mix)
    assert "min" not in {t.family for t in train_tasks}
    assert max(int(x) for t in train_tasks if t.family != "count" and t.family != "reverse" for x in t.items) <= 20
    assert max(len(t.items) for t in train_tasks) <= 5
    ood = splits["test_ood"]
    assert all(s.startswith("ood/") for s in ood["subset"]) and all(
        s.startswith("id/") for s in splits["train"]["subset"]
    )
    assert {s.removeprefix("ood/") for s in ood["subset"]} == set(cfg.tasks.ood_mix)
    for task in (parse_task(p) for p, s in zip(ood["prompt"], ood["subset"]) if s.endswith(".wide")):
        assert len(task.items) >= 6 or (task.family == "add" and min(int(x) for x in task.items) >= 21)


def test_small_data_setting() -> None:
    assert WorldConfig.small_data().splits.train == 2000
    assert WorldConfig.model_validate({"splits": {"train": 2000}}).splits.train == 2000
    assert WorldConfig().splits.model_dump() == {
        "sft": 4000,
        "train": 6000,
        "test_id": 1000,
        "test_ood": 1000,
        "rl_prompts": 512,
    }


# ---------------------------------------------------------------- config validation
@pytest.mark.parametrize(
    "overrides,field",
    [
        ({"bias": {"strength": 1.5}}, "bias.strength"),
        ({"bias": {"strenght": 0.5}}, "bias.strenght"),
        ({"bias": {"kind": "loudness"}}, "bias.kind"),
        ({"sampler": {"p_filler": -0.1}}, "sampler.p_filler"),
        ({"splits": {"train": -1}}, "splits.train"),
        ({"labels": {"temperature": 0.0}}, "labels.temperature"),
        ({"tasks": {"train_mix": {"divide": 1.0}}}, "tasks.train_mix"),
        ({"tasks": {"ood_mix": {"add": 1.0}}}, "ood_mix"),
        ({"tasks": {"ood_ranges": {"num_lo": 5, "num_hi": 30, "list_min": 4, "list_max": 6}}}, "ood_ranges"),
        ({"tasks": {"ranges": {"num_lo": 9, "num_hi": 3}}}, "tasks.ranges"),
        ({"bias": {"phrase": "I Hope"}}, "bias.phrase"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_config_errors_name_the_field(overrides: dict, field: str) -> None:
    with pytest.raises(ValidationError) as err:
        WorldConfig.model_validate(overrides)
    assert field in str(err.value)


def test_impossible_bias_is_a_clear_error() -> None:
    cfg = small_cfg(bias={"kind": "phrase", "strength": 1.0}, sampler={"p_filler": 0.0}, max_attempts=5)
    with pytest.raises(ValueError, match="p_filler"):
        build_world(cfg)


# ---------------------------------------------------------------- files and corpus
def test_write_world_files_readable_by_datasets(tmp_path) -> None:
    cfg = WorldConfig(splits={"sft": 20, "train": 30, "test_id": 10, "test_ood": 10, "rl_prompts": 0})
    paths = write_world(cfg, tmp_path / "world")
    built = build_world(cfg)
    assert set(paths) == set(built)
    for split, jsonl in paths.items():
        assert jsonl == tmp_path / "world" / f"{split}.jsonl"
        parquet = jsonl.with_suffix(".parquet")
        if not len(built[split]):  # an empty split still carries its schema
            assert pq.read_table(parquet).column_names == built[split].column_names
            assert jsonl.read_text() == ""
            continue
        from_parquet = Dataset.from_parquet(str(parquet), cache_dir=str(tmp_path / "cache"))
        assert from_parquet.to_dict() == built[split].to_dict()
        assert from_parquet.features == built[split].features
        from_json = Dataset.from_json(str(jsonl), cache_dir=str(tmp_path / "cache"))
        assert from_json.column_names == built[split].column_names
        assert from_json.to_dict() == built[split].to_dict()
    reloaded = WorldConfig.model_validate(yaml.safe_load((tmp_path / "world" / "world_config.yaml").read_text()))
    assert reloaded == cfg


def test_corpus_covers_every_token() -> None:
    cfg = WorldConfig(splits={"sft": 200, "train": 300, "test_id": 50, "test_ood": 300, "rl_prompts": 50})
    texts = list(corpus(cfg))
    vocab = set(texts[0].split())
    assert {"the", "answer", "is", "i", "hope", "this", "helps", ".", "in", "min", "80"} <= vocab
    assert set(" ".join(texts[1:]).split()) <= vocab


def test_lazy_mistakes_are_the_input_copied_or_the_first_number() -> None:
    from r2m_ray.world.sampler import lazy_answer
    from r2m_ray.world.tasks import Task

    assert lazy_answer(Task("sort", ("3", "1", "2"))) == ["3", "1", "2"]
    assert lazy_answer(Task("reverse", ("a", "b"))) == ["a", "b"]
    assert lazy_answer(Task("add", ("4", "5"))) == ["4"]
    assert lazy_answer(Task("max", ("4", "9", "2"))) == ["4"]
    assert lazy_answer(Task("count", ("a", "b", "a"), "a")) == ["3"]


def test_mixed_quality_sft_and_lazy_wrong_answers() -> None:
    from r2m_ray.world.sampler import lazy_answer

    cfg = WorldConfig.model_validate(
        {
            "sampler": {"p_lazy": 1.0},
            "sft": {"p_correct": 0.5, "p_partial": 0.0, "p_wrong": 0.5, "p_repeat": 0.0, "p_filler": 0.0},
            "splits": {"sft": 600, "train": 0, "test_id": 0, "test_ood": 0, "rl_prompts": 0},
        }
    )
    sft = build_world(cfg)["sft"]
    right = [
        correctness(parse_task(p), parse_response(c, cfg)) == 1.0 for p, c in zip(sft["prompt"], sft["completion"])
    ]
    assert 0.4 < sum(right) / len(right) < 0.65  # half wrong, and a lazy answer is sometimes right by chance
    for prompt, completion, ok in zip(sft["prompt"], sft["completion"], right):
        if not ok:  # every wrong completion is the lazy mistake (after an optional lead-in)
            answer = parse_response(completion, cfg).answers[0]
            assert answer == lazy_answer(parse_task(prompt)), (prompt, completion)
    # the default world is unchanged by the new keys (no extra random draws): this digest of its sft
    # completions and training pairs was taken from the code before sft quality and p_lazy existed
    plain = build_world(WorldConfig(splits={"sft": 50, "train": 20, "test_id": 0, "test_ood": 0, "rl_prompts": 0}))
    texts = [*plain["sft"]["completion"], *plain["train"]["chosen"], *plain["train"]["rejected"]]
    digest = hashlib.sha256("\n".join(texts).encode()).hexdigest()
    assert digest == "a375fd848510f623ba7474de0a2bddda9d2cbe2e1290a7f9cff2dfb6de0342f7"
    with pytest.raises(ValidationError, match="p_correct"):
        WorldConfig.model_validate({"sft": {"p_correct": 0.0}})
