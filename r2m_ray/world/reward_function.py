"""The world's gold reward as an `rl.reward.mode=function` reward function (an example to copy).

    rl.reward.mode=function rl.reward.function.path=r2m_ray.world.reward_function:gold

trains on the same reward as `rl.reward.mode=gold`, through the annotator's function path instead
of the driver. `world` (in rl.reward.function.kwargs) takes the world's config overrides when the
run's world is not the default one, e.g. `rl.reward.function.kwargs={world: {gold: {lambda_len: 0.1}}}`.
"""

from __future__ import annotations

from typing import Any

from r2m_ray.world.config import WorldConfig
from r2m_ray.world.gold import gold_rewards


def gold(prompts: list[list[dict]], completions: list[str], world: dict | None = None, **kwargs: Any) -> list[float]:
    """g(x, y) of each row (world/gold.py): the world prompt is the last message of the chat prompt."""
    cfg = WorldConfig.model_validate(world or {})
    return gold_rewards([messages[-1]["content"] for messages in prompts], completions, cfg)
