"""Digests of the files a run reads, recorded when it starts and checked when it resumes.

Resume compares configs key by key, but a path is only a name: a reward-model checkpoint,
policy or prompt file replaced at the same path would pass that check and the resumed run
would silently mix two inputs. So every local file or directory the config names is hashed
(SHA-256; a directory by its files' relative paths and digests) into <run>/inputs.json, and
`--resume` refuses a run whose inputs changed, naming the config key and the path.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from r2m_ray.atomic_write import atomic_write_text
from r2m_ray.config import ConfigError, RunConfig
from r2m_ray.rl_checkpoint import sha256_file
from r2m_ray.rundir import RunDir

log = logging.getLogger(__name__)
INPUTS_FILE = "inputs.json"


_DIGESTS: dict[tuple, str] = {}  # this process's digests by (path, each file's size and mtime)


def sha256_path(path: Path) -> str:
    """SHA-256 of a file, or of a directory's (relative path, file digest) list.

    A run hashes its inputs when it starts and the RL stage hashes the same checkpoints again for
    its own checkpoints' manifest: within one process an unchanged path (the same files, sizes and
    mtimes) is hashed once. Checkpoint verification reads every byte (rl_checkpoint.sha256_file)."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(q for q in path.rglob("*") if q.is_file())
    key = (str(path.resolve()), tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))
    if key in _DIGESTS:
        return _DIGESTS[key]
    if path.is_file():
        value = sha256_file(path)
    else:
        digest = hashlib.sha256()
        for p in files:
            digest.update(f"{p.relative_to(path)}\0{sha256_file(p)}\n".encode())
        value = digest.hexdigest()
    _DIGESTS[key] = value
    return value


def named_inputs(cfg: RunConfig) -> dict[str, str]:
    """Config key → local path for every input file or directory the config names (hub names skipped)."""
    keys = {
        "data.train": cfg.data.train,
        "data.test_id": cfg.data.test_id,
        "data.test_ood": cfg.data.test_ood,
        "data.sft": cfg.data.sft,
        "data.prompts": cfg.data.prompts,
        "model.path": cfg.model.path,
        "policy_model.path": cfg.policy_model.path if cfg.policy_model else None,
        "rl.policy_checkpoint": cfg.rl.policy_checkpoint,
        "rl.reward.checkpoint": cfg.rl.reward.checkpoint,
        "eval.bon.policy": cfg.eval.bon.policy,
        "eval.bon.judge": cfg.eval.bon.judge,
    }
    keys.update({f"data.extra_eval[{i}]": p for i, p in enumerate(cfg.data.extra_eval)})
    keys.update({f"eval.checkpoints[{i}]": p for i, p in enumerate(cfg.eval.checkpoints)})
    return {k: str(v) for k, v in keys.items() if v and Path(v).exists()}


def input_digests(cfg: RunConfig) -> dict[str, dict[str, str]]:
    """{key: {"path", "sha256"}} for `named_inputs`."""
    return {key: {"path": path, "sha256": sha256_path(Path(path))} for key, path in named_inputs(cfg).items()}


def record_inputs(cfg: RunConfig, run: RunDir) -> dict[str, dict[str, str]]:
    """Write <run>/inputs.json for a run that starts now."""
    digests = input_digests(cfg)
    atomic_write_text(run.path / INPUTS_FILE, json.dumps(digests, indent=1) + "\n")
    return digests


def check_inputs(cfg: RunConfig, run: RunDir) -> None:
    """On resume: every input recorded at the start must still have the same contents."""
    path = run.path / INPUTS_FILE
    if not path.is_file():
        log.warning(
            "resume: %s has no %s (an older run); its inputs are recorded now, not checked", run.path, INPUTS_FILE
        )
        record_inputs(cfg, run)
        return
    before = json.loads(path.read_text())
    now = input_digests(cfg)
    for key, rec in before.items():
        if key not in now:
            raise ConfigError(
                f"--resume {run.path}: input {key} ({rec['path']}) is gone or no longer named by the config"
            )
        if now[key]["sha256"] != rec["sha256"]:
            raise ConfigError(
                f"--resume {run.path}: input {key} ({now[key]['path']}) changed since the run started "
                f"(SHA-256 {rec['sha256'][:12]}… then, {now[key]['sha256'][:12]}… now)"
            )
    added = sorted(set(now) - set(before))
    if added:
        raise ConfigError(
            f"--resume {run.path}: input {added[0]} ({now[added[0]]['path']}) was not an input of the run"
        )
