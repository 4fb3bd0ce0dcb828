"""Resume checkpoints on disk: atomic commit, pruning, verification, config checks, log rewind."""

from __future__ import annotations

import json
import os

import pytest

from r2m_ray.config import load_config
from r2m_ray.rl_checkpoint import (
    CheckpointError,
    CheckpointStore,
    DriverState,
    config_differences,
    config_hash,
)
from r2m_ray.rundir import RunDir
from tests.conftest import ROOT

OWNER = "a1b2c3d4e5f6"


@pytest.fixture()
def cfg():
    return load_config(ROOT / "jobs" / "quickstart.yaml")


def stage(store: CheckpointStore, step: int, payload: bytes = b"weights") -> os.PathLike:
    """A staged checkpoint the way rl_stage writes one: actors' files, then driver.json."""
    path = store.staging(step)
    (path / "policy").mkdir()
    (path / "policy" / "rank0.bin").write_bytes(payload * 100)
    (path / "driver.json").write_text(DriverState(step=step, tokens_total=7 * step).to_json())
    return path


def test_commit_is_atomic_and_keeps_the_last_n(cfg, tmp_path):
    store = CheckpointStore(tmp_path / "ckpt", keep_last=2, owner=OWNER)
    staged = stage(store, 1)
    assert store.latest() is None  # a staged checkpoint is invisible until committed
    store.commit(staged, 1, cfg)
    for step in (2, 3):
        store.commit(stage(store, step), step, cfg)
    assert [s for s, _ in store.complete()] == [2, 3]  # step 1 pruned
    latest = store.latest()
    assert latest is not None and latest.name == "step-000003"
    state = store.verify(latest, cfg)
    assert state.step == 3 and state.tokens_total == 21
    manifest = json.loads((latest / "manifest.json").read_text())
    assert set(manifest["files"]) == {"policy/rank0.bin", "driver.json", "config.json"}
    assert manifest["config_sha256"] == config_hash(cfg)


def test_a_partial_write_leaves_the_previous_checkpoint_as_latest(cfg, tmp_path):
    store = CheckpointStore(tmp_path / "ckpt", owner=OWNER)
    store.commit(stage(store, 2), 2, cfg)
    stage(store, 4)  # the process died before commit: no manifest, never renamed
    latest = store.latest()
    assert latest is not None and latest.name == "step-000002"
    assert store.recover() == 1
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["step-000002"]


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "manifest"])
def test_a_corrupt_checkpoint_is_refused_naming_the_file(cfg, tmp_path, damage):
    store = CheckpointStore(tmp_path / "ckpt", keep_last=3, owner=OWNER)
    store.commit(stage(store, 2), 2, cfg)
    store.commit(stage(store, 4), 4, cfg)
    target = tmp_path / "ckpt" / "step-000004"
    blob = target / "policy" / "rank0.bin"
    if damage == "truncate":
        blob.write_bytes(blob.read_bytes()[:50])
    elif damage == "flip":
        data = bytearray(blob.read_bytes())
        data[10] ^= 0xFF
        blob.write_bytes(bytes(data))
    elif damage == "delete":
        blob.unlink()
    else:
        (target / "manifest.json").write_text("{not json")
    expected = "manifest.json" if damage == "manifest" else "policy/rank0.bin"
    with pytest.raises(CheckpointError, match=expected) as err:
        store.verify(target, cfg)
    assert "step-000002" in str(err.value)  # the older good checkpoint is named, and still there
    assert store.verify(tmp_path / "ckpt" / "step-000002", cfg).step == 2


def test_resume_with_a_different_config_names_the_keys(cfg, tmp_path):
    store = CheckpointStore(tmp_path / "ckpt", owner=OWNER)
    store.commit(stage(store, 2), 2, cfg)
    changed = load_config(ROOT / "jobs" / "quickstart.yaml", ["rl.policy.kl_coef=0.5", "seed=3"])
    with pytest.raises(CheckpointError, match=r"rl\.policy\.kl_coef, seed"):
        store.verify(store.latest(), changed)
    # where and how it runs may change on a resume: no error
    moved = load_config(ROOT / "jobs" / "quickstart.yaml", ["ray.num_cpus=8", "rl.checkpoint.keep_last=5"])
    assert store.verify(store.latest(), moved).step == 2
    assert config_differences(cfg.model_dump(mode="json"), moved) == []
    world = load_config(ROOT / "jobs" / "quickstart.yaml", ["world.seed=123"])
    with pytest.raises(CheckpointError, match="another world"):
        store.verify(store.latest(), world)


