"""The whole run, stage after stage: world → sft → rm → rl.

Each stage reads what the previous one wrote into the same run directory:
the world's splits, the SFT checkpoint (which also initialises the reward
model's backbone, as in InstructGPT-style pipelines), the RM checkpoints.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from r2m_ray.config import RunConfig
from r2m_ray.models.registry import prepare_model_dir
from r2m_ray.ray_setup import init_ray
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
    return "world" in stages or cfg.model.preset == "tiny" or "sft" in stages or cfg.data.train is None


def base_model_dir(cfg: RunConfig) -> Path:
    """The preset's HF directory (tiny: tokenizer trained on this world's text)."""
    return prepare_model_dir(cfg.model, corpus=lambda: corpus(cfg.world))


def run_pipeline(cfg: RunConfig, stages: list[str] | None = None, run_dir: str | Path | None = None) -> RunDir:
    """Run the given stages (default cfg.stages) in one run directory."""
    from r2m_ray.pipelines.rm_stage import run_rm_stage
    from r2m_ray.pipelines.sft_stage import run_sft_stage

    stages = stages or list(cfg.stages)
    if "rl" in stages:  # user-supplied checkpoints are checked before anything runs
        from r2m_ray.pipelines.preflight import preflight_rl

        preflight_rl(
            cfg,
            Path(cfg.rl.policy_checkpoint) if cfg.rl.policy_checkpoint else None,
            Path(cfg.rl.reward.checkpoint) if cfg.rl.reward.checkpoint else None,
        )
    run = RunDir.create(cfg, run_dir)
    log.info("run directory: %s", run.path)
    t0 = time.perf_counter()
    world_paths = run_world(cfg, run) if needs_world(cfg, stages) else {}
    model_dir = base_model_dir(cfg)
    rm_init, policy_dir, rm_ckpt = model_dir, model_dir, None
    if cfg.rl.policy_checkpoint:
        policy_dir = Path(cfg.rl.policy_checkpoint)
    if "sft" in stages:
        policy_dir = (
            prepare_model_dir(cfg.policy_model, corpus=lambda: corpus(cfg.world)) if cfg.policy_model else model_dir
        )
        sft_dir, _ = run_sft_stage(cfg, run, policy_dir, world_paths)
        policy_dir = sft_dir
        if cfg.policy_model is None:
            rm_init = sft_dir
    if "rm" in stages:
        rm_ckpt = Path(run_rm_stage(cfg, run, rm_init, world_paths)["checkpoints"][0])
    if "rl" in stages:
        from r2m_ray.pipelines.rl_stage import run_rl_stage

        rm_ckpt = Path(cfg.rl.reward.checkpoint) if cfg.rl.reward.checkpoint else rm_ckpt
        if rm_ckpt is None:
            raise ValueError("rl.reward.checkpoint is not set and no rm stage ran in this run")
        init_ray(cfg.ray)
        run_rl_stage(cfg, run, policy_dir, rm_ckpt, world_paths)
    run.update_summary(None, {"run_dir": str(run.path), "stages": stages, "wall_seconds": time.perf_counter() - t0})
    run.close()
    return run


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
        for key in ("mode", "algo", "gold_reward", "proxy_reward", "kl", "rm_accuracy", "tokens_per_second"):
            print(f"{'rl ' + key:>18}: {rl[key]}")
