"""Resume checkpoints of the RL stage: written atomically, verified before use.

A checkpoint after step t holds everything step t+1 depends on:

    step-000012/
      policy/          DeepSpeed checkpoint of every rank: weights, optimizer (ZeRO partitions),
                       lr scheduler, + each rank's torch RNG (rng_rank<r>.safetensors)
      head/            R2M head weights (safetensors), its AdamW state, version, RNG
      driver.json      step t, metrics history, skip/restart counters, timing
      config.json      the resolved run config (to name what changed on a resume)
      manifest.json    size + SHA-256 of every file above, config and world hashes; written last

The rest is a function of (config, t): the prompt order (seeded), the sampling seed of each
step, ω(t), the frozen RM and the reference policy. So a resumed step t+1 repeats the
uninterrupted one exactly on CPU.

Atomic: a checkpoint is assembled in `.step-<t>.partial-<run id>-<id>/` and renamed into place
only after its manifest is written and every file and directory is fsynced, so a crash mid-write
leaves the previous good checkpoint as the latest. Saving a step that already exists (after a
stage restart) first renames the old copy aside (`.step-<t>.old-<run id>-<id>`), renames the new
one in, fsyncs the directory, and only then deletes the old copy; `recover` puts an aside copy
back if a crash came between the two renames. `verify` re-hashes every file: a truncated or
altered checkpoint is refused with the file named, before any actor starts.

Ownership: the manifest names the run id (rundir.RunDir) of the run that wrote it. A run prunes,
removes and resumes from its own checkpoints only, so two runs that share rl.checkpoint.dir
never delete each other's work.

Inputs: the manifest also holds the SHA-256 of the policy and reward-model checkpoints the RL
stage started from; `verify` refuses a resume whose inputs changed at the same path.

Loading never unpickles arbitrary objects: DeepSpeed's files are read with
`torch.load(weights_only=True)` (see actors/distributed.WeightsOnlyCheckpointEngine).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from r2m_ray.atomic_write import atomic_write_text, fsync_dir
from r2m_ray.config import RunConfig
from r2m_ray.rundir import flatten

log = logging.getLogger(__name__)

FORMAT = 2  # 2: run_id and inputs in the manifest
PREFIX = "step-"
# keys a resumed run may change: where and how it runs, not what it computes
RESUMABLE_KEYS = (
    "ray.",
    "rl.checkpoint.",
    "rl.max_stage_restarts",
    "rl.wait_timeout_s",
    "rl.startup_timeout_s",
    "rl.max_nonfinite_steps",
    "rl.placement.",
    "rl.rollout.max_restarts",
    "rl.reward.max_restarts",
    "rl.reward.remote.",  # where the server is: its model is checked by digest instead
    "rl.reference_max_restarts",
    "rm.wait_timeout_s",
    "rm.startup_timeout_s",
    "rm.max_restarts",
    "serve.",  # `r2m-ray serve` settings: no stage reads them
    "output_dir",
)


class CheckpointError(ValueError):
    """A checkpoint is missing, partial, corrupt or from another run; the message names the file or key."""


def _computed(cfg: RunConfig) -> dict[str, Any]:
    """The flattened config without the keys a resume may change."""
    flat = flatten(cfg.model_dump(mode="json", by_alias=True))
    return {k: v for k, v in flat.items() if not k.startswith(RESUMABLE_KEYS)}


def config_hash(cfg: RunConfig) -> str:
    """SHA-256 of everything in the config that changes what the run computes."""
    return hashlib.sha256(json.dumps(_computed(cfg), sort_keys=True).encode()).hexdigest()


def world_hash(cfg: RunConfig) -> str:
    """SHA-256 of the synthetic world's config (the data every split is drawn from)."""
    return hashlib.sha256(json.dumps(cfg.world.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def config_differences(saved: dict[str, Any], cfg: RunConfig) -> list[str]:
    """Dotted keys whose values differ between a checkpoint's config and `cfg` (resumable keys ignored)."""
    now = _computed(cfg)
    before = {k: v for k, v in flatten(saved).items() if not k.startswith(RESUMABLE_KEYS)}
    return sorted(k for k in set(now) | set(before) if now.get(k) != before.get(k))


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(4 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_tree(root: Path) -> None:
    """Flush every file and directory under root to disk (the rename must not outrun the data)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(Path(dirpath) / name, "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(dirpath))


@dataclass
class DriverState:
    """What the driver itself carries from step to step."""

    step: int  # steps completed (the next step is `step`, 0-based)
    history: list[dict[str, Any]] = field(default_factory=list)  # metrics of the logged steps
    skipped: dict[str, int] = field(
        default_factory=lambda: {"nonfinite_rewards": 0, "nonfinite_loss": 0, "nonfinite_loss_microbatches": 0}
    )
    nonfinite_in_a_row: int = 0
    tokens_total: int = 0
    acc_before: float | None = None
    winrate_start_gold: list[list[float]] | None = None  # gold of the starting policy's held-out samples
    winrate: dict[str, float] | None = None  # the final policy against them (set when the stage ends)
    detector: list[list[float]] | None = None  # the hacking monitor's prototypes (its last calibration)
    actor_restarts: dict[str, int] = field(default_factory=dict)
    stage_restarts: int = 0
    seconds: float = 0.0  # step-loop time before this checkpoint
    startup_seconds: float = 0.0
    checkpoint_seconds: float = 0.0
    # async rollout: step `step`'s samples, drawn before the checkpoint with weights it does not hold
    pending: dict[str, list] | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, default=float)

    @classmethod
    def from_json(cls, text: str) -> DriverState:
        return cls(**json.loads(text))


class CheckpointStore:
    """The checkpoints of one RL run under `root`: step-<t>/ directories, newest last.

    `owner` is the run id of the run that uses the store; only its checkpoints are pruned,
    cleaned up or resumed from. `inputs` (name → SHA-256) goes into every manifest.
    """

    def __init__(self, root: Path, keep_last: int = 2, owner: str = "", inputs: dict[str, str] | None = None) -> None:
        self.root = Path(root)
        self.keep_last = keep_last
        self.owner = owner
        self.inputs = dict(inputs or {})

    def staging(self, step: int) -> Path:
        """A fresh directory to assemble step `step`'s checkpoint in (invisible to `latest`)."""
        path = self.root / f".{PREFIX}{step:06d}.partial-{self.owner}-{uuid.uuid4().hex[:8]}"
        path.mkdir(parents=True)
        return path

    def commit(self, staging: Path, step: int, cfg: RunConfig) -> Path:
        """Write the manifest, flush, rename into place, then drop this run's checkpoints beyond keep_last."""
        atomic_write_text(
            staging / "config.json", json.dumps(cfg.model_dump(mode="json", by_alias=True), indent=1) + "\n"
        )
        files = {
            str(p.relative_to(staging)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(staging.rglob("*"))
            if p.is_file()
        }
        manifest = {
            "format": FORMAT,
            "step": step,
            "run_id": self.owner,
            "inputs": self.inputs,
            "config_sha256": config_hash(cfg),
            "world_sha256": world_hash(cfg),
            "files": files,
        }
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        _fsync_tree(staging)
        final = self.root / f"{PREFIX}{step:06d}"
        aside = None
        if final.exists():  # the same step saved again after a stage restart: the new copy wins
            aside = self.root / f".{PREFIX}{step:06d}.old-{self.owner}-{uuid.uuid4().hex[:8]}"
            os.replace(final, aside)
        os.replace(staging, final)
        fsync_dir(self.root)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
        for _, old in self.owned()[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint saved: %s (%d files)", final, len(files))
        return final

    def complete(self) -> list[tuple[int, Path]]:
        """(step, path) of every renamed-into-place checkpoint, oldest first (any run's)."""
        if not self.root.is_dir():
            return []
        found = []
        for p in self.root.iterdir():
            if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit():
                found.append((int(p.name[len(PREFIX) :]), p))
        return sorted(found)

    def owner_of(self, path: Path) -> str | None:
        """The run id in a checkpoint's manifest (None when unreadable)."""
        try:
            return str(json.loads((path / "manifest.json").read_text())["run_id"])
        except (OSError, json.JSONDecodeError, KeyError, TypeError):
            return None

    def owned(self) -> list[tuple[int, Path]]:
        """This run's complete checkpoints, oldest first. One whose manifest cannot be read counts
        as ours (it sits in our store and nobody else claims it), so that `verify` names the damage."""
        return [(s, p) for s, p in self.complete() if self.owner_of(p) in (self.owner, None)]

    def latest(self) -> Path | None:
        """This run's newest complete checkpoint (not verified: call `verify`)."""
        done = self.owned()
        foreign = [p.name for s, p in self.complete() if (s, p) not in done]
        if foreign:
            log.warning("checkpoints of other runs under %s are left alone: %s", self.root, ", ".join(foreign))
        return done[-1][1] if done else None

    def recover(self) -> int:
        """Finish or undo what a crash left behind: an aside copy whose step is missing goes back in
        place; partial writes and aside copies of this run are removed; other runs' are left alone.
        Returns how many entries were cleaned up."""
        if not self.root.is_dir():
            return 0
        n = 0
        for p in sorted(self.root.glob(f".{PREFIX}*.old-*")):
            step_name, _, rest = p.name[1:].partition(".old-")
            if not rest.startswith(f"{self.owner}-"):
                log.warning("left alone: %s (another run's)", p)
                continue
            final = self.root / step_name
            if final.exists():
                shutil.rmtree(p, ignore_errors=True)
            else:  # the crash came between the two renames of a swap: the old copy is the good one
                log.warning("restoring %s from %s (a checkpoint swap was interrupted)", final, p)
                os.replace(p, final)
                fsync_dir(self.root)
            n += 1
        for p in sorted(self.root.glob(f".{PREFIX}*.partial-*")):
            if not p.is_dir():
                continue
            if not p.name.partition(".partial-")[2].startswith(f"{self.owner}-"):
                log.warning("left alone: %s (another run's partial checkpoint)", p)
                continue
            log.warning("removing a partial checkpoint left by an interrupted write: %s", p)
            shutil.rmtree(p, ignore_errors=True)
            n += 1
        return n

    def verify(self, path: Path, cfg: RunConfig) -> DriverState:
        """Check every file against the manifest and the config against the run's; returns the driver state."""
        manifest_path = path / "manifest.json"
        older = [str(p) for _, p in self.complete() if p != path]
        hint = f"; an older checkpoint is kept: {older[-1]} (delete {path} to resume from it)" if older else ""
        try:
            manifest = json.loads(manifest_path.read_text())
            files = manifest["files"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"checkpoint {path}: manifest.json is missing or unreadable ({err}){hint}") from None
        if manifest.get("format") != FORMAT:
            raise CheckpointError(f"checkpoint {path}: format {manifest.get('format')!r}, expected {FORMAT}")
        if manifest.get("run_id") != self.owner:
            raise CheckpointError(
                f"checkpoint {path} belongs to run {manifest.get('run_id')!r}, not this run ({self.owner!r})"
            )
        for rel, meta in files.items():
            p = path / rel
            if not p.is_file():
                raise CheckpointError(f"checkpoint {path}: file {rel} is missing{hint}")
            if p.stat().st_size != meta["bytes"] or sha256_file(p) != meta["sha256"]:
                raise CheckpointError(f"checkpoint {path}: file {rel} is corrupt (size or SHA-256 differs){hint}")
        if manifest["world_sha256"] != world_hash(cfg):
            raise CheckpointError(f"checkpoint {path} was written for another world (world.* keys differ)")
        if manifest["config_sha256"] != config_hash(cfg):
            saved = json.loads((path / "config.json").read_text())
            keys = config_differences(saved, cfg)
            raise CheckpointError(
                f"checkpoint {path} was written with a different config; keys that differ: {', '.join(keys[:12])}"
                + (" …" if len(keys) > 12 else "")
            )
        for name, digest in manifest.get("inputs", {}).items():
            if self.inputs.get(name) != digest:
                raise CheckpointError(
                    f"checkpoint {path}: the {name} the run started from changed since (SHA-256 "
                    f"{digest[:12]}… then, {str(self.inputs.get(name))[:12]}… now); resume needs the same {name}"
                )
        return DriverState.from_json((path / "driver.json").read_text())
