"""The one-step-off loop's pure parts: staleness from the engines' versions, the behaviour log-prob
layout, and the config that turns it on (the loop itself: tests/test_resume.py, tests/test_rl_stage.py)."""

from __future__ import annotations

import pytest
import torch
import yaml

from r2m_ray.config import ConfigError, config_from_dict, dump_config, load_config
from r2m_ray.pipelines.rl_actors import behaviour_logp_batch, sequence_batch, stale_rows
from tests.conftest import ROOT

QUICKSTART = ROOT / "jobs" / "quickstart.yaml"


def test_stale_rows_follow_the_engines_versions_and_stop_past_the_bound():
    stale, staleness = stale_rows([1, 1, 2, 2], learner_version=2, max_staleness=1, step=5)
    assert stale.tolist() == [True, True, False, False] and staleness == 1
    stale, staleness = stale_rows([0, 0], learner_version=0, max_staleness=0, step=0)
    assert stale.tolist() == [False, False] and staleness == 0
    with pytest.raises(RuntimeError, match=r"rl step 6: .* v1 .* v3 \(staleness 2 > rl.async.max_staleness=1\)"):
        stale_rows([1, 2], learner_version=3, max_staleness=1, step=5)


def test_behaviour_logps_sit_where_the_learner_puts_old_logp():
    prompts, responses = [[5, 6], [7]], [[8, 9], [10]]
    got = behaviour_logp_batch(prompts, [[-0.5, -0.25], [-1.0]])
    assert got.tolist() == [[0.0, 0.0, -0.5, -0.25], [0.0, -1.0, 0.0, 0.0]]
    batch = sequence_batch(prompts, responses, pad_id=0)
    assert got.shape == batch["input_ids"].shape
    assert torch.equal(got != 0, batch["response_mask"].bool())  # one log-prob per response token


def test_async_config_key_is_rl_async_and_guards_what_it_cannot_correct():
    cfg = load_config(QUICKSTART, ["rl.async.max_staleness=1", "rl.async.behaviour_weight_cap=3"])
    assert (cfg.rl.async_.max_staleness, cfg.rl.async_.behaviour_weight_cap) == (1, 3.0)
    dumped = yaml.safe_load(dump_config(cfg))
    assert dumped["rl"]["async"] == {"max_staleness": 1, "behaviour_weight_cap": 3.0}
    assert config_from_dict(dumped).rl.async_ == cfg.rl.async_  # what a run directory records loads back
    assert load_config(QUICKSTART).rl.async_.max_staleness == 0  # the synchronous loop by default
    cases = {
        "rl.async.max_staleness": ["rl.async.max_staleness=2"],
        "rl.rollout.temperature=0": ["rl.async.max_staleness=1", "rl.rollout.temperature=0"],
        "rl.rollout.top_p=1": ["rl.async.max_staleness=1", "rl.rollout.top_p=0.9"],
        "rl.async.behaviour_weight_cap": ["rl.async.behaviour_weight_cap=0.5"],
        "rl.async.staleness: unknown key": ["rl.async.staleness=1"],
    }
    for named, overrides in cases.items():
        with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
            load_config(QUICKSTART, overrides)
