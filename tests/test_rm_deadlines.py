"""The RM stage never waits forever: a hung learner rank is trained again, not waited for."""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
import torch

from r2m_ray.config import load_config
from r2m_ray.pipelines.full_run import run_pipeline
from tests.conftest import ROOT, small_overrides
from tests.test_rm_pipeline import load_tensors

pytestmark = pytest.mark.slow

T = TypeVar("T")
BASE = ["stages=[world, rm]", "rm.max_steps=40", "rm.log_every=2"]


def learner_pid(run_dir: Path) -> int | None:
    """The pid of member 0's learner rank, as the RM stage records it (actors.json), once it trains."""
    metrics, actors = run_dir / "metrics.jsonl", run_dir / "actors.json"
    if not (metrics.is_file() and actors.is_file() and '"rm/member0"' in metrics.read_text()):
        return None
    return json.loads(actors.read_text())["rm_learner"][0]["pid"]


def stop_a_learner_once_training(run_dir: Path, stopped: list[int], done: threading.Event) -> None:
    """SIGSTOP the run's own RMLearner rank (alive, never answering) after its first logged steps."""
    while not done.wait(0.05):
        pid = learner_pid(run_dir)
        if pid is not None:
            os.kill(pid, signal.SIGSTOP)
            stopped.append(pid)
            return


def run_with_a_stopped_learner(run_dir: Path, run: Callable[[], T]) -> tuple[T, list[int]]:
    """`run()` while a watcher stops the learner of `run_dir`; the stopped process is killed afterwards."""
    stopped: list[int] = []
    done = threading.Event()
    watcher = threading.Thread(target=stop_a_learner_once_training, args=(run_dir, stopped, done))
    watcher.start()
    try:
        return run(), stopped
    finally:
        done.set()
        watcher.join()
        for pid in stopped:  # Ray has killed it; make sure
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_a_hung_rm_learner_is_trained_again_not_waited_for(ray_session, tmp_path):
    """The stopped rank misses rm.wait_timeout_s; the member trains again from its start (same seed)
    and ends exactly where an uninterrupted run ends; each step is logged once."""
    overrides = small_overrides(tmp_path) + BASE
    clean = run_pipeline(load_config(ROOT / "jobs" / "quickstart.yaml", overrides), run_dir=tmp_path / "clean")
    hung_dir = tmp_path / "hung"
    cfg = load_config(ROOT / "jobs" / "quickstart.yaml", [*overrides, "rm.wait_timeout_s=8"])
    run, stopped = run_with_a_stopped_learner(hung_dir, lambda: run_pipeline(cfg, run_dir=hung_dir))
    assert stopped, "the learner was never stopped (training ended first?)"
    restarted = json.loads((hung_dir / "actors.json").read_text())["rm_learner"][0]["pid"]
    assert restarted != stopped[0]  # the second attempt trained in a new rank
    assert run.summary["member_restarts"] == 1 and "member_restarts" not in clean.summary
    rows = [json.loads(line) for line in (hung_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["stage"] == "rm/member0"] == list(range(2, 41, 2))
    ours = load_tensors(hung_dir / "checkpoints" / "rm-0")
    theirs = load_tensors(clean.path / "checkpoints" / "rm-0")
    ours.update(load_tensors(hung_dir / "checkpoints" / "rm-0" / "backbone"))
    theirs.update(load_tensors(clean.path / "checkpoints" / "rm-0" / "backbone"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert run.summary["accuracy"] == clean.summary["accuracy"]


def test_a_learner_that_never_answers_ends_the_run_with_one_error(ray_session, tmp_path, capsys):
    """With rm.max_restarts=0 a hung rank is one clear error naming the key, not a hang."""
    from r2m_ray.cli import main

    hung_dir = tmp_path / "hung"
    overrides = {o.split("=", 1)[0]: o for o in [*small_overrides(tmp_path), *BASE[1:]]}  # each key once
    argv = ["rm", str(ROOT / "jobs" / "quickstart.yaml"), *overrides.values(), "rm.wait_timeout_s=5"]
    argv += ["rm.max_restarts=0", "--run-dir", str(hung_dir)]
    code, stopped = run_with_a_stopped_learner(hung_dir, lambda: main(argv))
    err = capsys.readouterr().err
    assert stopped and code == 1, err[-2000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("r2m-ray: error:")]
    assert len(lines) == 1 and "rm.wait_timeout_s=5" in lines[0] and "rm.max_restarts=0" in lines[0], err[-3000:]
