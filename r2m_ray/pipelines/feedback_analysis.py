"""`r2m-ray eval feedback eval.rl_run=RUN_DIR`: the R2M paper's analysis of policy feedback on an RL run.

For the policy the run started from and the policy it ended with, on the run's held-out world
prompts (the win-rate prompts, never trained on): K samples per prompt, their gold, the frozen
RM's reward and the reward-hacked truth (world: rl_measure.gold_step_metrics), and that policy's
hidden states of its own samples at every layer, pooled over the response tokens. Then, per
layer (algos/feedback_similarity.py):
- cosine similarity within vs across gold-better / gold-worse samples of a prompt;
- its correlation with the frozen RM's and with gold's reward gap over within-prompt pairs;
- the hacking detector calibrated on the held-out preference pairs (as the RL monitor is), its
  precision and recall against the world's hacked labels on the samples.
Writes feedback_analysis.json and plots/feedback_similarity.png into the eval's run directory.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from r2m_ray.algos.feedback_similarity import (
    PrototypeDetector,
    better_labels,
    pooled_states,
    precision_recall,
    similarity_gap_correlation,
    within_across,
)
from r2m_ray.atomic_write import atomic_write_text
from r2m_ray.config import ConfigError, RunConfig, load_config
from r2m_ray.data.collate import pad_ids
from r2m_ray.data.tokenize import encode_prompt_response
from r2m_ray.eval.plots import save_figure
from r2m_ray.models.registry import load_causal_lm, load_tokenizer
from r2m_ray.models.reward_model import RewardModel, position_ids_from_mask
from r2m_ray.pipelines.rl_compare import rl_history
from r2m_ray.pipelines.rl_measure import best_per_owner, gold_step_metrics, heldout_pairs, optimal_rows
from r2m_ray.pipelines.sft_stage import generate_answers
from r2m_ray.rundir import RunDir
from r2m_ray.world import build_world, write_splits

log = logging.getLogger(__name__)


@torch.no_grad()
def layer_states(
    model: Any, tokenizer: Any, messages: list, responses: list[str], cfg: RunConfig
) -> list[torch.Tensor]:
    """Pooled response states [N, D] of every layer (embeddings first) for (prompt, response) rows."""
    encoded = [
        encode_prompt_response(tokenizer, m, r, cfg.data.max_length, cfg.data.max_prompt_length)
        for m, r in zip(messages, responses)
    ]
    if any(e is None for e in encoded):
        raise ValueError("eval feedback: a sample does not fit data.max_length")
    layers: list[list[torch.Tensor]] = []
    for start in range(0, len(encoded), 64):
        chunk = encoded[start : start + 64]
        ids, attn = pad_ids([e.input_ids for e in chunk], tokenizer.pad_token_id, side="right")
        resp, _ = pad_ids([e.response_mask for e in chunk], 0, side="right")
        out = model(
            input_ids=ids, attention_mask=attn, position_ids=position_ids_from_mask(attn), output_hidden_states=True
        )
        for i, h in enumerate(out.hidden_states):
            if len(layers) <= i:
                layers.append([])
            layers[i].append(pooled_states(h, resp))
    return [torch.cat(parts) for parts in layers]


@torch.no_grad()
def frozen_rewards(
    rm: RewardModel, tokenizer: Any, messages: list, responses: list[str], cfg: RunConfig
) -> torch.Tensor:
    """The frozen RM's rewards of (prompt, response) rows."""
    out = []
    for start in range(0, len(responses), 64):
        seqs = [
            encode_prompt_response(tokenizer, m, r, cfg.data.max_length, cfg.data.max_length - 1).input_ids
            for m, r in zip(messages[start : start + 64], responses[start : start + 64])
        ]
        ids, attn = pad_ids(seqs, tokenizer.pad_token_id)
        out.append(rm(ids, attn).rewards.float())
    return torch.cat(out)


def analyse_policy(
    policy_dir: Path, prompts: list[str], rm: RewardModel, rm_tok: Any, heldout: dict[str, list], cfg: RunConfig
) -> dict[str, Any]:
    """Samples of one policy on the prompts and the per-layer analysis of its own hidden states."""
    K = cfg.rl.rollout.samples_per_prompt
    model, tok = load_causal_lm(policy_dir).eval(), load_tokenizer(policy_dir)
    messages = [[{"role": "user", "content": p}] for p in prompts for _ in range(K)]
    torch.manual_seed(cfg.seed)
    responses = generate_answers(model, tok, messages, cfg.rl.rollout.max_new_tokens, cfg.rl.rollout.temperature)
    texts = [m[-1]["content"] for m in messages]
    frozen = frozen_rewards(rm, rm_tok, messages, responses, cfg)
    owners, opt_msgs, opt_texts = optimal_rows(prompts, cfg)
    best = best_per_owner(frozen_rewards(rm, rm_tok, opt_msgs, opt_texts, cfg), owners, len(prompts))
    best = best.repeat_interleave(K)
    gold, hacked, metrics = gold_step_metrics(texts, responses, frozen, frozen, best, K, cfg)
    groups = torch.arange(len(prompts)).repeat_interleave(K)
    better, usable = better_labels(gold, groups)
    states = layer_states(model, tok, messages, responses, cfg)
    n = len(heldout["chosen"])
    calib_msgs = list(heldout["prompt_messages"]) * 2
    calib = layer_states(model, tok, calib_msgs, heldout["chosen"] + heldout["rejected"], cfg)
    calib_frozen = frozen_rewards(rm, rm_tok, calib_msgs, heldout["chosen"] + heldout["rejected"], cfg)
    hacked_pair = calib_frozen[n:] > calib_frozen[:n]
    keep = torch.cat([torch.ones(n, dtype=torch.bool), hacked_pair])
    labels = torch.cat([torch.zeros(n, dtype=torch.bool), hacked_pair])
    per_layer = []
    for layer, (pooled, calib_pooled) in enumerate(zip(states, calib)):
        row: dict[str, Any] = {"layer": layer, **within_across(pooled, better, groups, usable)}
        row["corr_similarity_rm_gap"] = similarity_gap_correlation(pooled, frozen, groups)
        row["corr_similarity_gold_gap"] = similarity_gap_correlation(pooled, gold.float(), groups)
        if hacked_pair.any():
            detector = PrototypeDetector.fit(calib_pooled[keep], labels[keep])
            row["detector"] = precision_recall(detector.flags(pooled), hacked)
        per_layer.append(row)
    return {
        "policy": str(policy_dir),
        "samples": len(responses),
        **{k: metrics[k] for k in ("gold_reward", "gold_correctness", "gold_excess_tokens", "hacked_rate")},
        "frozen_rm_reward": float(frozen.mean()),
        "calibration_hacked_pairs": int(hacked_pair.sum()),
        "layers": per_layer,
        "examples": [
            {"prompt": t, "response": r, "gold": float(g), "frozen_rm": float(f), "hacked": bool(h)}
            for t, r, g, f, h in list(zip(texts, responses, gold, frozen, hacked))[:8]
        ],
    }


