"""What the RL stage measures besides its losses, on the samples the policy optimised.

Every step, with the world's gold reward (world prompts only): gold and its parts
(correctness, excess tokens, filler phrase), the frozen RM's reward of the same samples,
the within-group order agreement of the used reward and of the frozen RM with gold, and
the share of reward-hacked samples (the frozen RM ranks them above every gold-optimal
answer of their prompt, gold below). Formulas: r2m_ray/eval/rl_metrics.py.

At evaluation steps: held-out RM accuracy on gold-labelled pairs WITH policy feedback (the
policy's hidden states of those pairs, head at ω(t)) and without it. At the end: the gold
win rate of the final policy against the starting policy on held-out prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from torch import Tensor

from r2m_ray.algos.feedback_similarity import precision_recall
from r2m_ray.config import RunConfig
from r2m_ray.data.preference import load_preferences
from r2m_ray.data.tokenize import encode_prompt_response
from r2m_ray.eval.rl_metrics import group_order_agreement, hacked_mask
from r2m_ray.pipelines.rl_actors import generate
from r2m_ray.world import gold_parts, gold_rewards, optimal_responses

WINRATE_SEED_STEP = 10_000_000  # the win-rate samples' seed slot: the same for the start and the end


@dataclass
class RLEvalData:
    """What the stage evaluates on besides its training samples."""

    heldout: dict[str, list] | None  # gold-labelled pairs (chosen = gold-better)
    heldout_rows: tuple[list, list] | None  # the same pairs in the policy's tokens: chosen rows, then rejected
    winrate_prompts: Dataset | None  # held-out world prompts for the final win rate


def split_eval_data(
    cfg: RunConfig, world_paths: dict[str, Path], tokenizer: Any, prompts: Dataset
) -> tuple[Dataset, RLEvalData]:
    """(training prompts, evaluation data): the last rl.winrate_prompts world prompts are held out."""
    rl, has_gold = cfg.rl, cfg.data.prompts is None
    heldout = heldout_pairs(cfg, world_paths, rl.heldout_pairs)
    rows = heldout_policy_rows(tokenizer, heldout, cfg) if heldout is not None else None
    n_out = rl.winrate_prompts if has_gold else 0
    if n_out and len(prompts) < n_out + rl.prompts_per_step:
        raise ValueError(
            f"rl.winrate_prompts={n_out} held out of {len(prompts)} prompts leaves fewer than "
            f"rl.prompts_per_step={rl.prompts_per_step} to train on; lower rl.winrate_prompts"
        )
    if not n_out:
        return prompts, RLEvalData(heldout, rows, None)
    cut = len(prompts) - n_out
    return prompts.select(range(cut)), RLEvalData(heldout, rows, prompts.select(range(cut, len(prompts))))


def heldout_pairs(cfg: RunConfig, world_paths: dict[str, Path], n: int) -> dict[str, list] | None:
    """Gold-labelled held-out pairs (the world's test_id), oriented so 'chosen' is gold-better."""
    if n == 0 or "test_id" not in world_paths:
        return None
    ds = load_preferences(str(world_paths["test_id"]), cfg.data, split="rl_heldout").dataset
    ds = ds.filter(lambda r: r["gold_chosen"] != r["gold_rejected"]).select(range(min(n, len(ds))))
    better_c = [gc > gr for gc, gr in zip(ds["gold_chosen"], ds["gold_rejected"])]
    return {
        "prompt_messages": ds["prompt_messages"],
        "chosen": [c if b else r for c, r, b in zip(ds["chosen"], ds["rejected"], better_c)],
        "rejected": [r if b else c for c, r, b in zip(ds["chosen"], ds["rejected"], better_c)],
    }


def heldout_policy_rows(tokenizer: Any, heldout: dict[str, list], cfg: RunConfig) -> tuple[list, list]:
    """(prompt ids, response ids) of the held-out chosen rows, then the rejected rows, in the policy's
    tokenizer: the order `RewardAnnotator.pairwise_accuracy` expects its feedback in."""
    prompt_ids, response_ids = [], []
    for side in ("chosen", "rejected"):
        for messages, response in zip(heldout["prompt_messages"], heldout[side]):
            enc = encode_prompt_response(tokenizer, messages, response, cfg.data.max_length, cfg.data.max_prompt_length)
            if enc is None:
                raise ValueError(
                    f"rl.heldout_pairs: a held-out response alone fills data.max_length={cfg.data.max_length}"
                )
            cut = enc.prompt_length
            prompt_ids.append(enc.input_ids[:cut])
            response_ids.append(enc.input_ids[cut:])
    return prompt_ids, response_ids


def optimal_rows(prompts: list[str], cfg: RunConfig) -> tuple[list[int], list[list[dict]], list[str]]:
    """The gold-optimal responses of each distinct prompt → (owner index per row, messages, texts)."""
    owners, messages, texts = [], [], []
    for i, prompt in enumerate(prompts):
        for response in optimal_responses(prompt, cfg.world):
            owners.append(i)
            messages.append([{"role": "user", "content": prompt}])
            texts.append(response)
    return owners, messages, texts


def best_per_owner(values: Tensor, owners: list[int], n: int) -> Tensor:
    """[n]: the highest of `values` among the rows each owner has."""
    best = torch.full((n,), float("-inf"))
    return best.scatter_reduce(0, torch.tensor(owners), values.float(), reduce="amax")


def gold_step_metrics(
    prompts: list[str],
    responses: list[str],
    used: Tensor | None,
    frozen: Tensor,
    frozen_optimal: Tensor,
    group_size: int,
    cfg: RunConfig,
) -> tuple[Tensor, Tensor, dict[str, float]]:
    """Gold of the step's samples and the metrics built on it → (gold [B], hacked [B] bool, metrics).

    `used` [B] is the reward the policy optimised (None: gold itself), `frozen` [B] the frozen RM's
    reward of the same samples, `frozen_optimal` [B] the frozen RM's best reward among each sample's
    gold-optimal answers.
    """
    parts = gold_parts(prompts, responses, cfg.world)
    gold = torch.tensor([p.gold for p in parts], dtype=torch.float64)
    grouped = (-1, group_size)
    hacked = hacked_mask(frozen.double(), frozen_optimal.double(), gold)
    used = gold if used is None else used.double()
    return (
        gold,
        hacked,
        {
            "gold_reward": float(gold.mean()),
            "gold_correctness": sum(p.correctness for p in parts) / len(parts),
            "gold_excess_tokens": sum(p.excess_tokens for p in parts) / len(parts),
            "gold_phrase_rate": sum(p.has_phrase for p in parts) / len(parts),
            "agreement_gold": group_order_agreement(used.view(grouped), gold.view(grouped)),
            "agreement_gold_frozen_rm": group_order_agreement(frozen.double().view(grouped), gold.view(grouped)),
            "hacked_rate": float(hacked.double().mean()),
        },
    )


def detector_metrics(flags: Tensor, hacked: Tensor | None) -> dict[str, float]:
    """The hacking monitor's flag rate on a step's samples; with gold, its precision and recall."""
    out = {"detector_flag_rate": float(flags.float().mean())}
    if hacked is not None:
        pr = precision_recall(flags, hacked)
        out.update(detector_precision=pr["precision"], detector_recall=pr["recall"])
    return out


def win_rate(gold_a: Tensor, gold_b: Tensor) -> float:
    """P(a sample of policy a beats one of policy b in gold) on the same prompts, ties ½; [P, K] each.

    Every sample of a is compared with every sample of b for the same prompt.
    """
    if gold_a.dim() != 2 or gold_a.shape[0] != gold_b.shape[0]:
        raise ValueError(
            f"win_rate needs [P, K] tensors over the same prompts, got {tuple(gold_a.shape)}, {tuple(gold_b.shape)}"
        )
    diff = gold_a.unsqueeze(2) - gold_b.unsqueeze(1)  # [P, Ka, Kb]
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())


