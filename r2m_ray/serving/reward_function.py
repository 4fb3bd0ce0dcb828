"""rl.reward.mode=function: a Python reward function named by its import path, `package.module:function`.

The RewardAnnotator imports it (so it runs where the reward runs, on the annotator's node and
resources) and calls it once per batch of rows:

    fn(prompts, completions, **kwargs) -> sequence of float | None

- `prompts[i]`: the row's prompt as chat messages (`[{"role": "user", "content": ...}, ...]`);
- `completions[i]`: the policy's response text;
- `kwargs`: `rl.reward.function.kwargs` from the config, `step` (0-based RL step, or None outside
  the step's scoring), and, when the call scores an RL step's samples, the prompt set's own
  columns (e.g. a reference answer) as lists aligned with the rows. Held-out accuracy and the
  hacking line call it without those columns: a function that needs them should take them as
  keyword arguments with a default.

The signature is TRL's (`reward_funcs`), so a TRL reward function taking conversational prompts and
string completions works unchanged. A None (or NaN/inf) reward is counted and the step skipped,
like any non-finite reward; a wrong length, a non-number or an exception is an error that names the
function and the row. `r2m_ray.world.reward_function:gold` is the world's gold reward as an example.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import math
import numbers
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


class RewardFunctionError(ValueError):
    """The reward function could not be loaded, failed, or returned something that is not one reward per row."""


def load_reward_function(path: str, key: str = "rl.reward.function.path") -> Callable[..., Any]:
    """The callable at `package.module:function` (a dotted attribute after the colon is allowed)."""
    module_name, sep, attr = (path or "").partition(":")
    if not sep or not module_name or not attr:
        raise RewardFunctionError(f"{key}: expected `package.module:function`, got {path!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise RewardFunctionError(
            f"{key}: cannot import {module_name!r} ({err}); it must be importable where the annotator runs "
            "(installed, on PYTHONPATH, or shipped with `ray job submit --working-dir`)"
        ) from None
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise RewardFunctionError(f"{key}: module {module_name!r} has no attribute {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise RewardFunctionError(f"{key}: {path} is a {type(target).__name__}, not a function")
    return target


def reward_function_digest(path: str, kwargs: dict[str, Any]) -> str:
    """What a resume must find again: the import path, the SHA-256 of the function's source file, the kwargs."""
    fn = load_reward_function(path)
    try:
        source = inspect.getsourcefile(fn) or ""
        code = open(source, "rb").read() if source else b""
    except (OSError, TypeError):
        code = b""
    digest = hashlib.sha256(code + json.dumps(kwargs, sort_keys=True).encode()).hexdigest()
    return f"function:{path}:{digest}"


class FunctionReward:
    """Scores (prompt messages, response) rows with an imported reward function."""

    def __init__(self, path: str, kwargs: dict[str, Any]) -> None:
        self.path, self.kwargs = path, dict(kwargs)
        self.fn = load_reward_function(path)
        self.stats = {"calls": 0, "rows": 0, "nonfinite": 0}

    def score(
        self,
        prompt_messages: list[list[dict]],
        responses: list[str],
        columns: dict[str, list[Any]] | None = None,
        step: int | None = None,
    ) -> Tensor:
        """Rewards [B] (float32; NaN where the function gave None or a non-finite number), in row order."""
        n = len(responses)
        if len(prompt_messages) != n:
            raise ValueError(f"prompt_messages has {len(prompt_messages)} rows but responses has {n}")
        extra = {**(columns or {}), "step": step, **self.kwargs}
        try:
            out = self.fn(list(prompt_messages), list(responses), **extra)
        except Exception as err:  # the user's code: say whose it was, keep the cause
            raise RewardFunctionError(f"reward function {self.path} raised {type(err).__name__}: {err}") from err
        try:
            values = list(out)
        except TypeError:
            raise RewardFunctionError(
                f"reward function {self.path} returned {type(out).__name__}; expected a list of {n} floats"
            ) from None
        if len(values) != n:
            raise RewardFunctionError(f"reward function {self.path} returned {len(values)} rewards for {n} rows")
        rewards = []
        for i, v in enumerate(values):
            if v is None:
                rewards.append(math.nan)
            elif isinstance(v, numbers.Real) or (isinstance(v, Tensor) and v.numel() == 1):
                rewards.append(float(v))
            else:
                raise RewardFunctionError(
                    f"reward function {self.path}: reward {i} is {type(v).__name__} {v!r:.60}, not a number or None"
                )
        self.stats["calls"] += 1
        self.stats["rows"] += n
        self.stats["nonfinite"] += sum(not math.isfinite(r) for r in rewards)
        return torch.tensor(rewards, dtype=torch.float32)

    def digest(self) -> str:
        return reward_function_digest(self.path, self.kwargs)


def reward_digest(reward: Any, rm_ckpt: Any) -> str:
    """The RL checkpoint's reward input (rl.reward, a RewardConfig): the RM checkpoint's SHA-256, the
    served RM's (asked now: an unreachable server stops the stage here), or the function's digest
    (imported now: a bad path stops the stage before any actor starts)."""
    from r2m_ray.run_inputs import sha256_path
    from r2m_ray.serving.reward_client import served_reward_digest

    if reward.mode == "remote":
        return served_reward_digest(reward)
    if reward.mode == "function":
        return reward_function_digest(reward.function.path, reward.function.kwargs)
    return sha256_path(rm_ckpt)


def reward_source(reward: Any, rm_ckpt: Any) -> str:
    """Where the reward came from, for the summary: the RM checkpoint, the server's URL or the function."""
    if reward.mode == "remote":
        return reward.remote_url()
    if reward.mode == "function":
        return reward.function.path
    return str(rm_ckpt)


NOT_COLUMNS = ("prompt_messages", "prompt_input_ids", "prompt")  # the prompt itself is the first argument


def row_columns(rows: Any, index: list[int]) -> dict[str, list[Any]]:
    """The prompt set's own columns (a datasets.Dataset of the step's prompts), one entry per sample."""
    return {c: [rows[c][i] for i in index] for c in rows.column_names if c not in NOT_COLUMNS}
