"""The whole run, stage after stage: world → sft → rm → rl.

Each stage reads what the previous one wrote into the same run directory:
the world's splits, the SFT checkpoint (which also initialises the reward
model's backbone, as in InstructGPT-style pipelines), the RM checkpoints.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from r2m_ray.config import RunConfig
from r2m_ray.models.registry import prepare_model_dir
from r2m_ray.ray_setup import init_ray
from r2m_ray.run_inputs import check_inputs, record_inputs
from r2m_ray.rundir import RunDir
from r2m_ray.world import build_world, calibrate, corpus, format_calibration, write_splits

log = logging.getLogger(__name__)


def run_world(cfg: RunConfig, run: RunDir) -> dict[str, Path]:
    """Write the synthetic world's splits into the run dir and record its calibration."""
    splits = build_world(cfg.world)
    paths = write_splits(splits, cfg.world, run.path / "world")
    calibration = calibrate(splits, cfg.world)
    print(format_calibration(calibration))
    run.update_summary("world", calibration)
    return paths


def needs_world(cfg: RunConfig, stages: list[str]) -> bool:
    """The world is built when a stage reads it or the tiny tokenizer is trained on it."""
    if "world" in stages or cfg.model.preset == "tiny" or "sft" in stages:
        return True
    return ("rm" in stages and cfg.data.train is None) or ("rl" in stages and cfg.data.prompts is None)


def base_model_dir(cfg: RunConfig) -> Path:
    """The preset's HF directory (tiny: tokenizer trained on this world's text)."""
    return prepare_model_dir(cfg.model, corpus=lambda: corpus(cfg.world))


def resume_point(cfg: RunConfig, run_dir: Path) -> dict[str, Any]:
    """What an interrupted run directory already holds: finished stages and their outputs.

    The config must compute the same thing as the one the run was started with (only the
    keys rl_checkpoint.RESUMABLE_KEYS lists may change); the error names every other key.
    """
    import yaml

    from r2m_ray.config import ConfigError
    from r2m_ray.rl_checkpoint import config_differences

    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        raise ConfigError(f"--resume {run_dir}: not a run directory (no config.yaml)")
    changed = config_differences(yaml.safe_load(saved_path.read_text()) or {}, cfg)
    if changed:
        raise ConfigError(f"--resume {run_dir}: the config differs from the run's in {', '.join(changed[:12])}")
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
    world_dir = run_dir / "world"
    done: dict[str, Any] = {}
    if "world" in summary and world_dir.is_dir():
        done["world"] = {p.stem: p for p in sorted(world_dir.glob("*.jsonl"))}
    if "sft" in summary and (run_dir / "checkpoints" / "sft" / "config.json").is_file():
        done["sft"] = run_dir / "checkpoints" / "sft"
    if summary.get("checkpoints"):
        done["rm"] = Path(summary["checkpoints"][0])
    if "seconds" in summary.get("rl", {}):
        done["rl"] = True
    return done


def run_pipeline(
    cfg: RunConfig,
    stages: list[str] | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    force: bool = False,
) -> RunDir:
    """Run the given stages (default cfg.stages) in one run directory.

    `resume`: `run_dir` is an interrupted run; finished stages are skipped (their outputs
    reused) and the RL stage continues from its newest checkpoint. Without it an existing,
    non-empty `run_dir` is refused; `force` moves it aside first (see rundir.RunDir).
    """
    stages = stages or list(cfg.stages)
    done = resume_point(cfg, Path(run_dir)) if resume and run_dir is not None else {}
    if "rl" in stages:  # user-supplied checkpoints are checked before anything runs
        from r2m_ray.pipelines.preflight import preflight_rl

        preflight_rl(
            cfg,
            Path(cfg.rl.policy_checkpoint) if cfg.rl.policy_checkpoint else None,
            Path(cfg.rl.reward.checkpoint) if cfg.rl.reward.checkpoint else None,
        )
    run = RunDir.create(cfg, run_dir, "resume" if resume else ("force" if force else "new"))
    try:
        _run_stages(cfg, run, stages, done, resume)
    finally:
        run.close()  # releases the run directory's lock, also when a stage failed
    return run


def _run_stages(cfg: RunConfig, run: RunDir, stages: list[str], done: dict[str, Any], resume: bool) -> None:
    from r2m_ray.pipelines.rm_stage import run_rm_stage
    from r2m_ray.pipelines.sft_stage import run_sft_stage

    if resume:
        check_inputs(cfg, run)
    else:
        record_inputs(cfg, run)
    log.info("run directory: %s%s", run.path, f" (resuming; done: {sorted(done)})" if resume else "")
    for stage in ("sft", "rm") if resume else ():
        if stage in stages and stage not in done:  # interrupted: it runs again from its start
            run.rewind(stage, 0)
    t0 = time.perf_counter()
    world_paths = done.get("world") or (run_world(cfg, run) if needs_world(cfg, stages) else {})
    model_dir = base_model_dir(cfg)
    rm_init, policy_dir, rm_ckpt = model_dir, model_dir, None
    if cfg.rl.policy_checkpoint:
        policy_dir = Path(cfg.rl.policy_checkpoint)
    if "sft" in stages:
        if "sft" in done:
            sft_dir = done["sft"]
        else:
            base = (
                prepare_model_dir(cfg.policy_model, corpus=lambda: corpus(cfg.world)) if cfg.policy_model else model_dir
            )
            sft_dir, _ = run_sft_stage(cfg, run, base, world_paths)
        policy_dir = sft_dir
        if cfg.policy_model is None:
            rm_init = sft_dir
    if "rm" in stages:
        rm_ckpt = done.get("rm") or Path(run_rm_stage(cfg, run, rm_init, world_paths)["checkpoints"][0])
    if "rl" in stages and "rl" in done:
        log.info("resume: the RL stage of %s had finished; nothing to do", run.path)
    elif "rl" in stages:
        from r2m_ray.pipelines.rl_stage import run_rl_stage

        rm_ckpt = Path(cfg.rl.reward.checkpoint) if cfg.rl.reward.checkpoint else rm_ckpt
        if rm_ckpt is None and not cfg.rl.reward.external():  # a server's RM or a reward function
            raise ValueError("rl.reward.checkpoint is not set and no rm stage ran in this run")
        init_ray(cfg.ray)
        run_rl_stage(cfg, run, policy_dir, rm_ckpt, world_paths, resume=resume)
    run.update_summary(None, {"run_dir": str(run.path), "stages": stages, "wall_seconds": time.perf_counter() - t0})


def print_summary(summary: dict[str, Any]) -> None:
    """The few numbers a person wants at the end of a run."""
    keys = ["method", "steps", "pairs_per_second", "accuracy", "gold_accuracy", "wall_seconds", "run_dir"]
    for key in keys:
        if key in summary:
            print(f"{key:>18}: {summary[key]}")
    if "sft" in summary:
        print(f"{'sft gold reward':>18}: {summary['sft']['gold_reward']}")
    if "rl" in summary:
        rl = summary["rl"]
        for key in (
            "mode",
            "algo",
            "gold_reward",
            "proxy_reward",
            "frozen_rm_reward",
            "kl_seq",
            "rm_accuracy",
            "winrate_vs_start",
            "tokens_per_second",
        ):
            value = rl[key]
            if isinstance(value, dict):  # the per-prompt gold lists are for analyses, not the terminal
                value = {k: v for k, v in value.items() if not k.endswith("_per_prompt")}
            print(f"{'rl ' + key:>18}: {value}")
