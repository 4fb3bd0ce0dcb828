"""rl.reward.mode=function: a Python reward function by import path — its contract checked row by row,
and the RL stage trained on the world's gold through it gets gold's rewards at every step."""

from __future__ import annotations

import json
import math

import pytest
import torch

from r2m_ray.config import ConfigError, load_config
from r2m_ray.serving.reward_function import FunctionReward, RewardFunctionError, reward_function_digest
from tests.conftest import ROOT

PROMPTS = [[{"role": "user", "content": "a"}], [{"role": "user", "content": "bb"}], [{"role": "user", "content": "c"}]]
REPLIES = ["x", "yy", "zzz"]


def length_reward(prompts, completions, scale=1.0, answer=None, step=None, **kwargs):
    """len(prompt) + scale·len(reply), None when the answer column says skip."""
    return [
        None if answer is not None and answer[i] == "skip" else len(p[-1]["content"]) + scale * len(c)
        for i, (p, c) in enumerate(zip(prompts, completions))
    ]


def short(prompts, completions, **kwargs):
    return [1.0] * (len(completions) - 1)


def words(prompts, completions, **kwargs):
    return ["1.0" for _ in completions]


def boom(prompts, completions, **kwargs):
    raise KeyError("answer")


NOT_A_FUNCTION = 3


def test_the_function_gets_messages_texts_kwargs_and_columns():
    fn = FunctionReward("tests.test_reward_function:length_reward", {"scale": 10.0})
    got = fn.score(PROMPTS, REPLIES, {"answer": ["ok", "skip", "ok"]}, step=4)
    assert got.dtype == torch.float32 and got[0] == 11.0 and math.isnan(got[1]) and got[2] == 31.0
    assert fn.stats == {"calls": 1, "rows": 3, "nonfinite": 1}  # None is counted, as the stage skips it
    assert fn.score(PROMPTS, REPLIES).tolist() == [11.0, 22.0, 31.0]  # held-out calls: no columns


@pytest.mark.parametrize(
    ("path", "match"),
    [
        ("tests.test_reward_function:short", r"returned 2 rewards for 3 rows"),
        ("tests.test_reward_function:words", r"reward 0 is str '1.0', not a number or None"),
        ("tests.test_reward_function:boom", r"tests.test_reward_function:boom raised KeyError: 'answer'"),
    ],
)
def test_a_wrong_answer_names_the_function_and_the_row(path, match):
    with pytest.raises(RewardFunctionError, match=match):
        FunctionReward(path, {}).score(PROMPTS, REPLIES)


@pytest.mark.parametrize(
    ("path", "match"),
    [
        ("tests.no_such_module:f", r"cannot import 'tests.no_such_module'.*importable where the annotator runs"),
        ("tests.test_reward_function:nothing", r"module 'tests.test_reward_function' has no attribute 'nothing'"),
        ("tests.test_reward_function:NOT_A_FUNCTION", r"tests.test_reward_function:NOT_A_FUNCTION is a int, not a"),
    ],
)
def test_a_bad_import_path_is_refused_by_name(path, match):
    with pytest.raises(RewardFunctionError, match=r"rl.reward.function.path: " + match):
        FunctionReward(path, {})


def test_config_refuses_a_function_mode_without_a_path_or_with_a_bad_one(tmp_path):
    job = ROOT / "jobs" / "quickstart.yaml"
    with pytest.raises(ConfigError, match=r"rl.reward.mode=function needs rl.reward.function.path"):
        load_config(job, [f"output_dir={tmp_path}", "rl.reward.mode=function"])
    with pytest.raises(ConfigError, match=r"expected `package.module:function`, got 'tests.test_reward_function'"):
        load_config(job, ["rl.reward.mode=function", "rl.reward.function.path=tests.test_reward_function"])


def test_the_digest_changes_with_the_kwargs():
    path = "tests.test_reward_function:length_reward"
    a, b = reward_function_digest(path, {"scale": 1}), reward_function_digest(path, {"scale": 2})
    assert a.startswith(f"function:{path}:") and a != b and a == reward_function_digest(path, {"scale": 1})


def test_the_world_gold_example_is_gold():
    from r2m_ray.world.config import WorldConfig
    from r2m_ray.world.gold import gold_reward
    from r2m_ray.world.reward_function import gold

    prompt = "add 3 5"
    replies = ["8", "the answer is 8", "8 8 8", "7"]
    got = gold([[{"role": "user", "content": prompt}]] * 4, replies)
    assert got == [gold_reward(prompt, r, WorldConfig()) for r in replies]
    harsher = gold([[{"role": "user", "content": prompt}]] * 4, replies, world={"gold": {"lambda_len": 0.2}})
    assert harsher[2] < got[2] and harsher[0] == got[0]


@pytest.mark.slow
def test_rl_stage_trains_on_the_gold_function_and_loads_no_rm(trained, tmp_path):
    """mode=function with the world's gold example: at every step the optimised reward is the gold the
    driver computes on its own from the same samples; the RM path named in the config does not exist."""
    from r2m_ray.pipelines.full_run import run_pipeline
    from tests.conftest import rl_config

    tmp, base = trained
    cfg = rl_config(
        tmp_path,
        base,
        "rl.rollout.backend=hf",
        "rl.reward.mode=function",
        "rl.reward.function.path=r2m_ray.world.reward_function:gold",
        rm=tmp_path / "no-rm-here",
    )
    run = run_pipeline(cfg, run_dir=tmp_path / "function").path
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["stage"] == "rl"]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["proxy_reward"] == pytest.approx(r["gold_reward"], abs=1e-6)
        assert r["frozen_rm_reward"] == r["proxy_reward"]  # no RM: the function is the frozen reward
        assert r["agreement_gold"] == pytest.approx(1.0)  # the reward orders every group as gold does
    summary = json.loads((run / "summary.json").read_text())["rl"]
    assert summary["mode"] == "function" and summary["reward_checkpoint"] == "r2m_ray.world.reward_function:gold"
