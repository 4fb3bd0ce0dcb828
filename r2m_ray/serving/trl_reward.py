"""A served RM as a reward function for TRL's GRPOTrainer / RLOOTrainer (or any trainer that calls
`f(prompts, completions, **kwargs) -> list[float | None]`).

    from r2m_ray.serving.trl_reward import ServedReward
    trainer = GRPOTrainer(model=..., reward_funcs=[ServedReward()], ...)   # URL and token from the environment

TRL hands a reward function either plain texts (a "standard" dataset: `prompts[i]` is the prompt as
the policy saw it, `completions[i]` the generated text) or conversations (a "conversational"
dataset: `prompts[i]` a list of messages, `completions[i]` `[{"role": "assistant", "content": ...}]`).
Conversations go to `POST /score`, where the RM renders them with its OWN chat template (the policy's
tokenizer may differ); plain texts go to `POST /get_reward` as prompt + completion, tokenised as they
are. A NaN/inf reward comes back as None, which TRL treats as "not applicable" (it ignores it in
the weighted sum and logs it). Retries, timeouts and the item limit are serving/reward_client.py's.
"""

from __future__ import annotations

import math
import os
from typing import Any

from r2m_ray.serving.reward_client import RemoteReward, read_token


class ServedReward:
    """Callable reward of an `r2m-ray serve` server; `__name__` is what TRL logs it as."""

    def __init__(
        self,
        url: str | None = None,
        url_env: str = "R2M_RAY_REWARD_URL",
        token_env: str = "R2M_RAY_SERVE_TOKEN",
        timeout_s: float = 60.0,
        retries: int = 3,
        name: str = "r2m_served_rm",
    ) -> None:
        url = url or os.environ.get(url_env, "")
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"ServedReward: give the server's URL (http://host:port) or set {url_env}; got {url!r}")
        self.client = RemoteReward(url, read_token(token_env, "ServedReward(token_env=...)"), timeout_s, retries)
        self.__name__ = name

    def __call__(self, prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float | None]:
        """One reward per completion, in order (None where the server's reward is NaN/inf)."""
        if len(prompts) != len(completions):
            raise ValueError(f"ServedReward: {len(prompts)} prompts but {len(completions)} completions")
        if not completions:
            return []
        if isinstance(completions[0], list):  # conversational: messages, the RM's own template
            replies = []
            for i, c in enumerate(completions):
                if not (isinstance(c, list) and c and isinstance(c[-1], dict) and "content" in c[-1]):
                    raise ValueError(f"ServedReward: completions[{i}] must be a list of messages, got {c!r:.80}")
                replies.append(c[-1]["content"])
            rewards = self.client.score([list(p) for p in prompts], replies).tolist()
        else:
            rewards = self.client.query([f"{p}{c}" for p, c in zip(prompts, completions)]).tolist()
        return [r if math.isfinite(r) else None for r in rewards]
