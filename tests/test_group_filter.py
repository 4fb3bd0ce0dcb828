"""rl.filter.zero_variance_groups (DAPO's dynamic sampling): tied groups out, refilled to the batch size.

The pure part on planted draws, then the RL stage with a planted reward function whose groups for
`count` prompts always tie: the logged calls show which groups each step had, so the batch the
policy trained on can be rebuilt by hand and checked against the step's metrics."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset

from r2m_ray.algos.dynamic_sampling import informative_groups
from r2m_ray.pipelines.group_filter import Draw, fill_informative

K = 2


def planted(prompts, completions, log: str, step=None, **kwargs):
    """Gold, except that every sample of a `count` prompt gets 0.5 (a planted tie); each call logged."""
    from r2m_ray.world.reward_function import gold

    rewards = [0.5 if p[-1]["content"].startswith("count") else g for p, g in zip(prompts, gold(prompts, completions))]
    with open(log, "a") as f:
        f.write(json.dumps({"step": step, "prompts": [p[-1]["content"] for p in prompts], "rewards": rewards}) + "\n")
    return rewards


def draw_of(name: str, rewards: list[float]) -> Draw:
    """A draw of len(rewards)/K prompts named name0, name1, ...; sample texts name the prompt and sample."""
    n = len(rewards) // K
    rows = Dataset.from_dict({"prompt": [f"{name}{g}" for g in range(n)]})
    samples = {
        "prompt_index": [g for g in range(n) for _ in range(K)],
        "text": [f"{name}{g}/{j}" for g in range(n) for j in range(K)],
    }
    ann = {"rewards": torch.tensor(rewards), "frozen_rewards": torch.tensor(rewards) * 2, "rte": None, "nonfinite": 0}
    return Draw(rows, samples, ann, torch.tensor(rewards))


def test_informative_groups_are_finite_and_not_tied():
    r = torch.tensor([1.0, 1.0, 0.0, 1.0, float("nan"), 1.0, -2.0, -2.0])
    assert informative_groups(r, 2).tolist() == [False, True, False, False]
    with pytest.raises(ValueError, match="3 rewards do not form groups of 2"):
        informative_groups(r[:3], 2)


def test_tied_groups_are_replaced_by_refills_in_order():
    first = draw_of("a", [1, 1, 0, 1, 2, 2, 0, 3])  # groups a0 and a2 tie
    asked = []

    def more(r: int, n: int) -> Draw:
        asked.append((r, n))
        return draw_of(f"r{r}-", [5, 5, 1, 2, 3, 4][: 2 * n + 2])  # its first group ties as well

    out, stats = fill_informative(first, K, 4, 3, more)
    assert asked == [(1, 2)]  # one round of 2 new prompts (and one extra beyond is never drawn)
    assert out.rows["prompt"] == ["a1", "a3", "r1-1", "r1-2"]
    assert out.samples["text"] == ["a1/0", "a1/1", "a3/0", "a3/1", "r1-1/0", "r1-1/1", "r1-2/0", "r1-2/1"]
    assert out.samples["prompt_index"] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert out.rewards.tolist() == [0, 1, 0, 3, 1, 2, 3, 4] and out.ann["frozen_rewards"].tolist()[4:6] == [2, 4]
    assert stats == {
        "tied_groups": 2,
        "dropped_groups": 3,
        "refill_rounds": 1,
        "refill_prompts": 3,
        "unfilled_groups": 0,
    }


def test_when_refills_run_out_tied_groups_keep_the_batch_size():
    first = draw_of("a", [1, 1, 0, 1, 2, 2])
    out, stats = fill_informative(first, K, 3, 2, lambda r, n: draw_of(f"r{r}-", [7.0] * (2 * n)))
    assert out.rows["prompt"] == ["a1", "a0", "a2"]  # the informative group first, then the tied ones
    assert out.rewards.tolist() == [0, 1, 1, 1, 2, 2]
    assert stats == {
        "tied_groups": 2,
        "dropped_groups": 4,
        "refill_rounds": 2,
        "refill_prompts": 4,
        "unfilled_groups": 2,
    }


@pytest.mark.slow
def test_rl_stage_drops_the_planted_tied_groups_and_refills_the_batch(trained, tmp_path):
    from r2m_ray.pipelines.full_run import run_pipeline
    from tests.conftest import rl_config

    tmp, base = trained
    log = tmp_path / "calls.jsonl"
    cfg = rl_config(
        tmp_path,
        base,
        "rl.rollout.backend=hf",
        "rl.prompts_per_step=8",
        "rl.reward.mode=function",
        "rl.reward.function.path=tests.test_group_filter:planted",
        f"rl.reward.function.kwargs={{log: {log}}}",
        "rl.filter.zero_variance_groups=true",
        "rl.hacking_monitor=false",
    )
    run = run_pipeline(cfg, run_dir=tmp_path / "run").path
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["stage"] == "rl"]
    assert [r["step"] for r in rows] == [1, 2]
    planted_seen = 0
    for r in rows:
        step_calls = [c for c in calls if c["step"] == r["step"] - 1]  # the step's own draw, then its refills
        groups = [
            (c["prompts"][i], torch.tensor(c["rewards"][i : i + 4]))
            for c in step_calls
            for i in range(0, len(c["prompts"]), 4)
        ]
        own, refills = groups[:8], groups[8:]
        tied = [not bool(informative_groups(g, 4)) for _, g in own]
        planted_seen += sum(p.startswith("count") for p, _ in own)
        f = r["filter"]
        assert f["tied_groups"] == sum(tied) and f["refill_prompts"] == len(refills)
        assert all(t for (p, _), t in zip(own, tied) if p.startswith("count"))  # every planted group tied
        assert f["refill_rounds"] >= 1 if f["tied_groups"] else f["refill_rounds"] == 0
        # the batch trained on, rebuilt by hand: the informative groups in order, then tied ones if short
        kept = [g for (_, g), t in zip(own, tied) if not t]
        kept += [g for _, g in refills if bool(informative_groups(g, 4))][: 8 - len(kept)]
        kept += [g for (_, g), t in zip(own, tied) if t][: f["unfilled_groups"]]
        assert len(kept) == 8
        assert r["proxy_reward"] == pytest.approx(float(torch.cat(kept).mean()), abs=1e-6)
    assert planted_seen >= 1  # the planted family was drawn: the test saw a tie it had planted
    summary = json.loads((run / "summary.json").read_text())["rl"]
    assert summary["filter"]["tied_groups"] == sum(r["filter"]["tied_groups"] for r in rows)
