"""Placement across nodes: a three-node local cluster (ray.cluster_utils), a full small pipeline.

The head node runs the driver; one node offers `rollout_node`, another `learner_node`. With
rl.placement on, the rollout engines must land on the rollout node, and the policy ranks, the
reference (colocated with the policy) and the reward actors on the learner node; the RL steps
then run with the weights, hidden states and rewards crossing nodes through Ray.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


# Long by design: a three-node cluster needs a process of its own (a second ray.init), so the RL
# stage's actors start there again; it shares the session's SFT policy and RM.
@pytest.mark.timeout(600)
def test_roles_land_on_their_nodes_and_rl_steps_run_across_nodes(trained, tmp_path):
    """The RL stage from the session's SFT policy and RM, on a cluster of its own (a subprocess)."""
    _, base = trained
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.multinode_job", str(tmp_path), str(base)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("MULTINODE_RESULT "))
    result = json.loads(line.split(" ", 1)[1])
    nodes, placement = result["nodes"], result["placement"]
    rollout_node = next(n for n, r in nodes.items() if "rollout_node" in r)
    learner_node = next(n for n, r in nodes.items() if "learner_node" in r)
    assert placement["rollout"] == [rollout_node, rollout_node]
    assert placement["policy"] == [learner_node]
    assert placement["reference"] == [learner_node]  # colocated with the policy
    assert placement["reward"] == [learner_node, learner_node]  # annotator and head learner
    assert result["steps"] == 2