def test_rewind_drops_the_rows_a_resume_repeats(cfg, tmp_path):
    run = RunDir(tmp_path / "run", cfg)
    run.log("rm/member0", 50, {"loss": 0.1})
    for step in (1, 2, 3):
        run.log("rl", step, {"kl": float(step)})
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"stage": "rl", "step": 4, "kl"')  # the line the kill cut short
    assert run.rewind("rl", 2) == 2
    run.log("rl", 3, {"kl": 3.5})
    rows = run.metrics()
    assert [(r["stage"], r["step"]) for r in rows] == [("rm/member0", 50), ("rl", 1), ("rl", 2), ("rl", 3)]
    assert rows[-1]["kl"] == 3.5
    assert run.rewind("rm", 0) == 1  # an interrupted rm stage runs again: its member rows go
    assert {r["stage"] for r in run.metrics()} == {"rl"}
    run.close()


def test_only_the_owner_prunes_cleans_up_or_resumes(cfg, tmp_path):
    other = CheckpointStore(tmp_path / "ckpt", keep_last=1, owner="0123456789ab")
    other.commit(stage(other, 1), 1, cfg)
    other_partial = stage(other, 2)  # another driver is writing step 2 right now
    mine = CheckpointStore(tmp_path / "ckpt", keep_last=1, owner=OWNER)
    assert mine.latest() is None  # the other run's step 1 is not ours to resume from
    assert mine.recover() == 0 and other_partial.is_dir()  # nor its partial write ours to delete
    for step in (3, 4):
        mine.commit(stage(mine, step), step, cfg)
    assert [p.name for _, p in mine.complete()] == ["step-000001", "step-000004"]  # its step 1 survives pruning
    assert mine.latest().name == "step-000004"
    with pytest.raises(CheckpointError, match="belongs to run '0123456789ab'"):
        mine.verify(tmp_path / "ckpt" / "step-000001", cfg)
    assert other.verify(tmp_path / "ckpt" / "step-000001", cfg).step == 1


SWAP_CRASH = """
import os, sys
from r2m_ray import rl_checkpoint
from r2m_ray.config import load_config
from tests.test_checkpoint_store import OWNER, stage

cfg = load_config(sys.argv[2])
store = rl_checkpoint.CheckpointStore(rl_checkpoint.Path(sys.argv[1]), owner=OWNER)
real_replace, calls = os.replace, []

def replace(src, dst):  # os is one module: atomic_write's replace comes here too; count the swap's only
    real_replace(src, dst)
    if rl_checkpoint.Path(dst).parent == store.root:
        calls.append(dst)
    if len(calls) == int(sys.argv[3]):
        os._exit(9)  # killed between the steps of the swap: no clean-up of any kind

rl_checkpoint.os.replace = replace
store.commit(stage(store, 2, b"new"), 2, cfg)
"""


@pytest.mark.parametrize("killed_after", [1, 2], ids=["old-copy-aside", "new-copy-in"])
def test_a_kill_inside_the_checkpoint_swap_leaves_a_loadable_checkpoint(cfg, tmp_path, killed_after):
    import subprocess
    import sys

    store = CheckpointStore(tmp_path / "ckpt", owner=OWNER)
    store.commit(stage(store, 2, b"old"), 2, cfg)  # the step is saved again after a stage restart
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            SWAP_CRASH,
            str(tmp_path / "ckpt"),
            str(ROOT / "jobs" / "quickstart.yaml"),
            str(killed_after),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 9, proc.stderr
    # after rename 1 no step-000002 exists at all: only the aside copy holds the checkpoint
    assert (tmp_path / "ckpt" / "step-000002").exists() == (killed_after == 2)
    assert store.recover() >= 1
    latest = store.latest()
    assert latest is not None and latest.name == "step-000002"
    assert store.verify(latest, cfg).step == 2
    payload = (latest / "policy" / "rank0.bin").read_bytes()
    assert payload == (b"old" if killed_after == 1 else b"new") * 100
    assert not list((tmp_path / "ckpt").glob(".step-*"))


def test_resume_refuses_a_changed_starting_checkpoint(cfg, tmp_path):
    store = CheckpointStore(tmp_path / "ckpt", owner=OWNER, inputs={"reward-model checkpoint": "ab" * 32})
    store.commit(stage(store, 2), 2, cfg)
    swapped = CheckpointStore(tmp_path / "ckpt", owner=OWNER, inputs={"reward-model checkpoint": "cd" * 32})
    with pytest.raises(CheckpointError, match="reward-model checkpoint the run started from changed"):
        swapped.verify(swapped.latest(), cfg)
    assert store.verify(store.latest(), cfg).step == 2
