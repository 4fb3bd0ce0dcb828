"""Starting or joining Ray, and the small pieces every distributed group needs.

In-process by default, bound to loopback; joins a cluster when cfg.address or
RAY_ADDRESS is set (as `ray job submit` does). Token authentication stays on.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from r2m_ray.config import RayConfig

log = logging.getLogger(__name__)

# Environment every actor inherits: no hub, quiet tokenizers threads (they fight
# torch's threads on small CPUs), no torch compile cache races between actors.
WORKER_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
}


def init_ray(cfg: RayConfig) -> dict[str, Any]:
    """ray.init once per process; returns the cluster's resources."""
    import ray

    if ray.is_initialized():
        return ray.cluster_resources()
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    env_vars = {**WORKER_ENV}
    for key in ("PYTHONPATH", "TORCHINDUCTOR_CACHE_DIR", "R2M_RAY_CACHE"):
        if key in os.environ:
            env_vars[key] = os.environ[key]
    if address:
        # Inside `ray job submit` the job's runtime env already sets these; Ray 2.60 refuses to
        # merge two runtime envs that name the same variable, even with equal values.
        env_vars = {k: v for k, v in env_vars.items() if os.environ.get(k) != v}
        ray.init(
            address=address,
            namespace=cfg.namespace,
            runtime_env={"env_vars": env_vars} if env_vars else None,
            log_to_driver=cfg.log_to_driver,
        )
    else:
        # Measured on Ray 2.60: with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 every Ray socket
        # listens on 127.0.0.1 (_node_ip_address alone is silently overridden by eth0).
        # r2m_ray/__init__ sets it before ray is imported; if ray was imported first,
        # the constant it read must be switched off here, before the node starts.
        from ray._private import ray_constants

        if os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0") == "0":
            ray_constants.ENABLE_RAY_CLUSTER = False
        # Ray's CPU count is a scheduling slot count, not pinning: a 2-core box still
        # gets 4 slots so learner ranks and the prioritiser can be placed side by side.
        num_cpus = cfg.num_cpus or max(4, os.cpu_count() or 1)
        ray.init(
            # "local": always a new in-process cluster; without it ray.init joins whatever
            # `ray start` cluster this machine last ran (/tmp/ray/ray_current_cluster)
            address="local",
            num_cpus=num_cpus,
            include_dashboard=False,
            namespace=cfg.namespace,
            runtime_env={"env_vars": env_vars},
            log_to_driver=cfg.log_to_driver,
        )
    resources = ray.cluster_resources()
    log.info("ray resources: %s", resources)
    return resources


def node_ip() -> str:
    """This node's address as Ray sees it (loopback on a local run)."""
    import ray

    return ray.util.get_node_ip_address()


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS says is free right now on `host`."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def check_resources(role: str, count: int, num_cpus: float, num_gpus: float) -> None:
    """Fail fast, naming the role, when the cluster can never place `count` actors.

    Without this an actor that asks for more than exists waits forever in PENDING.
    """
    import ray

    total = ray.cluster_resources()
    for name, per_actor, key in (("CPU", num_cpus, "num_cpus"), ("GPU", num_gpus, "num_gpus")):
        need = per_actor * count
        have = total.get(name, 0.0)
        if need > have + 1e-9:
            raise ValueError(
                f"{role}: {count} actor(s) × {key}={per_actor} need {need:g} {name} "
                f"but the Ray cluster has {have:g} (set ray.num_cpus or lower the request)"
            )


def check_demands(what: str, demands: dict[str, list[dict[str, float]]]) -> None:
    """Fail fast, naming the role, when the cluster can never hold these actors at the same time.

    `demands`: per role, one resource dict per actor (CPU, GPU, custom resources), all alive
    together for the whole stage. Each actor must fit on one alive node, and the sum on the
    cluster; otherwise Ray leaves an actor PENDING and the stage would wait forever.
    """
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    total = ray.cluster_resources()
    sums: dict[str, float] = {}
    for role, actors in demands.items():
        for i, demand in enumerate(actors):
            for res, need in demand.items():
                sums[res] = sums.get(res, 0.0) + need
                if need > 0 and not any(node.get(res, 0.0) + 1e-9 >= need for node in nodes):
                    largest = max((node.get(res, 0.0) for node in nodes), default=0.0)
                    raise ValueError(
                        f"{what}.{role}: actor {i} asks for {need:g} {res}, more than any node of the Ray cluster "
                        f"has (the largest has {largest:g}); lower the request or add a node that has it"
                    )
    for res, need in sums.items():
        have = total.get(res, 0.0)
        if need > have + 1e-9:
            parts = ", ".join(
                f"{role} {sum(d.get(res, 0.0) for d in actors):g}"
                for role, actors in demands.items()
                if any(d.get(res, 0.0) for d in actors)
            )
            raise ValueError(
                f"{what}: its actors run at the same time and together need {need:g} {res} ({parts}) but the "
                f"Ray cluster has {have:g} (set ray.num_cpus or lower the requests)"
            )
