"""The run directory every command writes: one place to find what a run did.

Layout: config.yaml (resolved), metrics.jsonl (one JSON object per logged step),
tb/ (TensorBoard events), checkpoints/ (safetensors), plots/*.png, summary.json.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from r2m_ray.config import RunConfig, dump_config


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


class RunDir:
    """Owns the files of one run; stages log through it."""

    def __init__(self, path: Path, cfg: RunConfig) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        for sub in ("checkpoints", "plots", "tb"):
            (self.path / sub).mkdir(exist_ok=True)
        (self.path / "config.yaml").write_text(dump_config(cfg))
        self._metrics = open(self.path / "metrics.jsonl", "a", buffering=1)
        self._tb = None
        self._summary: dict[str, Any] = {}
        if (self.path / "summary.json").is_file():
            self._summary = json.loads((self.path / "summary.json").read_text())

    @classmethod
    def create(cls, cfg: RunConfig, run_dir: str | Path | None = None) -> RunDir:
        """A new directory under cfg.output_dir named <name>-<timestamp>, or the one given."""
        if run_dir is None:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            run_dir = Path(cfg.output_dir) / f"{cfg.name}-{stamp}"
        return cls(Path(run_dir), cfg)

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
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)
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
        (self.path / "summary.json").write_text(json.dumps(self._summary, indent=2, default=float) + "\n")
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
