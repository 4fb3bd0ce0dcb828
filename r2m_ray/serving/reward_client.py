"""The client side of `r2m-ray serve`: rewards from a served RM over HTTP (`rl.reward.mode=remote`).

The RL stage's annotator sends each step's (prompt messages, response) rows to `POST /score`, so
the server encodes them with the RM's own chat template exactly as a local frozen RM would.
Requests are split to the server's `max_items_per_request` (read from `/info` at start-up).
Connection errors, timeouts and 5xx answers (503 = the server's queue is full) are retried
`retries` times with exponential back-off. A 4xx is not retried: it is this side's fault, and the
error names the status and the server's message. A `null` reward (NaN/inf on the server) becomes NaN
here, and the stage counts and skips it like any non-finite reward.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any

import torch
from torch import Tensor

log = logging.getLogger(__name__)

MIN_TOKEN_CHARS = 16


def read_token(env: str, key: str = "serve.token_env") -> str:
    """The bearer token from the environment variable `env`, or a clear error naming it and `key`."""
    token = os.environ.get(env, "")
    if len(token) < MIN_TOKEN_CHARS:
        raise ValueError(
            f"set a bearer token of at least {MIN_TOKEN_CHARS} characters in the environment variable {env} "
            f"({key}), e.g. `export {env}=$(openssl rand -hex 24)`; it is never read from a file"
        )
    return token


class RemoteRewardError(RuntimeError):
    """The reward server refused a request or could not be reached within the retries."""


class RemoteReward:
    """Scores (prompt messages, response) rows with a reward server."""

    def __init__(self, url: str, token: str, timeout_s: float = 60.0, retries: int = 3, max_items: int = 256) -> None:
        import httpx

        self.url = url.rstrip("/")
        self.retries, self.timeout_s = retries, timeout_s
        self.client = httpx.Client(timeout=timeout_s, headers={"Authorization": f"Bearer {token}"})
        self.stats = {"requests": 0, "retries": 0, "rows": 0, "nonfinite": 0}
        self.server = self._call("GET", "/info")
        self.max_items = min(max_items, int(self.server["limits"]["max_items_per_request"]))

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        import httpx

        for attempt in range(self.retries + 1):
            try:
                r = self.client.request(method, f"{self.url}{path}", json=body)
            except httpx.HTTPError as err:  # refused, reset, timed out: the server may be restarting
                problem = f"{type(err).__name__}: {err}"
            else:
                if r.status_code == 200:
                    self.stats["requests"] += 1
                    return r.json()
                if r.status_code < 500:
                    raise RemoteRewardError(f"reward server {self.url}{path} answered {r.status_code}: {_detail(r)}")
                problem = f"{r.status_code}: {_detail(r)}"
            if attempt < self.retries:
                self.stats["retries"] += 1
                log.warning("reward server %s%s: %s; retry %d/%d", self.url, path, problem, attempt + 1, self.retries)
                time.sleep(min(0.5 * 2**attempt, 8.0))
        raise RemoteRewardError(
            f"reward server {self.url}{path}: {problem} after {self.retries} retries (rl.reward.remote.retries, "
            f"timeout rl.reward.remote.timeout_s={self.timeout_s})"
        )

    def score(self, prompt_messages: list[list[dict]], responses: list[str]) -> Tensor:
        """Rewards [B] (float32; NaN where the server returned null) of (prompt, response) rows, in order:
        `POST /score`, the RM's own chat template."""
        if len(prompt_messages) != len(responses):
            raise ValueError(f"prompt_messages has {len(prompt_messages)} rows but responses has {len(responses)}")
        conversations = [[*m, {"role": "assistant", "content": r}] for m, r in zip(prompt_messages, responses)]
        # an empty reply (the policy's bare eos) is a real sample: scored, as a local frozen RM scores it
        return self._rewards("/score", "messages", conversations, {"allow_empty": True})

    def query(self, texts: list[str]) -> Tensor:
        """Rewards [B] of whole prompt + response texts (`POST /get_reward`, OpenRLHF's form), in order."""
        return self._rewards("/get_reward", "query", texts, {})

    def _rewards(self, path: str, field: str, items: list[Any], extra: dict[str, Any]) -> Tensor:
        out: list[float] = []
        for start in range(0, len(items), self.max_items):
            chunk = items[start : start + self.max_items]
            rewards = self._call("POST", path, {field: chunk, **extra})["rewards"]
            if len(rewards) != len(chunk):
                raise RemoteRewardError(f"reward server {self.url}: {len(rewards)} rewards for {len(chunk)} rows")
            out += [math.nan if r is None else float(r) for r in rewards]
        self.stats["rows"] += len(out)
        self.stats["nonfinite"] += sum(not math.isfinite(r) for r in out)
        return torch.tensor(out, dtype=torch.float32)

    def digest(self) -> str:
        """The served checkpoints' SHA-256 (joined when they are an ensemble): what a resume must find again."""
        return "+".join(c["sha256"] for c in self.server["checkpoints"])


def served_reward_digest(reward: Any) -> str:
    """The digest of the RM behind rl.reward.remote (a RewardConfig), asked from the driver before any
    actor starts: an unreachable server or a refused token stops the stage here, by name."""
    token = read_token(reward.remote.token_env, "rl.reward.remote.token_env")
    client = RemoteReward(reward.remote_url(), token, reward.remote.timeout_s, reward.remote.retries)
    return "remote:" + client.digest()


def _detail(response: Any) -> str:
    try:
        return str(response.json().get("detail", response.text))[:300]
    except ValueError:
        return response.text[:300]
