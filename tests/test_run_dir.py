"""Run-directory ownership, the driver's lock, atomic state files and input digests on resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from r2m_ray.atomic_write import atomic_write_text
from r2m_ray.cli import main
from r2m_ray.config import ConfigError, load_config
from r2m_ray.run_inputs import check_inputs, record_inputs
from r2m_ray.rundir import RunDir
from tests.conftest import ROOT


@pytest.fixture()
def cfg():
    return load_config(ROOT / "jobs" / "quickstart.yaml")


def test_an_existing_run_is_refused_and_force_moves_it_aside(cfg, tmp_path):
    path = tmp_path / "run"
    first = RunDir(path, cfg)
    first.update_summary(None, {"steps": 7})
    first.close()
    with pytest.raises(ConfigError, match=r"already holds a run; give --resume .* --force"):
        RunDir(path, cfg)
    assert json.loads((path / "summary.json").read_text()) == {"steps": 7}  # untouched by the refusal
    resumed = RunDir(path, cfg, "resume")
    assert resumed.run_id == first.run_id and resumed.summary == {"steps": 7}
    resumed.close()
    fresh = RunDir(path, cfg, "force")
    fresh.close()
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(aside) == 1 and json.loads((aside[0] / "summary.json").read_text()) == {"steps": 7}
    assert fresh.run_id != first.run_id and not (path / "summary.json").exists()
    RunDir(tmp_path / "empty", cfg).close()  # an empty directory (e.g. made by mkdir) is a new run
    (tmp_path / "empty2").mkdir()
    RunDir(tmp_path / "empty2", cfg).close()


def test_the_cli_refuses_an_existing_run_dir_with_a_clear_line(tmp_path, capsys):
    run = str(tmp_path / "w")
    args = ["world", str(ROOT / "jobs" / "quickstart.yaml"), "world.splits.train=200", "--run-dir", run]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("r2m-ray: error: run directory") and "--resume" in err and "Traceback" not in err
    assert main([*args, "--force"]) == 0
    assert len(list(tmp_path.glob("w.old-*"))) == 1
    assert main(["rl", "--resume", run, "--force"]) == 2  # the two contradict each other


HOLD_LOCK = """
import sys, time
from r2m_ray.config import load_config
from r2m_ray.rundir import RunDir
run = RunDir(sys.argv[1], load_config(sys.argv[2]))
print("locked", flush=True)
time.sleep(600)
"""


def test_a_second_driver_is_refused_until_the_first_dies(cfg, tmp_path):
    path = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(path), str(ROOT / "jobs" / "quickstart.yaml")],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "locked"
        for exist in ("resume", "reuse"):
            with pytest.raises(ConfigError, match=rf"in use by another driver \(pid {proc.pid} "):
                RunDir(path, cfg, exist)
    finally:
        proc.send_signal(signal.SIGKILL)  # a driver that dies without clean-up: the kernel frees the lock
        proc.wait()
    run = RunDir(path, cfg, "resume")
    assert f"pid {os.getpid()} " in (path / "run.lock").read_text()
    run.close()


def test_atomic_write_keeps_the_old_copy_when_the_write_fails(tmp_path, monkeypatch):
    target = tmp_path / "summary.json"
    atomic_write_text(target, "old\n")
    target.chmod(0o640)

    def fail(*_args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="No space"):
        atomic_write_text(target, "new\n")
    monkeypatch.undo()
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temp file left behind
    atomic_write_text(target, "new\n")
    assert target.read_text() == "new\n" and (target.stat().st_mode & 0o777) == 0o640


def test_resume_refuses_an_input_changed_at_the_same_path(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a"}\n')
    cfg = load_config(ROOT / "jobs" / "quickstart.yaml", [f"data.prompts={prompts}"])
    run = RunDir(tmp_path / "run", cfg)
    assert set(record_inputs(cfg, run)) == {"data.prompts"}
    check_inputs(cfg, run)  # unchanged: fine
    prompts.write_text('{"prompt": "b"}\n')
    with pytest.raises(ConfigError, match=r"input data\.prompts \(.*prompts\.jsonl\) changed since the run started"):
        check_inputs(cfg, run)
    prompts.unlink()
    with pytest.raises(ConfigError, match=r"input data\.prompts .* is gone"):
        check_inputs(cfg, run)
    run.close()


def test_an_unchanged_input_is_hashed_once_per_process_and_a_changed_one_again(tmp_path, monkeypatch):
    import hashlib

    from r2m_ray import run_inputs

    ckpt = tmp_path / "ckpt"
    (ckpt / "sub").mkdir(parents=True)
    (ckpt / "a.bin").write_bytes(b"weights")
    (ckpt / "sub" / "b.json").write_text("{}")
    reads = []
    real = run_inputs.sha256_file
    monkeypatch.setattr(run_inputs, "sha256_file", lambda p: reads.append(p) or real(p))
    first = run_inputs.sha256_path(ckpt)
    want = hashlib.sha256(
        f"a.bin\0{hashlib.sha256(b'weights').hexdigest()}\nsub/b.json\0{hashlib.sha256(b'{}').hexdigest()}\n".encode()
    ).hexdigest()
    assert first == want and len(reads) == 2
    assert run_inputs.sha256_path(ckpt) == first and len(reads) == 2  # the second start-up hash is free
    (ckpt / "a.bin").write_bytes(b"other!!")  # same size, new content and mtime: hashed again
    assert run_inputs.sha256_path(ckpt) != first and len(reads) == 4
