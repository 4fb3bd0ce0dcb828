"""What the world knows exactly about each preference pair's prompt-free part (Mao et al.'s r2).

Gold is g(x, y) = correctness(x, y) − λ_len·excess(x, y) − λ_phrase·[phrase in y] (gold.py). Its
style terms are the prompt-free part: for a pair (x, y_c, y_r)

    Δg2 = −λ_len·(excess_c − excess_r) − λ_phrase·([phrase in y_c] − [phrase in y_r])

(excess counts tokens beyond x's minimal answer, so within one pair the prompt's share cancels
unless a response is shorter than that answer). The planted feature is what the bias selected on
in train (world.bias.kind): the length difference in world tokens, or the phrase difference. A
reward model that learned gold's style has a prompt-free gap Δr2 that rises with Δg2; one that
learned the planted bias has a Δr2 that rises with the feature instead (length: opposite signs).
"""

from __future__ import annotations

from collections.abc import Sequence

from r2m_ray.world.config import WorldConfig
from r2m_ray.world.gold import GoldParts, gold_parts
from r2m_ray.world.tasks import parse_task


def prompt_free_gold(parts: GoldParts, cfg: WorldConfig) -> float:
    """The prompt-free (style) part of one response's gold: −λ_len·excess − λ_phrase·[phrase]."""
    return -cfg.gold.lambda_len * parts.excess_tokens - cfg.gold.lambda_phrase * float(parts.has_phrase)


def pair_truth(
    prompts: Sequence[str], chosen: Sequence[str], rejected: Sequence[str], cfg: WorldConfig
) -> dict[str, list]:
    """Per pair: `free_gap` Δg2, `related_gap` (the correctness gap, Δg − Δg2), `feature_gap` (the
    planted feature of chosen minus rejected: world tokens for `length` and `none`, 0/1 for `phrase`)
    and `family` (the task family, from the prompt)."""
    if not len(prompts) == len(chosen) == len(rejected):
        raise ValueError(f"pair_truth: {len(prompts)} prompts, {len(chosen)} chosen, {len(rejected)} rejected")
    pc = gold_parts(list(prompts), list(chosen), cfg)
    pr = gold_parts(list(prompts), list(rejected), cfg)
    phrase = cfg.bias.kind == "phrase"
    return {
        "free_gap": [prompt_free_gold(c, cfg) - prompt_free_gold(r, cfg) for c, r in zip(pc, pr)],
        "related_gap": [c.correctness - r.correctness for c, r in zip(pc, pr)],
        "feature_gap": [
            float(c.has_phrase) - float(r.has_phrase) if phrase else float(c.n_tokens - r.n_tokens)
            for c, r in zip(pc, pr)
        ],
        "family": [parse_task(p).family for p in prompts],
    }