def monitor_summary(history: list[dict[str, Any]]) -> dict[str, Any]:
    """The RL run's own hacking monitor (rl.hacking_monitor), averaged over the steps where it flagged
    something: flag rate, precision and recall against the world's hacked labels, and the hacked base
    rate of those steps (precision above it = the flags carry information)."""
    rows = [h for h in history if _finite(h.get("detector_precision"))]
    if not rows:
        return {"steps": 0}
    keys = ("detector_flag_rate", "detector_precision", "detector_recall", "hacked_rate")
    return {
        "steps": len(rows),
        **{k: float(np.nanmean([h[k] if _finite(h.get(k)) else math.nan for h in rows])) for k in keys},
    }


def _finite(value: Any) -> bool:
    return value is not None and math.isfinite(value)


def plot_similarity(result: dict[str, Any], path: Path) -> Path:
    """Per layer: within − across cosine gap, similarity–RM-gap correlation, detector precision/recall."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for name, res in result["policies"].items():
        layers = [r["layer"] for r in res["layers"]]
        axes[0].plot(layers, [r["gap"] for r in res["layers"]], marker="o", label=name)
        axes[1].plot(layers, [r["corr_similarity_rm_gap"] for r in res["layers"]], marker="o", label=name)
        if all("detector" in r for r in res["layers"]):
            axes[2].plot(
                layers, [r["detector"]["precision"] for r in res["layers"]], marker="o", label=f"{name} precision"
            )
            axes[2].plot(
                layers, [r["detector"]["recall"] for r in res["layers"]], marker="x", ls="--", label=f"{name} recall"
            )
    titles = ("cos within − across gold label", "corr(cos, |frozen RM gap|)", "hacking detector")
    for ax, title in zip(axes, titles):
        ax.set_xlabel("layer (0 = embeddings)")
        ax.set_title(title)
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def run_feedback_analysis(cfg: RunConfig, run: RunDir) -> dict[str, Any]:
    """The analysis of eval.rl_run (an RL run directory of the synthetic world)."""
    if not cfg.eval.rl_run:
        raise ConfigError("eval feedback needs eval.rl_run=RUN_DIR (a finished RL run on the world's prompts)")
    rl_run = Path(cfg.eval.rl_run)
    summary_path = rl_run / "summary.json"
    if not summary_path.is_file() or "policy_start" not in json.loads(summary_path.read_text()).get("rl", {}):
        raise ConfigError(f"eval.rl_run: {rl_run} is not a finished RL run (no rl summary with policy_start)")
    rl_summary = json.loads(summary_path.read_text())["rl"]
    rl_cfg = load_config(rl_run / "config.yaml")
    if rl_cfg.data.prompts is not None:
        raise ConfigError("eval feedback needs an RL run on the world's prompts (it measures against gold)")
    splits = build_world(rl_cfg.world)
    paths = write_splits({"test_id": splits["test_id"]}, rl_cfg.world, run.path / "world")
    heldout = heldout_pairs(rl_cfg, paths, rl_cfg.rl.heldout_pairs or 256)
    n_prompts = rl_cfg.rl.winrate_prompts or 64
    prompts = list(splits["rl_prompts"]["prompt"])[-n_prompts:]  # the RL stage's held-out prompts
    rm_dir = Path(rl_summary["reward_checkpoint"])
    rm, rm_tok = RewardModel.from_pretrained(rm_dir).eval(), load_tokenizer(rm_dir)
    policies = {"start": Path(rl_summary["policy_start"]), "final": rl_run / "checkpoints" / "policy"}
    result = {
        "rl_run": str(rl_run),
        "prompts": len(prompts),
        "monitor": monitor_summary(rl_history(rl_run)),
        "policies": {
            name: analyse_policy(path, prompts, rm, rm_tok, heldout, rl_cfg) for name, path in policies.items()
        },
    }
    atomic_write_text(run.path / "feedback_analysis.json", json.dumps(result, indent=1, default=float) + "\n")
    plot_similarity(result, run.path / "plots" / "feedback_similarity.png")
    run.update_summary("feedback_analysis", {k: v for k, v in result.items() if k != "policies"})
    log.info("eval feedback: %s", run.path / "feedback_analysis.json")
    return result
