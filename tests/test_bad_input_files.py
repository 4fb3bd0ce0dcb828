"""Bad files, as they come from disks, editors and other tools: through the `r2m-ray` command.

The companion of tests/test_bad_input.py (same rule: ONE `r2m-ray: error: …` message naming the
file, key or line, exit 2 for bad input, no traceback). These are the faults of files rather than
of keys: duplicate YAML keys, text that is not UTF-8, truncated safetensors, a tokenizer from
another model, a run directory that cannot be written, a full disk. docs/operations.md lists them.
"""

from __future__ import annotations

import gzip
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_bad_input import QUICK, ROOT, assert_clear_error, checkpoint_args, run_cli, small


def write(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


# --------------------------------------------------------------------------- config files


def test_yaml_with_a_duplicate_top_level_key(capsys, tmp_path):
    # PyYAML keeps the last value silently: a second `seed:` pasted at the end would win unseen
    text = Path(QUICK).read_text()
    first = text.splitlines().index(next(ln for ln in text.splitlines() if ln.startswith("seed:"))) + 1
    bad = write(tmp_path / "dup.yaml", text + "\nseed: 4\n")
    code, err = run_cli(capsys, "world", str(bad), *small(tmp_path))
    again = len(text.splitlines()) + 2
    assert_clear_error(code, err, str(bad), "duplicate key 'seed'", f"line {again}", f"first given on line {first}")


def test_yaml_with_a_duplicate_nested_key(capsys, tmp_path):
    bad = write(tmp_path / "dup.yaml", "rl:\n  steps: 2\n  prompts_per_step: 4\n  steps: 3\n")
    assert_clear_error(*run_cli(capsys, "rl", str(bad)), "duplicate key 'steps'", "line 4", "first given on line 2")


def test_empty_config_file(capsys, tmp_path):
    bad = write(tmp_path / "empty.yaml", "\n  \n")
    assert_clear_error(*run_cli(capsys, "world", str(bad)), str(bad), "empty")


def test_config_file_that_is_not_utf8(capsys, tmp_path):
    bad = write(tmp_path / "latin1.yaml", "seed: 1\n# caf\xe9\n".encode("latin-1"))
    assert_clear_error(*run_cli(capsys, "world", str(bad)), str(bad), "not UTF-8", "0xe9", "line 2")


def test_the_same_override_twice(capsys, tmp_path):
    code, err = run_cli(capsys, "world", QUICK, "seed=1", "seed=2", *small(tmp_path))
    assert_clear_error(code, err, "override seed is given twice")


# --------------------------------------------------------------------------- data files


def test_prompt_file_with_invalid_utf8(capsys, tmp_path, tiny_model_dir):
    prompts = write(tmp_path / "prompts.jsonl", b'{"prompt": "ok"}\n{"prompt": "fine"}\n{"prompt": "bad \xff"}\n')
    argv = ["rl", QUICK, f"data.prompts={prompts}", *small(tmp_path), *checkpoint_args(tmp_path, policy=tiny_model_dir)]
    assert_clear_error(*run_cli(capsys, *argv), str(prompts), "not UTF-8", "0xff", "line 3")


def test_preference_file_with_invalid_utf8(capsys, tmp_path):
    row = json.dumps({"prompt": "p", "chosen": "a b", "rejected": "c"}) + "\n"
    prefs = write(
        tmp_path / "prefs.jsonl", (row * 2).encode() + b'{"prompt": "\xc3\x28", "chosen": "x", "rejected": "y"}\n'
    )
    assert_clear_error(*run_cli(capsys, "rm", QUICK, f"data.train={prefs}", *small(tmp_path)), str(prefs), "line 3")


def test_compressed_preference_file_with_invalid_utf8(capsys, tmp_path):
    prefs = tmp_path / "prefs.jsonl.gz"
    with gzip.open(prefs, "wb") as f:
        f.write(b'{"prompt": "p", "chosen": "ok \xfe", "rejected": "c"}\n')
    assert_clear_error(
        *run_cli(capsys, "rm", QUICK, f"data.train={prefs}", *small(tmp_path)), str(prefs), "0xfe", "line 1"
    )


def test_corrupt_parquet_file(capsys, tmp_path):
    bad = write(tmp_path / "prefs.parquet", b"PAR1 this is not parquet")
    assert_clear_error(*run_cli(capsys, "rm", QUICK, f"data.train={bad}", *small(tmp_path)), str(bad), "parquet")


def test_directory_that_is_not_a_saved_dataset(capsys, tmp_path):
    (tmp_path / "prefs.jsonl").mkdir()
    argv = ["rm", QUICK, f"data.train={tmp_path / 'prefs.jsonl'}", *small(tmp_path)]
    assert_clear_error(*run_cli(capsys, *argv), "prefs.jsonl", "save_to_disk")


def test_data_file_of_an_unknown_type(capsys, tmp_path):
    bad = write(tmp_path / "prefs.csv", "prompt,chosen,rejected\n")
    assert_clear_error(*run_cli(capsys, "rm", QUICK, f"data.train={bad}", *small(tmp_path)), str(bad), ".jsonl")


def test_replies_that_are_not_strings_are_counted_skips(tmp_path):
    """A number where a reply should be is a counted skip, not a crash (data.bad_rows: skip)."""
    from r2m_ray.config import load_config
    from r2m_ray.data.preference import load_preferences

    rows = [{"prompt": f"p{i}", "chosen": "a good reply", "rejected": "a bad one"} for i in range(3)]
    rows += [{"prompt": "q", "chosen": 7, "rejected": "r"}, {"prompt": "q2", "chosen": "s", "rejected": ["t"]}]
    prefs = write(tmp_path / "prefs.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    loaded = load_preferences(str(prefs), load_config(QUICK).data)
    assert len(loaded.dataset) == 3
    assert loaded.report.n_in == 5 and sum(loaded.report.skipped.values()) == 2, loaded.report.skipped


# --------------------------------------------------------------------------- checkpoints


def test_truncated_safetensors_in_the_policy(capsys, tmp_path, tiny_model_dir):
    cut = tmp_path / "cut"
    shutil.copytree(tiny_model_dir, cut)
    weights = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(weights[: len(weights) // 2])  # a copy that stopped half-way
    argv = ["rl", QUICK, *small(tmp_path), *checkpoint_args(tmp_path, policy=cut)]
    assert_clear_error(*run_cli(capsys, *argv), "rl.policy_checkpoint", "model.safetensors", "not fully covered")


@pytest.fixture
def reward_dir(tmp_path, tiny_model_dir) -> Path:
    """A reward-model checkpoint as the rm stage writes it (untrained head)."""
    from transformers import AutoTokenizer

    from r2m_ray.models.reward_model import RewardModel

    out = tmp_path / "rm-0"
    RewardModel.from_backbone_dir(tiny_model_dir).save_pretrained(out, AutoTokenizer.from_pretrained(tiny_model_dir))
    return out


def test_truncated_value_head_in_the_reward_model(capsys, tmp_path, tiny_model_dir, reward_dir):
    from r2m_ray.models.reward_model import HEAD_FILE

    head = reward_dir / HEAD_FILE
    head.write_bytes(head.read_bytes()[:-10])
    argv = ["rl", QUICK, *small(tmp_path), *checkpoint_args(tmp_path, policy=tiny_model_dir, rm=reward_dir)]
    assert_clear_error(*run_cli(capsys, *argv), "rl.reward.checkpoint", HEAD_FILE)


def test_reward_model_with_a_corrupt_reward_model_json(capsys, tmp_path, tiny_model_dir, reward_dir):
    from r2m_ray.models.reward_model import META_FILE

    write(reward_dir / META_FILE, "{'backbone': ")
    argv = ["rl", QUICK, *small(tmp_path), *checkpoint_args(tmp_path, policy=tiny_model_dir, rm=reward_dir)]
    assert_clear_error(*run_cli(capsys, *argv), "rl.reward.checkpoint", META_FILE, "unreadable")


def grow_tokenizer(path: Path) -> int:
    """Save into `path` the tokenizer with 40 tokens its model has no embedding rows for."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    tok.add_tokens([f"<extra_{i}>" for i in range(40)])
    tok.save_pretrained(path)
    return len(tok)


def test_reward_model_with_the_tokenizer_of_another_model(capsys, tmp_path, tiny_model_dir, reward_dir):
    n = grow_tokenizer(reward_dir)
    argv = ["rl", QUICK, *small(tmp_path), *checkpoint_args(tmp_path, policy=tiny_model_dir, rm=reward_dir)]
    assert_clear_error(*run_cli(capsys, *argv), "rl.reward.checkpoint", f"has {n} tokens", "another model")


def test_policy_with_the_tokenizer_of_another_model(capsys, tmp_path, tiny_model_dir):
    policy = tmp_path / "policy"
    shutil.copytree(tiny_model_dir, policy)
    n = grow_tokenizer(policy)
    argv = ["rl", QUICK, *small(tmp_path), *checkpoint_args(tmp_path, policy=policy)]
    assert_clear_error(*run_cli(capsys, *argv), "rl.policy_checkpoint", f"has {n} tokens", "another model")


def test_checkpoint_without_tokenizer_files(capsys, tmp_path, tiny_model_dir):
    policy = tmp_path / "policy"
    shutil.copytree(tiny_model_dir, policy)
    for f in [*policy.glob("tokenizer*"), *policy.glob("special_tokens*")]:
        f.unlink()
    argv = ["rl", QUICK, *small(tmp_path), *checkpoint_args(tmp_path, policy=policy)]
    assert_clear_error(*run_cli(capsys, *argv), "rl.policy_checkpoint", "cannot load the tokenizer", str(policy))


def test_checkpoint_whose_config_json_is_not_json(capsys, tmp_path, tiny_model_dir):
    policy = tmp_path / "policy"
    shutil.copytree(tiny_model_dir, policy)
    write(policy / "config.json", '{"model_type": "llama",')
    argv = ["rl", QUICK, *small(tmp_path), *checkpoint_args(tmp_path, policy=policy)]
    assert_clear_error(*run_cli(capsys, *argv), "rl.policy_checkpoint", "config.json", "not valid JSON")


def test_rollout_longer_than_the_policy_can_hold(capsys, tmp_path, tiny_model_dir):
    from r2m_ray.config import load_config

    longest = load_config(QUICK).data.max_prompt_length + 1000
    argv = ["rl", QUICK, "rl.rollout.max_new_tokens=1000", *small(tmp_path), *checkpoint_args(tmp_path, tiny_model_dir)]
    assert_clear_error(
        *run_cli(capsys, *argv),
        "data.max_prompt_length + rl.rollout.max_new_tokens",
        f"{longest} tokens",
        "512 positions",
    )


def test_pairs_longer_than_the_model_can_hold(capsys, tmp_path, tiny_model_dir):
    argv = ["rm", QUICK, "model.preset=path", f"model.path={tiny_model_dir}", "data.max_length=600", *small(tmp_path)]
    assert_clear_error(*run_cli(capsys, *argv), "data.max_length", "600 tokens", "512 positions")


# --------------------------------------------------------------------------- where a run writes


def test_output_dir_below_a_regular_file(capsys, tmp_path):
    write(tmp_path / "runs", "not a directory")
    code, err = run_cli(capsys, "world", QUICK, f"output_dir={tmp_path / 'runs'}")
    assert_clear_error(code, err, str(tmp_path / "runs"), "Not a directory")


def cli_subprocess(argv: list[str], preexec, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1", **(env or {})}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-m", "r2m_ray.cli", *argv],
        cwd=ROOT,
        env=env,
        preexec_fn=preexec,
        capture_output=True,
        text=True,
        timeout=300,
    )


def without_permission_override() -> None:
    """Run as root but without root's right to ignore file modes (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH,
    CAP_FOWNER dropped from the bounding set before exec), as an ordinary user meets a read-only directory."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2, 3):
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_run_directory_without_permission_to_write(capsys, tmp_path):
    locked = tmp_path / "runs"
    locked.mkdir(mode=0o555)
    argv = ["world", QUICK, f"output_dir={locked}"]
    try:
        if os.geteuid() == 0:  # root may write anywhere: take that right away from the command
            proc = cli_subprocess(argv, without_permission_override)
            code, err = proc.returncode, proc.stderr.strip()
        else:
            code, err = run_cli(capsys, *argv)
        assert_clear_error(code, err, str(locked), "no permission to create it")
    finally:
        locked.chmod(0o755)


def test_a_full_disk_is_one_clear_error(tmp_path):
    """A file size limit (RLIMIT_FSIZE) stands in for a full disk: a write fails with EFBIG the way
    it fails with ENOSPC; the run stops with one line naming the file, exit 1."""

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process at the limit
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    proc = cli_subprocess(["world", QUICK, f"output_dir={tmp_path / 'runs'}"], limit)
    err = proc.stderr.strip()
    lines = [ln for ln in err.splitlines() if ln.startswith("r2m-ray: error:")]
    assert proc.returncode == 1, err[-2000:]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert str(tmp_path / "runs") in lines[0] and "disk is full or a size limit was hit" in lines[0]
    assert "--resume" in lines[0]
