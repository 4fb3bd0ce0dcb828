"""The run directory every command writes: one place to find what a run did.

Layout: config.yaml (resolved), metrics.jsonl (one JSON object per logged step),
tb/ (TensorBoard events), checkpoints/ (safetensors), plots/*.png, summary.json,
run.json (the run's id), run.lock (held by the driver that owns the directory).

Ownership: a directory that already holds files is refused unless the caller says what to do
with it: `resume` (continue it, keeping its run id), `reuse` (compare's own sub-runs, whose
configs it checks) or `force` (move it aside to <dir>.old-<time>; nothing is deleted). While a
driver has the directory open it holds an exclusive flock on run.lock, so a second driver on
the same directory fails at once instead of interleaving writes; the kernel drops the lock when
the driver dies, however it dies. The run id goes into every RL checkpoint, and only the run
that wrote a checkpoint prunes or removes it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any, Literal

from r2m_ray.atomic_write import atomic_write_text
from r2m_ray.config import ConfigError, RunConfig, dump_config

log = logging.getLogger(__name__)
ExistPolicy = Literal["new", "resume", "reuse", "force"]


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = value


def flatten(tree: dict[str, Any]) -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}: how summaries are read by tests and tables."""
    out: dict[str, Any] = {}
    _flatten("", tree, out)
    return out


def move_aside(path: Path) -> Path:
    """Rename `path` to <path>.old-<time> (a free name) and return the new path; nothing is deleted."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = path.with_name(f"{path.name}.old-{stamp}")
    n = 1
    while aside.exists():
        aside, n = path.with_name(f"{path.name}.old-{stamp}-{n}"), n + 1
    path.rename(aside)
    return aside


class RunDir:
    """Owns the files of one run; stages log through it."""

    def __init__(self, path: Path, cfg: RunConfig, exist: ExistPolicy = "new") -> None:
        self.path = Path(path)
        self._lock_fd: int | None = None
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"run directory {self.path} is a file, not a directory")
        if self.path.is_dir() and any(self.path.iterdir()):
            if exist == "new":
                raise ConfigError(
                    f"run directory {self.path} already holds a run; give --resume {self.path} to continue it, "
                    f"--force to move it aside (to {self.path.name}.old-<time>), or another --run-dir"
                )
            if exist == "force":
                log.warning("--force: the earlier run %s was moved aside to %s", self.path, move_aside(self.path))
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except PermissionError:
            raise ConfigError(f"run directory {self.path}: no permission to create it") from None
        if not os.access(self.path, os.W_OK | os.X_OK):
            raise ConfigError(f"run directory {self.path}: no permission to write in it")
        self._lock()
        for sub in ("checkpoints", "plots", "tb"):
            (self.path / sub).mkdir(exist_ok=True)
        self.run_id = self._identity()
        atomic_write_text(self.path / "config.yaml", dump_config(cfg))
        self._metrics = open(self.path / "metrics.jsonl", "a", buffering=1)
        self._tb = None
        self._summary: dict[str, Any] = {}
        if (self.path / "summary.json").is_file():
            self._summary = json.loads((self.path / "summary.json").read_text())

    def _lock(self) -> None:
        """Hold run.lock exclusively for as long as this object is open (released by the kernel at exit)."""
        fd = os.open(self.path / "run.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(
                f"run directory {self.path} is in use by another driver ({holder}); wait, or use another --run-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._lock_fd = fd

    def _identity(self) -> str:
        """The run id from run.json, or a new one for a new run."""
        path = self.path / "run.json"
        if path.is_file():
            try:
                return str(json.loads(path.read_text())["run_id"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ConfigError(
                    f"{path} is unreadable: the run's identity is lost (restore it or start anew)"
                ) from None
        run_id = uuid.uuid4().hex[:12]
        info = {"run_id": run_id, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": socket.gethostname()}
        atomic_write_text(path, json.dumps(info, indent=1) + "\n")
        return run_id

    @classmethod
    def create(cls, cfg: RunConfig, run_dir: str | Path | None = None, exist: ExistPolicy = "new") -> RunDir:
        """A new directory under cfg.output_dir named <name>-<timestamp>, or the one given (see `exist`)."""
        if run_dir is None:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            run_dir = Path(cfg.output_dir) / f"{cfg.name}-{stamp}"
            n = 1
            while run_dir.exists():  # two runs started in the same second
                run_dir, n = Path(cfg.output_dir) / f"{cfg.name}-{stamp}-{n}", n + 1
        return cls(Path(run_dir), cfg, exist)

    @property
    def tb(self):  # noqa: ANN201 - SummaryWriter is imported lazily (tensorboard import is slow)
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.path / "tb"))
        return self._tb

    def rewind(self, stage: str, step: int) -> int:
        """Forget `stage`'s rows (and its sub-stages', e.g. rm/member0) after `step`: a resume repeats
        them. Returns how many were dropped.

        metrics.jsonl is rewritten atomically. TensorBoard events are left as they are: its
        purge_step would drop every stage's events past `step`, and the repeated steps of an
        exact resume carry the same values anyway.
        """
        self._metrics.flush()
        path = self.path / "metrics.jsonl"
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        kept = []
        for line in lines:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by the interruption
                continue
            name = str(row.get("stage", ""))
            if not (name == stage or name.startswith(stage + "/")) or row.get("step", 0) <= step:
                kept.append(line)
        self._metrics.close()
        atomic_write_text(path, "".join(line + "\n" for line in kept))
        self._metrics = open(path, "a", buffering=1)
        return len(lines) - len(kept)

    def log(self, stage: str, step: int, metrics: dict[str, Any]) -> None:
        """Append one metrics row and mirror its numbers to TensorBoard."""
        row = {"stage": stage, "step": step, "time": time.time(), **metrics}
        self._metrics.write(json.dumps(row, default=float) + "\n")
        for key, value in flatten(metrics).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self.tb.add_scalar(f"{stage}/{key}", value, step)

    def update_summary(self, section: str | None, values: dict[str, Any]) -> dict[str, Any]:
        """Merge values into summary.json (under `section` if given) and rewrite it."""
        target = self._summary.setdefault(section, {}) if section else self._summary
        target.update(values)
        atomic_write_text(self.path / "summary.json", json.dumps(self._summary, indent=2, default=float) + "\n")
        return self._summary

    @property
    def summary(self) -> dict[str, Any]:
        return self._summary

    def metrics(self, stage: str | None = None) -> list[dict[str, Any]]:
        """Read back metrics.jsonl (for plots and tests)."""
        self._metrics.flush()
        rows = [json.loads(line) for line in (self.path / "metrics.jsonl").read_text().splitlines() if line]
        return [r for r in rows if stage is None or r["stage"] == stage]

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
        self._metrics.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None