def heldout_gold(actors: Any, prompts: Dataset, cfg: RunConfig) -> list[list[float]]:
    """Gold of K samples per held-out prompt from the engines' current weights → [P][K].

    The seed is the same at the start and the end, so the two policies are compared on common
    random numbers."""
    K = cfg.rl.rollout.samples_per_prompt
    out = generate(actors.rollouts, prompts["prompt_input_ids"], cfg, WINRATE_SEED_STEP, actors.recover_rollout)
    texts = [prompts["prompt_messages"][i][-1]["content"] for i in out["prompt_index"]]
    gold = gold_rewards(texts, out["text"], cfg.world)
    return [gold[i : i + K] for i in range(0, len(gold), K)]


def plot_gold_vs_proxy(history: list[dict[str, Any]], plots: Path) -> None:
    """Optimised reward, frozen RM reward and gold against the step and against √(sequence KL)."""
    from r2m_ray.eval.plots import plot_curve

    steps = [h["step"] for h in history]  # skipped steps have no metrics to plot
    curves = {
        "optimised reward": [h["proxy_reward"] for h in history],
        "frozen RM reward": [h["frozen_rm_reward"] for h in history],
        "gold": [h["gold_reward"] for h in history],
    }
    plot_curve(steps, curves, plots / "rl_gold_vs_proxy_step.png", "gold vs proxy reward", "RL step")
    sqrt_kl = [max(h["kl_seq"], 0.0) ** 0.5 for h in history]
    plot_curve(sqrt_kl, curves, plots / "rl_gold_vs_proxy_kl.png", "gold vs proxy reward", "√(sequence KL)")
