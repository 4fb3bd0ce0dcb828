"""Where each RL role's actors run: one placement group per role (or per colocated set of roles).

`rl.placement.enabled: false` (default) leaves placement to Ray's scheduler, which is what a
single box wants. On a cluster, each role gets a placement group whose bundles are its actors'
resources (CPUs, GPUs, plus any custom resources that pick a node type, e.g. `{rollout_node: 1}`)
with the role's strategy: PACK keeps a role's actors together (NCCL within a node), SPREAD puts
them on different nodes (independent rollout engines survive a node loss together less often).
Roles listed together in `colocate` share ONE placement group: bundle i holds actor i of every
role in the set (as OpenRLHF colocates actor, reference and reward models on the same GPUs), so
their resources per bundle are summed.

`PlacementPlan.options(role, i)` gives the `.options(...)` of actor i of a role; the rl stage
creates every actor through it, and records the node each actor landed on in summary.json.
"""

from __future__ import annotations

from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from r2m_ray.rl_config import ROLES, RLConfig

PG_READY_TIMEOUT_S = 600
MIN_BUNDLE_CPU = 0.01


def role_demands(rl: RLConfig) -> dict[str, list[dict[str, float]]]:
    """Per role, one resource dict per actor (CPU, GPU and the role's custom resources)."""
    pl = rl.placement

    def actor(cpus: float, gpus: float, role: str) -> dict[str, float]:
        return {"CPU": cpus, **({"GPU": gpus} if gpus else {}), **getattr(pl, role).resources}

    reward = [actor(rl.reward.num_cpus_per_annotator, rl.reward.num_gpus_per_annotator, "reward")]
    if rl.reward.mode == "r2m":  # the head learner
        reward.append(actor(rl.reward.num_cpus_per_head_learner, rl.reward.num_gpus_per_head_learner, "reward"))
    return {
        "rollout": [
            actor(rl.rollout.num_cpus_per_actor, rl.rollout.num_gpus_per_actor, "rollout")
            for _ in range(rl.rollout.num_actors)
        ],
        "policy": [
            actor(rl.policy.num_cpus_per_rank, rl.policy.num_gpus_per_rank, "policy") for _ in range(rl.policy.ranks)
        ],
        "reference": [actor(rl.reference_num_cpus, rl.reference_num_gpus, "reference")],
        "reward": reward,
    }


class PlacementPlan:
    """The placement groups of one rl stage; `options(role, i)` for each actor, `remove()` at the end."""

    def __init__(self, rl: RLConfig) -> None:
        self.enabled = rl.placement.enabled
        self.demands = role_demands(rl)
        self.groups: dict[str, PlacementGroup] = {}
        if not self.enabled:
            return
        colocated = [list(s) for s in rl.placement.colocate]
        alone = [[r] for r in ROLES if not any(r in s for s in colocated)]
        for roles in colocated + alone:
            bundles = []
            for i in range(max(len(self.demands[r]) for r in roles)):
                bundle: dict[str, float] = {}
                for r in roles:
                    for k, v in (self.demands[r][i] if i < len(self.demands[r]) else {}).items():
                        if v:
                            bundle[k] = bundle.get(k, 0.0) + v
                # Ray refuses empty bundles; an actor that reserves nothing still gets its slot
                bundles.append(bundle or {"CPU": MIN_BUNDLE_CPU})
            strategy = getattr(rl.placement, roles[0]).strategy
            pg = placement_group(bundles, strategy=strategy, name=f"r2m-{'+'.join(roles)}")
            self.groups.update({r: pg for r in roles})
        pgs = list({id(pg): pg for pg in self.groups.values()}.values())
        try:
            ray.get([pg.ready() for pg in pgs], timeout=PG_READY_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            self.remove()
            raise ValueError(
                f"rl.placement: the cluster cannot hold these placement groups within {PG_READY_TIMEOUT_S}s: "
                f"{[pg.bundle_specs for pg in pgs]}; check the roles' resources against the nodes' resources"
            ) from None

    def options(self, role: str, index: int) -> dict[str, Any]:
        """`.options(**...)` of actor `index` of `role`: its resources, and its bundle when placed."""
        demand = dict(self.demands[role][index])
        opts: dict[str, Any] = {"num_cpus": demand.pop("CPU"), "num_gpus": demand.pop("GPU", 0.0)}
        if demand:
            opts["resources"] = demand
        if role in self.groups:
            pg = self.groups[role]
            opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                placement_group=pg, placement_group_bundle_index=index
            )
        return opts

    def remove(self) -> None:
        """Release the reserved resources."""
        for pg in {id(pg): pg for pg in self.groups.values()}.values():
            remove_placement_group(pg)
        self.groups = {}


def actor_nodes(actors: list[Any]) -> list[str]:
    """The node id each actor runs on (for summary.json and the placement tests)."""
    return ray.get([a.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()) for a in actors])


def _where(self: Any) -> dict[str, Any]:
    import os

    return {"node": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}


def actor_processes_async(actors: list[Any]) -> list[ray.ObjectRef]:
    """Refs to each actor's node id and pid (a caller bounds the wait)."""
    return [a.__ray_call__.remote(_where) for a in actors]


def actor_processes(actors: list[Any]) -> list[dict[str, Any]]:
    """Node id and pid of each actor (written to the run dir's actors.json)."""
    return ray.get(actor_processes_async(actors))
