"""A three-node local Ray cluster (ray.cluster_utils) running the small pipeline with placement.

Run by tests/test_multinode.py in its own process (a Cluster needs its own ray.init):
    python -m tests.multinode_job OUT_DIR BASE_RUN
BASE_RUN is a run directory holding checkpoints/sft and checkpoints/rm-0 (the test session's): the
RL stage starts from them, so the cluster runs the stage whose roles are placed, nothing else.
Prints one JSON line: the rl summary's placement (node id per actor, per role) and each
node's custom resources, so the test can check where every role landed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import ray
from ray._private import ray_constants
from ray.cluster_utils import Cluster

from r2m_ray.config import load_config
from r2m_ray.pipelines.full_run import run_pipeline
from tests.conftest import ROOT, rl_overrides

PLACEMENT = [
    "rl.placement.enabled=true",
    "rl.placement.rollout.resources={rollout_node: 1}",
    "rl.placement.policy.resources={learner_node: 1}",
    "rl.placement.reward.resources={learner_node: 1}",
    "rl.placement.colocate=[[policy, reference]]",
    "rl.rollout.num_actors=2",
]


def main(out: Path, base: Path) -> None:
    ray_constants.ENABLE_RAY_CLUSTER = False  # every node on loopback, as in local runs
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    cluster.add_node(num_cpus=2, resources={"rollout_node": 2})
    cluster.add_node(num_cpus=4, resources={"learner_node": 4})
    cluster.wait_for_nodes()
    try:
        cfg = load_config(
            ROOT / "jobs" / "quickstart.yaml",
            rl_overrides(out, base, f"ray.address={cluster.address}", *PLACEMENT),
        )
        run = run_pipeline(cfg, run_dir=out / "run")
        summary = json.loads((run.path / "summary.json").read_text())["rl"]
        nodes = {n["NodeID"]: {k: v for k, v in n["Resources"].items() if k.endswith("_node")} for n in ray.nodes()}
        result = {"placement": summary["placement"], "nodes": nodes, "steps": summary["steps"]}
        print("MULTINODE_RESULT " + json.dumps(result))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
