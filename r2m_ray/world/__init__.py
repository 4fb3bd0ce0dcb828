"""The synthetic preference world: verifiable tasks, a gold reward, biased preference splits.

See docs/results.md ("The synthetic world's calibration") for what the world must show; `calibrate` measures it.
"""

from r2m_ray.world.build import (
    PREFERENCE_SPLITS,
    SPLITS,
    build_world,
    corpus,
    write_splits,
    write_world,
)
from r2m_ray.world.calibration import calibrate, format_calibration
from r2m_ray.world.config import WorldConfig
from r2m_ray.world.gold import GoldParts, gold_parts, gold_reward, gold_rewards, optimal_responses, parse_response
from r2m_ray.world.tasks import Task, parse_task

__all__ = [
    "PREFERENCE_SPLITS",
    "SPLITS",
    "GoldParts",
    "Task",
    "WorldConfig",
    "build_world",
    "calibrate",
    "corpus",
    "format_calibration",
    "gold_parts",
    "gold_reward",
    "gold_rewards",
    "optimal_responses",
    "parse_response",
    "parse_task",
    "write_splits",
    "write_world",
]
