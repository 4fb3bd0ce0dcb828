"""Requests the cluster can never hold fail before any actor starts, naming the role (real Ray:
the session's one node with 4 CPU slots and no GPU). Without the check the actor Ray cannot
place stays PENDING and the stage waits forever."""

from __future__ import annotations

import pytest

from r2m_ray.config import load_config
from r2m_ray.placement import role_demands
from r2m_ray.ray_setup import check_demands
from tests.conftest import ROOT, small_overrides
from tests.test_bad_input import assert_clear_error, run_cli

QUICK = ROOT / "jobs" / "quickstart.yaml"


def rl_demands(*overrides: str) -> dict:
    return role_demands(load_config(QUICK, list(overrides)).rl)


def test_the_quickstart_fits_exactly(ray_session):
    demands = rl_demands()  # 2 engines + 1 policy rank + the annotator = the session's 4 CPUs
    assert sum(d["CPU"] for actors in demands.values() for d in actors) == 4
    check_demands("rl", demands)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["rl.rollout.num_cpus_per_actor=5"], "rl.rollout: actor 0 asks for 5 CPU, more than any node"),
        (
            ["rl.policy.num_gpus_per_rank=1"],
            "rl.policy: actor 0 asks for 1 GPU, more than any node of the Ray cluster has (the largest has 0)",
        ),
        (
            ["rl.placement.enabled=true", "rl.placement.rollout.resources={rollout_node: 1}"],
            "rl.rollout: actor 0 asks for 1 rollout_node",
        ),
        (["rl.policy.ranks=3"], "together need 6 CPU (rollout 2, policy 3, reward 1) but the Ray cluster has 4"),
        (["rl.reward.num_cpus_per_head_learner=1"], "together need 5 CPU (rollout 2, policy 1, reward 2)"),
        (["rl.reference_num_cpus=0.5"], "together need 4.5 CPU (rollout 2, policy 1, reference 0.5, reward 1)"),
    ],
)
def test_a_request_the_cluster_cannot_hold_is_named(ray_session, overrides, message):
    with pytest.raises(ValueError) as err:
        check_demands("rl", rl_demands(*overrides))
    assert message in str(err.value), str(err.value)


def test_rm_learners_and_prioritiser_together_through_the_command(ray_session, capsys, tmp_path):
    code, err = run_cli(
        capsys,
        "rm",
        str(QUICK),
        *small_overrides(tmp_path),
        "rm.prioritizer.enabled=true",
        "rm.prioritizer.num_cpus=2",
        "rm.deepspeed.ranks=3",
    )
    assert_clear_error(
        code, err, "rm: its actors run at the same time and together need 5 CPU (deepspeed 3, prioritizer 2)"
    )
