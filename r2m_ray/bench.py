"""`r2m-ray bench rm`: throughput of the RM stage and the overhead of GRM and the prioritiser.

Runs the same short RM training three times (plain BT, GRM-sft, BT + prioritiser in
reweight mode) on one world and one initial model, and writes JSON with pairs/s and
the step-time ratios. Goals (not tests): GRM ≤ 1.10×, prioritiser ≤ 1.25× plain BT.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from r2m_ray.atomic_write import atomic_write_text
from r2m_ray.config import RunConfig
from r2m_ray.ray_setup import init_ray
from r2m_ray.rundir import ExistPolicy, RunDir


def write_bench_report(report: dict[str, Any], out: str | None, run: RunDir, default_name: str) -> dict[str, Any]:
    """Write `report` as JSON to `out` (default: the bench run's directory), close the run; returns the
    report with its path under "json"."""
    path = Path(out) if out else run.path / default_name
    atomic_write_text(path, json.dumps(report, indent=2) + "\n")
    report["json"] = str(path)
    run.close()
    return report


def rl_bench_models(cfg: RunConfig, run: RunDir) -> tuple[dict[str, Path], Path, Path]:
    """(world files, policy, RM checkpoint) for an RL benchmark, built in `run`: the policy is
    rl.policy_checkpoint when given, else the SFT checkpoint when the config's stages include sft
    (the quickstart), else the base model (the smol presets are instruction-tuned); the RM is
    rl.reward.checkpoint when given, else trained from the policy by the config's rm stage."""
    from r2m_ray.pipelines.full_run import base_model_dir, run_world
    from r2m_ray.pipelines.rm_stage import run_rm_stage
    from r2m_ray.pipelines.sft_stage import run_sft_stage

    world = run_world(cfg, run)
    if cfg.rl.policy_checkpoint:
        policy_dir = Path(cfg.rl.policy_checkpoint)
    else:
        policy_dir = base_model_dir(cfg)
        if "sft" in cfg.stages:
            policy_dir, _ = run_sft_stage(cfg, run, policy_dir, world)
    init_ray(cfg.ray)
    if cfg.rl.reward.checkpoint:
        return world, policy_dir, Path(cfg.rl.reward.checkpoint)
    return world, policy_dir, Path(run_rm_stage(cfg, run, policy_dir, world)["checkpoints"][0])


def learner_threads(ranks: int, num_cpus_per_rank: float, torch_threads: int | None) -> int:
    """Total torch threads of a learner group, as LearnerGroup sets them."""
    return ranks * (torch_threads or max(1, int(num_cpus_per_rank)))


def policy_learner_mfu(run_path: Path, peak: float) -> dict[str, Any]:
    """The RL run's policy-learner MFU from its metrics.jsonl (eval/flops.py), against `peak` FLOP/s.

    `mfu` divides the training FLOPs by the learner's own seconds inside its train calls (the
    slowest rank's); `mfu_policy_phase` by the driver's policy phase, which adds the Ray round trip
    and the batch transfer.
    """
    from r2m_ray.eval.flops import mfu

    rows = [json.loads(line) for line in (run_path / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("stage") == "rl" and "train_flops" in r.get("policy", {})]
    flops = sum(r["policy"]["train_flops"] for r in rows)
    seconds = sum(r["policy"]["train_seconds"] for r in rows)
    phase = sum(r["phase_seconds"]["policy"] for r in rows)
    return {
        "train_flops": flops,
        "train_seconds": seconds,
        "achieved_flops_per_second": flops / seconds if seconds else 0.0,
        "mfu": mfu(flops, seconds, peak),
        "mfu_policy_phase": mfu(flops, phase, peak),
        "steps": len(rows),
    }


def measured_peak(cfg: RunConfig) -> dict[str, Any]:
    """The fp32 GEMM peak on the policy learner's thread count (the learner trains in fp32)."""
    from r2m_ray.eval.flops import gemm_peak_flops

    p = cfg.rl.policy
    threads = learner_threads(p.ranks, p.num_cpus_per_rank, p.torch_threads)
    return {"dtype": "float32", "threads": threads, "n": 2048, "flops_per_second": gemm_peak_flops(threads)}


VARIANTS = {
    "bt": {"grm": {"regulariser": "none"}, "prioritizer": {"enabled": False}},
    "grm_sft": {"grm": {"regulariser": "sft"}, "prioritizer": {"enabled": False}},
    "bt_prioritized": {"grm": {"regulariser": "none"}, "prioritizer": {"enabled": True, "mode": "reweight"}},
}


def bench_rm(
    cfg: RunConfig, out: str | None = None, run_dir: str | None = None, exist: ExistPolicy = "new"
) -> dict[str, Any]:
    """Train each variant for cfg.rm.max_steps (default 100) steps; return and write the JSON."""
    from r2m_ray.models.registry import load_tokenizer
    from r2m_ray.pipelines.full_run import base_model_dir, run_world
    from r2m_ray.pipelines.rm_stage import keep_learners, load_split, train_member

    run = RunDir.create(cfg.model_copy(update={"name": f"bench-rm-{cfg.name}"}), run_dir, exist)
    world = run_world(cfg, run) if cfg.data.train is None else {}
    model_dir = base_model_dir(cfg)
    tokenizer = load_tokenizer(model_dir)
    init_ray(cfg.ray)
    train = load_split(cfg.data.train or str(world["train"]), cfg, "train", tokenizer, run)
    results: dict[str, Any] = {}
    # a short throw-away run first: the first steps of a process pay for lazy init and
    # allocator warm-up, which would otherwise be charged to whichever variant runs first
    variants = {"warmup": VARIANTS["bt"], **VARIANTS}
    with keep_learners():  # every variant trains in the warm-up's learner ranks (a new model each)
        for name, patch in variants.items():
            rm = cfg.rm.model_copy(deep=True)
            rm.max_steps = 10 if name == "warmup" else (cfg.rm.max_steps or 100)
            rm.grm = rm.grm.model_copy(update=patch["grm"])
            rm.prioritizer = rm.prioritizer.model_copy(update=patch["prioritizer"])
            variant_cfg = cfg.model_copy(update={"rm": rm})
            t0 = time.perf_counter()
            train_member(variant_cfg, run, train, model_dir, tokenizer.pad_token_id, member=0)
            if name == "warmup":
                continue
            results[name] = {
                "pairs_per_second": run.summary["pairs_per_second"],
                "train_seconds": run.summary["train_seconds"],
                "steps": run.summary["steps"],
                # start-up here is a kept group's rebuild (and the prioritiser's start), not new processes
                "wall_seconds_incl_startup": time.perf_counter() - t0,
                "learner_reused": run.summary["learner_reused"],
            }
    bt = results["bt"]["train_seconds"]
    report = {
        "benchmark": "rm",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "batch_size": cfg.rm.batch_size,
        "ranks": cfg.rm.deepspeed.ranks,
        "model_preset": cfg.model.preset,
        "variants": results,
        "bt_pairs_per_second": results["bt"]["pairs_per_second"],
        "grm_step_time_ratio": results["grm_sft"]["train_seconds"] / bt,
        "prioritizer_wall_time_ratio": results["bt_prioritized"]["train_seconds"] / bt,
        "goals": {"grm_step_time_ratio": 1.10, "prioritizer_wall_time_ratio": 1.25},
    }
    return write_bench_report(report, out, run, "bench_rm.json")


RL_VARIANTS = {  # name: (rl.reward.mode, rl.rollout.weight_sync, rl.async.max_staleness)
    "frozen": ("frozen", "object_store", 0),
    "r2m": ("r2m", "object_store", 0),
    "r2m-collective": ("r2m", "collective", 0),
    "r2m-async": ("r2m", "object_store", 1),
}


def bench_rl(
    cfg: RunConfig,
    out: str | None = None,
    run_dir: str | None = None,
    exist: ExistPolicy = "new",
    variants: tuple[str, ...] = tuple(RL_VARIANTS),
) -> dict[str, Any]:
    """RL stage throughput: frozen RM vs R2M on the same SFT policy and RM; write and return the JSON.

    Reports tokens/s, per-phase seconds, the R2M wall-time ratio to vanilla over the whole
    step loop (goal ≤ 1.05; the ratio of the phase sums is reported beside it), the
    weight-sync share of a step (goal ≤ 10%) for both sync paths, and the one-step-off async
    loop's speed-up over the synchronous one. Actor start-up is reported apart.
    """
    from r2m_ray.pipelines.rl_stage import run_rl_stage

    unknown = sorted(set(variants) - set(RL_VARIANTS))
    if unknown or not {"frozen", "r2m"} <= set(variants):
        raise ValueError(f"bench rl variants {list(variants)}: choose from {list(RL_VARIANTS)}, with frozen and r2m")
    run = RunDir.create(cfg.model_copy(update={"name": f"bench-rl-{cfg.name}"}), run_dir, exist)
    world, policy_dir, rm_ckpt = rl_bench_models(cfg, run)
    peak = measured_peak(cfg)  # on the idle machine, before any RL actor starts
    results: dict[str, Any] = {}
    # the same SFT policy and RM for every variant; r2m-collective differs from r2m only
    # in how the policy weights reach the engines (broadcast instead of the object store), and
    # r2m-async in that the engines generate one step ahead (rl.async.max_staleness=1)
    for name in variants:
        mode, weight_sync, staleness = RL_VARIANTS[name]
        rl = cfg.rl.model_copy(deep=True)
        rl.reward.mode, rl.rollout.weight_sync, rl.async_.max_staleness = mode, weight_sync, staleness
        sub = RunDir.create(cfg.model_copy(update={"rl": rl}), run.path / f"rl-{name}")
        s = run_rl_stage(cfg.model_copy(update={"rl": rl}), sub, policy_dir, rm_ckpt, world)
        sub.close()
        step_seconds = sum(s["phase_seconds"].values())
        results[name] = {
            "tokens_per_second": s["tokens_per_second"],
            "phase_seconds": s["phase_seconds"],
            "step_seconds_total": step_seconds,
            "loop_seconds": s["seconds"],  # wall time of all steps incl. waits outside the phases
            "sync_share": s["phase_seconds"]["sync"] / step_seconds,
            "startup_seconds": s["startup_seconds"],
            "steps": s["steps"],
            "max_staleness": s["max_staleness"],
            "gold_reward_final": s["gold_reward"]["final"],
            "kl_seq_final": s["kl_seq"]["final"],
            "policy_learner": policy_learner_mfu(sub.path, peak["flops_per_second"]),
        }
    frozen, r2m = results["frozen"], results["r2m"]
    report = {
        "benchmark": "rl",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "rollout": cfg.rl.rollout.model_dump(mode="json"),
        "prompts_per_step": cfg.rl.prompts_per_step,
        "steps": cfg.rl.steps,
        "variants": results,
        "gemm_peak": peak,
        "tokens_per_second": r2m["tokens_per_second"],
        "r2m_wall_time_ratio": r2m["loop_seconds"] / frozen["loop_seconds"],
        "r2m_phase_time_ratio": r2m["step_seconds_total"] / frozen["step_seconds_total"],
        "sync_share_of_step": r2m["sync_share"],
        "goals": {"r2m_wall_time_ratio": 1.05, "sync_share_of_step": 0.10},
    }
    if "r2m-collective" in results:
        report["sync_share_of_step_collective"] = results["r2m-collective"]["sync_share"]
    if "r2m-async" in results:  # one-step-off beside the synchronous loop, same work: >1 = async is faster
        report["async_speedup"] = r2m["loop_seconds"] / results["r2m-async"]["loop_seconds"]
        report["async_tokens_per_second"] = results["r2m-async"]["tokens_per_second"]
    return write_bench_report(report, out, run, "bench_rl.json")
