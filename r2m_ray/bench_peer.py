"""`r2m-ray bench peer rm CONFIG`: this project's RM learner beside TRL's RewardTrainer on the same work.

Held equal (the matching rules, also in docs/operations.md):
- the model directory (the config's base model; throughput does not depend on its weights),
  with a linear, bias-free value head on our side = the `score` layer of TRL's
  *ForSequenceClassification;
- the training pairs (the config's world, tokenised once by our tokenizer and handed to TRL
  as `chosen_ids` / `rejected_ids`, so both see the same token sequences and lengths);
- batch size, number of steps, AdamW settings, warm-up, gradient clipping, fp32/bf16;
- the torch threads: TRL's process gets as many as our learner ranks have in total;
- the loss: plain BT (no GRM, no prioritiser).
Not equal, by design: our learner runs DeepSpeed in a Ray actor fed by the driver, and packs
each batch pad-free (rm.packing); TRL's Trainer pads each batch to its longest sequence.
Each side runs `repeats` times, alternating; the JSON has every run, the medians and their ratio.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from r2m_ray.bench import learner_threads, measured_peak, policy_learner_mfu, rl_bench_models, write_bench_report
from r2m_ray.config import RunConfig
from r2m_ray.ray_setup import init_ray
from r2m_ray.rundir import ExistPolicy, RunDir


def run_peer(spec: dict[str, Any], workdir: Path, tag: str) -> dict[str, Any]:
    """Run r2m_ray.peer_trl on `spec` in a fresh process; its JSON result."""
    spec_path, out_path = workdir / f"peer_spec_{tag}.json", workdir / f"peer_result_{tag}.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "r2m_ray.peer_trl", str(spec_path), str(out_path)],
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"bench peer: the TRL run failed (exit {proc.returncode}):\n{tail}")
    return json.loads(out_path.read_text())


def check_peer_installed() -> str:
    """TRL's version, or a clear error naming the extra to install."""
    try:
        import trl
    except ImportError as err:
        raise ValueError("bench peer needs TRL, an optional extra: pip install -e '.[peer]'") from err
    return str(trl.__version__)


def bench_peer_rm(
    cfg: RunConfig, out: str | None = None, run_dir: str | None = None, exist: ExistPolicy = "new", repeats: int = 3
) -> dict[str, Any]:
    """Our RM learner and TRL's RewardTrainer, `repeats` runs each; return and write the JSON."""
    from r2m_ray.models.registry import load_tokenizer
    from r2m_ray.pipelines.full_run import base_model_dir, run_world
    from r2m_ray.pipelines.rm_stage import load_split, train_member

    trl_version = check_peer_installed()
    rm = cfg.rm.model_copy(deep=True)
    rm.max_steps = rm.max_steps or 100
    rm.grm = rm.grm.model_copy(update={"regulariser": "none"})
    rm.prioritizer = rm.prioritizer.model_copy(update={"enabled": False})
    if rm.loss != "bt" or rm.lora.enabled or rm.freeze_backbone:
        raise ValueError("bench peer rm compares full BT fine-tuning: set rm.loss=bt, no LoRA, no frozen backbone")
    model = cfg.model.model_copy(update={"value_head": "linear"})
    cfg = cfg.model_copy(update={"rm": rm, "model": model, "name": f"bench-peer-rm-{cfg.name}"})
    run = RunDir.create(cfg, run_dir, exist)
    world = run_world(cfg, run) if cfg.data.train is None else {}
    model_dir = base_model_dir(cfg)
    tokenizer = load_tokenizer(model_dir)
    init_ray(cfg.ray)
    train = load_split(cfg.data.train or str(world["train"]), cfg, "train", tokenizer, run)
    data_dir = run.path / "peer_pairs"
    pairs = train.select_columns(["chosen_input_ids", "rejected_input_ids"])
    pairs.rename_columns({"chosen_input_ids": "chosen_ids", "rejected_input_ids": "rejected_ids"}).save_to_disk(
        str(data_dir)
    )
    ds = rm.deepspeed
    threads = learner_threads(ds.ranks, ds.num_cpus_per_rank, ds.torch_threads)
    spec = {
        "kind": "rm",
        "model_dir": str(model_dir),
        "data_dir": str(data_dir),
        "batch_size": rm.batch_size,
        "steps": rm.max_steps,
        "optim": rm.optim.model_dump(mode="json"),
        "bf16": ds.bf16,
        "threads": threads,
        "seed": cfg.seed,
    }
    ours_runs, peer_runs = [], []
    for r in range(repeats):
        train_member(cfg, run, train, model_dir, tokenizer.pad_token_id, member=0)
        ours_runs.append({k: run.summary[k] for k in ("pairs_per_second", "train_seconds", "steps")})
        peer_runs.append(run_peer(spec, run.path, str(r)))
    ours = statistics.median(x["pairs_per_second"] for x in ours_runs)
    peer = statistics.median(x["pairs_per_second"] for x in peer_runs)
    report = {
        "benchmark": "peer-rm",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "peer": f"trl {trl_version} RewardTrainer",
        "held_equal": {
            "model_dir": str(model_dir),
            "value_head": "linear (TRL's score layer)",
            "pairs": len(train),
            "batch_size": rm.batch_size,
            "steps": rm.max_steps,
            "max_length": cfg.data.max_length,
            "optim": spec["optim"],
            "bf16": ds.bf16,
            "torch_threads": threads,
        },
        "ours": {"learner": f"RMLearner x{ds.ranks} (DeepSpeed ZeRO-{ds.zero_stage})", "packing": rm.packing},
        "repeats": repeats,
        "ours_runs": ours_runs,
        "peer_runs": peer_runs,
        "ours_pairs_per_second_median": ours,
        "peer_pairs_per_second_median": peer,
        "ratio": ours / peer,
        "goal_ratio": 1.5,
    }
    return write_bench_report(report, out, run, "bench_peer_rm.json")


