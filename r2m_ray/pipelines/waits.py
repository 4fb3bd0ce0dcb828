"""Driver waits with deadlines, shared by the RL and RM stages.

A hung actor (alive, not answering) is not a dead one and Ray reports nothing, so every wait of
a driver has a deadline from config; a missed one, like a dead actor, raises ActorLost and the
stage decides what to restart.
"""

from __future__ import annotations

import time
from typing import Any

import ray

ACTOR_LOST = (ray.exceptions.RayActorError,)  # ActorDiedError, ActorUnavailableError


class ActorLost(RuntimeError):
    """An actor Ray cannot bring back in place: the stage restarts from its last checkpoint."""


def get_one(ref: ray.ObjectRef, what: str, timeout_s: float, key: str = "rl.wait_timeout_s") -> Any:
    """ray.get with a deadline (set by config `key`); no answer in time raises ActorLost (the stage restarts)."""
    try:
        return ray.get(ref, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise ActorLost(f"{what}: no answer within {key}={timeout_s:g} s (hung)") from None


def get_all(
    refs: list[ray.ObjectRef], what: str, timeout_s: float | None = None, key: str = "rl.wait_timeout_s"
) -> list[Any]:
    """ray.get of every ref, failing at the FIRST failure: when one DeepSpeed rank dies the others
    wait in a collective, so a plain ray.get of the list would wait with them. With `timeout_s`
    (the config `key` that set it), refs not done by then raise ActorLost too (a hung rank or
    collective ends in a stage restart)."""
    pending = list(refs)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while pending:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        done, pending = ray.wait(pending, num_returns=1, timeout=left)
        if not done:
            raise ActorLost(f"{what}: {len(pending)} call(s) did not return within {key}={timeout_s:g} s")
        try:
            ray.get(done[0])
        except ACTOR_LOST as err:
            raise ActorLost(f"{what}: {type(err).__name__}") from err
    return ray.get(list(refs))
