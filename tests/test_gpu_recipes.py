"""GPU job recipes (jobs/gpu_*.yaml): the paper's settings, and a fit on every shipped cluster.

The launcher and KubeRay fixtures are in conftest.py. Every rule has a negative test.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from r2m_ray.config import RunConfig, load_config
from tests.test_cluster_configs import ROLES, _group

ROOT = Path(__file__).resolve().parents[1]
GPU_JOBS = sorted((ROOT / "jobs").glob("gpu_*.yaml"))

# The paper's settings per recipe (Huang et al., R2M): K, prompts/step, Ω, α, d_attn, R2M head lr.
PAPER = {
    "gpu_llama3_8b_r2m.yaml": {"K": 8, "n": 64, "omega": 0.6, "alpha": 0.3, "d_attn": 2048, "lr": 1e-6},
    "gpu_tldr_r2m.yaml": {"K": 4, "n": 64, "omega": 0.6, "alpha": 0.3, "d_attn": 2048, "lr": 5e-7},
}


def paper_problems(cfg: RunConfig, paper: dict) -> list[str]:
    """The recipe keeps the paper's settings and runs on GPUs."""
    rl = cfg.rl
    got = {
        "K": rl.rollout.samples_per_prompt,
        "n": rl.prompts_per_step,
        "omega": rl.reward.r2m.omega_floor,
        "alpha": rl.reward.r2m.loss.alpha,
        "d_attn": rl.reward.r2m.d_attn,
        "lr": rl.reward.r2m.lr,
    }
    problems = [f"{k}={got[k]}, paper {v}" for k, v in paper.items() if got[k] != pytest.approx(v)]
    if "rl" not in cfg.stages or rl.reward.mode != "r2m":
        problems.append("not an R2M RL run")
    if rl.rollout.backend != "vllm" or rl.rollout.weight_sync != "collective" or rl.rollout.num_gpus_per_actor <= 0:
        problems.append("rollout: want vllm engines on GPUs with collective weight sync")
    if rl.policy.zero_stage != 3 or rl.policy.num_gpus_per_rank < 1:
        problems.append("policy: want ZeRO-3 ranks with a GPU each")
    if cfg.model.preset != "path" or not rl.policy_checkpoint:
        problems.append("models must be local directories (model.preset=path, rl.policy_checkpoint)")
    return problems


def gpus_by_role_launcher(cfg: dict) -> dict[str, int]:
    """GPUs that exist when a job starts: per-node GPUs × min_workers of the node type with the role."""
    out = {}
    for node in cfg["available_node_types"].values():
        for role in ROLES:
            if role in node["resources"]:
                out[role] = node["resources"]["GPU"] * node.get("min_workers", 0)
    return out


def gpus_by_role_kuberay(docs: list[dict]) -> dict[str, int]:
    out = {}
    for role in ROLES:
        group = _group(docs, role)
        (worker,) = group["template"]["spec"]["containers"]
        out[role] = int(worker["resources"]["limits"]["nvidia.com/gpu"]) * group["minReplicas"]
    return out


def fit_problems(cfg: RunConfig, gpus: dict[str, int]) -> list[str]:
    """rl_stage checks resources at start (no waiting for autoscaling): the recipe must fit the minimum."""
    need = {
        "rollout": cfg.rl.rollout.num_actors * cfg.rl.rollout.num_gpus_per_actor,
        "learner": max(
            cfg.rl.policy.ranks * cfg.rl.policy.num_gpus_per_rank,
            cfg.rm.deepspeed.ranks * cfg.rm.deepspeed.num_gpus_per_rank,
        ),
    }
    return [
        f"{role}: needs {need[role]:g} GPUs, has {gpus.get(role, 0)}"
        for role in ROLES
        if need[role] > gpus.get(role, 0)
    ]


def test_recipe_table_covers_every_gpu_job():
    assert {p.name for p in GPU_JOBS} == set(PAPER)


@pytest.mark.parametrize("path", GPU_JOBS, ids=lambda p: p.name)
def test_gpu_recipe_loads_with_paper_settings(path):
    cfg = load_config(path)
    assert paper_problems(cfg, PAPER[path.name]) == []


@pytest.mark.parametrize("path", GPU_JOBS, ids=lambda p: p.name)
def test_gpu_recipe_fits_every_shipped_cluster(path, launchers, manifests):
    cfg = load_config(path)
    for name, launcher in launchers.items():
        assert fit_problems(cfg, gpus_by_role_launcher(launcher)) == [], name
    for name, docs in manifests.items():
        assert fit_problems(cfg, gpus_by_role_kuberay(docs)) == [], name


@pytest.mark.parametrize(
    "override, expected",
    [
        ("rl.reward.r2m.d_attn=128", "d_attn=128"),
        ("rl.rollout.samples_per_prompt=2", "K=2"),
        ("rl.reward.r2m.omega_floor=0.7", "omega=0.7"),
        ("rl.reward.r2m.loss.alpha=0.5", "alpha=0.5"),
        ("rl.prompts_per_step=16", "n=16"),
        ("rl.reward.r2m.lr=1e-4", "lr=0.0001"),
        ("rl.rollout.num_gpus_per_actor=0", "rollout: want vllm"),
        ("rl.rollout.weight_sync=object_store", "rollout: want vllm"),
        ("rl.policy.zero_stage=2", "policy: want ZeRO-3"),
    ],
)
def test_paper_checker_flags_overrides(override, expected):
    path = ROOT / "jobs" / "gpu_llama3_8b_r2m.yaml"
    problems = paper_problems(load_config(path, [override]), PAPER[path.name])
    assert any(expected in p for p in problems), problems


def test_fit_checker_flags_too_many_engines(launchers):
    cfg = load_config(ROOT / "jobs" / "gpu_llama3_8b_r2m.yaml", ["rl.rollout.num_actors=8"])
    assert any(p.startswith("rollout:") for p in fit_problems(cfg, gpus_by_role_launcher(launchers["aws-gpu.yaml"])))


def test_gpu_keys_reach_the_placement_demands_and_the_engine_dtype():
    from r2m_ray.placement import role_demands

    gpu = load_config(
        ROOT / "jobs" / "quickstart.yaml",
        [
            "rl.rollout.num_gpus_per_actor=2",
            "rl.rollout.tensor_parallel_size=2",
            "rl.reference_num_gpus=1",
            "rl.reward.num_gpus_per_annotator=1",
            "rl.reward.num_gpus_per_head_learner=0.25",
        ],
    ).rl
    demands = role_demands(gpu)
    assert demands["rollout"][0]["GPU"] == 2 and demands["reference"][0]["GPU"] == 1
    assert [d.get("GPU") for d in demands["reward"]] == [1, 0.25]  # annotator, head learner
    assert gpu.rollout.engine_dtype() == "bfloat16"  # auto on a GPU engine
    cpu = load_config(ROOT / "jobs" / "quickstart.yaml").rl
    assert cpu.rollout.engine_dtype() == "float32" and "GPU" not in role_demands(cpu)["reference"][0]