def bench_peer_rl(
    cfg: RunConfig, out: str | None = None, run_dir: str | None = None, exist: ExistPolicy = "new", repeats: int = 3
) -> dict[str, Any]:
    """Our RL stage (frozen RM reward) and TRL's GRPOTrainer on one SFT policy and RM; write the JSON.

    Held equal: the SFT policy, the RM (trained here with a linear head and exported as a stock
    *ForSequenceClassification for TRL), the prompts (the world's RL prompts, rendered as our
    rollouts render them), prompts per step, samples per prompt, max new tokens, temperature,
    top-p, GRPO with group-scaled advantages, the clip, β = rl.policy.kl_coef, the policy epochs
    per batch (TRL's num_iterations) and optimiser steps per epoch (one per micro-batch of
    rl.policy.micro_batch_size rows; TRL's steps_per_generation), AdamW settings, the number of RL
    steps, and the CPUs (TRL's process gets every core this process may run on). Tokens/s counts
    generated tokens over the loop's wall time on both sides; ours also over its training phases
    alone (the loop adds held-out measurements every rl.eval_every steps that TRL does not make).
    """
    from r2m_ray.data.prompts import load_prompts
    from r2m_ray.data.tokenize import render_prompt
    from r2m_ray.models.export import export_sequence_classification
    from r2m_ray.models.registry import load_tokenizer
    from r2m_ray.models.reward_model import RewardModel
    from r2m_ray.pipelines.rl_stage import run_rl_stage

    trl_version = check_peer_installed()
    rl = cfg.rl.model_copy(deep=True)
    rl.reward.mode = "frozen"
    # the RM is always trained here, with a linear head, so that TRL can load its export as a stock
    # classifier; a given rl.reward.checkpoint (maybe an MLP head) is not used
    rl.reward.checkpoint = None
    if rl.policy.algo != "grpo":
        raise ValueError("bench peer rl: compares GRPO (set rl.policy.algo=grpo)")
    model = cfg.model.model_copy(update={"value_head": "linear"})
    cfg = cfg.model_copy(update={"rl": rl, "model": model, "name": f"bench-peer-rl-{cfg.name}"})
    run = RunDir.create(cfg, run_dir, exist)
    world, policy_dir, rm_ckpt = rl_bench_models(cfg, run)
    tokenizer = load_tokenizer(policy_dir)
    rm_hf = export_sequence_classification(RewardModel.from_pretrained(rm_ckpt), tokenizer, run.path / "peer_rm_hf")
    prompts = load_prompts(cfg.data.prompts or str(world["rl_prompts"]), cfg.data)
    texts = [render_prompt(tokenizer, m) for m in prompts["prompt_messages"]]
    rows = rl.prompts_per_step * rl.rollout.samples_per_prompt
    micro = math.ceil(rows / rl.policy.ranks / rl.policy.micro_batch_size)  # per rank: the optimiser steps
    if rows % micro:
        raise ValueError(f"bench peer rl: {rows} samples per step do not split into {micro} equal micro-batches")
    cpus = len(os.sched_getaffinity(0))  # the cores our actors share (Ray's CPU count may oversubscribe them)
    spec = {
        "kind": "rl",
        "policy_dir": str(policy_dir),
        "reward_model_dir": str(rm_hf),
        "prompts": texts,
        "rl": {
            "prompts_per_step": rl.prompts_per_step,
            "samples_per_prompt": rl.rollout.samples_per_prompt,
            "max_new_tokens": rl.rollout.max_new_tokens,
            "temperature": rl.rollout.temperature,
            "top_p": rl.rollout.top_p,
            "kl_coef": rl.policy.kl_coef,
            "clip_eps": rl.policy.clip_eps,
            "epochs": rl.policy.epochs,
            # ours: one optimiser step per micro-batch per epoch; TRL: steps_per_generation of them
            "micro_batches": micro,
        },
        "steps": rl.steps * rl.policy.epochs * micro,  # TRL counts optimiser steps
        "optim": rl.policy.optim.model_dump(mode="json"),
        "threads": cpus,
        "seed": cfg.seed,
    }
    peak = measured_peak(cfg)  # on the idle machine, before any RL actor starts
    ours_runs, peer_runs = [], []
    for r in range(repeats):
        sub = RunDir.create(cfg, run.path / f"rl-ours-{r}")
        s = run_rl_stage(cfg, sub, policy_dir, rm_ckpt, world)
        sub.close()
        train_phases = sum(v for k, v in s["phase_seconds"].items() if k != "eval")
        ours_runs.append(
            {
                "tokens_per_second": s["tokens_per_second"],
                "tokens_per_second_training_phases": s["tokens_per_second"] * s["seconds"] / train_phases,
                "seconds": s["seconds"],
                "seconds_per_rl_step": s["seconds"] / s["steps"],
                "phase_seconds": s["phase_seconds"],
                "startup_seconds": s["startup_seconds"],
                "steps": s["steps"],
                "policy_learner": policy_learner_mfu(sub.path, peak["flops_per_second"]),
            }
        )
        peer_runs.append(run_peer(spec, run.path, f"rl{r}"))
    ours = statistics.median(x["tokens_per_second"] for x in ours_runs)
    peer = statistics.median(x["tokens_per_second"] for x in peer_runs)
    spec_shown = {k: v for k, v in spec.items() if k != "prompts"}
    report = {
        "benchmark": "peer-rl",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "peer": f"trl {trl_version} GRPOTrainer",
        "held_equal": {**spec_shown, "prompts": len(texts)},
        "ours": {
            "reward": "frozen RM (RewardAnnotator)",
            "rollout": rl.rollout.model_dump(mode="json"),
            "policy_ranks": rl.policy.ranks,
        },
        "repeats": repeats,
        "ours_runs": ours_runs,
        "peer_runs": peer_runs,
        "ours_tokens_per_second_median": ours,
        "ours_tokens_per_second_training_phases_median": statistics.median(
            x["tokens_per_second_training_phases"] for x in ours_runs
        ),
        "peer_tokens_per_second_median": peer,
        "ratio": ours / peer,
        "goal_ratio": 2.0,
        "gemm_peak": peak,
        "policy_learner_mfu_median": statistics.median(x["policy_learner"]["mfu"] for x in ours_runs),
        "goal_policy_learner_mfu": 0.30,
    }
    return write_bench_report(report, out, run, "bench_peer_rl.json")
