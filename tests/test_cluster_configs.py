"""Shipped cluster configs: Ray's own launcher schema, the security rules, KubeRay structure.

No cluster is started. Each rule is a function returning a list of problems, and every rule has a
negative test that mutates a shipped config and expects the problem to be reported. The network rules
(AWS security group, GCP network, KubeRay NetworkPolicy and tokens) are in test_cluster_security.py.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest
import yaml

from r2m_ray.config import load_config
from tests.conftest import ROOT
from tests.test_cluster_security import (
    CLIENT_PORT,
    DASHBOARD_PORT,
    NS_NAME_LABEL,
    SA_TOKEN_PATH,
    _operator_peer,
    _policy,
    _policy_problems,
    _prepare,
    _token_mount_problems,
)

LAUNCHERS = sorted((ROOT / "cluster").glob("*.yaml"))
KUBERAY = sorted((ROOT / "cluster" / "kuberay").glob("*.yaml"))

TOKEN_SECRET = "r2m-ray-auth-token"
LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}
ROLES = ("rollout", "learner")


def _strings(node: Any, where: str = "") -> Iterator[tuple[str, str]]:
    """Every string in a parsed YAML tree (keys too), with its dotted location."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _strings(key, f"{where}.<key>")
            yield from _strings(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _strings(value, f"{where}[{i}]")
    elif isinstance(node, str):
        yield where.lstrip("."), node


# ---------------------------------------------------------------- cluster launcher (ray up)


def _validate(cfg: dict) -> None:
    from ray.autoscaler._private.util import validate_config

    validate_config(copy.deepcopy(cfg))


def _dashboard_host(command: str) -> str | None:
    match = re.search(r"--dashboard-host[= ]+['\"]?([^\s'\";]+)", command)
    return match.group(1) if match else None


def _token_mode_before_start(command: str) -> bool:
    """RAY_AUTH_MODE=token is set (export or env prefix) before `ray start` in the same command."""
    mode = re.search(r"\bRAY_AUTH_MODE=token\b", command)
    start = re.search(r"\bray start\b", command)
    return bool(mode and start and mode.start() < start.start())


def launcher_problems(cfg: dict) -> list[str]:
    """Security rules for a `ray up` config (raw or after prepare_config)."""
    problems = [f"{where}: 0.0.0.0 binds every interface" for where, s in _strings(cfg) if "0.0.0.0" in s]
    problems += [f"{where}: token auth disabled" for where, s in _strings(cfg) if "RAY_AUTH_MODE=disabled" in s]
    heads = [c for c in cfg.get("head_start_ray_commands", []) if re.search(r"\bray start\b", c)]
    workers = [c for c in cfg.get("worker_start_ray_commands", []) if re.search(r"\bray start\b", c)]
    if not any("--head" in c for c in heads):
        problems.append("head_start_ray_commands: no `ray start --head`")
    if not workers:
        problems.append("worker_start_ray_commands: no `ray start`")
    for c in heads:
        host = _dashboard_host(c)
        if host is None:
            problems.append("head start: no --dashboard-host; want it explicit and on loopback (127.0.0.1)")
        elif host not in LOOPBACK:
            problems.append(f"head start: --dashboard-host={host}, want loopback (127.0.0.1)")
    for kind, commands in (("head", heads), ("worker", workers)):
        problems += [
            f"{kind} start: RAY_AUTH_MODE=token not set before `ray start`: {c!r}"
            for c in commands
            if not _token_mode_before_start(c)
        ]
    mounts = cfg.get("file_mounts") or {}
    token_mounted = any(remote.rstrip("/").endswith(".ray/auth_token") for remote in mounts)
    token_in_env = any("RAY_AUTH_TOKEN" in c for c in heads + workers)
    if not (token_mounted or token_in_env):
        problems.append("the token never reaches the nodes: mount ~/.ray/auth_token or set RAY_AUTH_TOKEN(_PATH)")
    setup = [
        c for key in ("setup_commands", "head_setup_commands", "worker_setup_commands") for c in cfg.get(key) or []
    ]
    if not any(re.search(r"pip install -e\s+\S*r2m-ray\[gpu\]", c) for c in setup):
        problems.append("setup commands never `pip install -e` this package with the gpu extra")
    if not any("torch==2.13.0" in c for c in setup):
        problems.append("setup commands never pin torch==2.13.0")
    for rule in cfg.get("provider", {}).get("security_group", {}).get("IpPermissions", []):
        lo, hi = rule.get("FromPort", -1), rule.get("ToPort", -1)
        for port in (DASHBOARD_PORT, CLIENT_PORT):
            if lo == -1 or lo <= port <= hi:
                problems.append(f"security_group opens port {port} ({rule})")
    return problems


def test_launcher_files_present():
    assert {p.name for p in LAUNCHERS} == {"aws-gpu.yaml", "gcp-gpu.yaml"}


@pytest.mark.parametrize("name", ["aws-gpu.yaml", "gcp-gpu.yaml"])
def test_launcher_passes_ray_schema(launchers, name):
    raw = launchers[name]
    _validate(raw)  # as written
    prepared = _prepare(raw)  # as `ray up` sees it, provider defaults merged in
    _validate(prepared)
    assert prepared["provider"]["type"] == name.split("-")[0]
    types = prepared["available_node_types"]
    assert prepared["head_node_type"] in types
    assert types[prepared["head_node_type"]]["resources"].get("GPU", 0) == 0
    for role in ROLES:
        (node,) = [t for t in types.values() if role in t["resources"]]
        assert node["resources"]["GPU"] > 0 and node["resources"][role] > 0
        assert 1 <= node["min_workers"] <= node["max_workers"] <= prepared["max_workers"]


def test_launcher_schema_rejects_bad_config(launchers):
    bad = copy.deepcopy(launchers["aws-gpu.yaml"])
    bad["dashboard_host"] = "127.0.0.1"  # not a launcher key
    with pytest.raises(jsonschema.ValidationError):
        _validate(bad)
    bad = copy.deepcopy(launchers["aws-gpu.yaml"])
    bad["available_node_types"]["r2m.rollout"]["resources"]["GPU"] = 0.5  # resources are integers
    with pytest.raises(jsonschema.ValidationError):
        _validate(bad)


@pytest.mark.parametrize("name", ["aws-gpu.yaml", "gcp-gpu.yaml"])
def test_launcher_security(launchers, name):
    raw = launchers[name]
    assert launcher_problems(raw) == []
    # Ray merges its provider defaults into missing keys; they must not bring anything back.
    assert launcher_problems(_prepare(raw)) == []


def _set_head_start(cfg: dict, command: str) -> dict:
    cfg = copy.deepcopy(cfg)
    cfg["head_start_ray_commands"] = ["ray stop", command]
    return cfg


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (
            lambda c: _set_head_start(c, "export RAY_AUTH_MODE=token; ray start --head --dashboard-host=0.0.0.0"),
            "--dashboard-host=0.0.0.0, want loopback",
        ),
        (lambda c: _set_head_start(c, "export RAY_AUTH_MODE=token; ray start --head"), "no --dashboard-host"),
        (lambda c: _set_head_start(c, "ray start --head --dashboard-host=127.0.0.1"), "head start: RAY_AUTH_MODE"),
        (
            lambda c: {**c, "worker_start_ray_commands": ["ray start --address=$RAY_HEAD_IP:6379"]},
            "worker start: RAY_AUTH_MODE",
        ),
        (
            lambda c: _set_head_start(c, "export RAY_AUTH_MODE=disabled; ray start --head --dashboard-host=127.0.0.1"),
            "token auth disabled",
        ),
        (lambda c: {**c, "file_mounts": {"~/r2m-ray": "."}}, "token never reaches"),
        (lambda c: {**c, "setup_commands": ["pip install torch==2.13.0"]}, "pip install -e"),
        (
            lambda c: {
                **c,
                "provider": {
                    **c["provider"],
                    "security_group": {"IpPermissions": [{"FromPort": 8265, "ToPort": 8265, "IpProtocol": "tcp"}]},
                },
            },
            "opens port 8265",
        ),
    ],
    ids=[
        "public-dashboard",
        "no-dashboard-host",
        "head-no-token",
        "worker-no-token",
        "auth-disabled",
        "no-token-mount",
        "no-install",
        "open-8265",
    ],
)
def test_launcher_checker_flags_mutations(launchers, mutate, expected):
    problems = launcher_problems(mutate(copy.deepcopy(launchers["aws-gpu.yaml"])))
    assert any(expected in p for p in problems), problems


@pytest.mark.parametrize("name", ["aws-gpu.yaml", "gcp-gpu.yaml"])
def test_dropping_start_commands_lets_ray_defaults_in(launchers, name):
    """Why the configs spell out every command list: Ray's defaults would open the dashboard."""
    raw = copy.deepcopy(launchers[name])
    del raw["head_start_ray_commands"]
    assert any("0.0.0.0" in p for p in launcher_problems(_prepare(raw)))


# ---------------------------------------------------------------- KubeRay manifests


def _ray_object(docs: list[dict]) -> dict:
    (obj,) = [d for d in docs if d.get("apiVersion") == "ray.io/v1"]
    return obj


def _cluster_spec(obj: dict) -> dict:
    return obj["spec"]["rayClusterSpec"] if obj["kind"] == "RayJob" else obj["spec"]


def _env_problems(env: list[dict], where: str) -> list[str]:
    by_name = {e["name"]: e for e in env or []}
    problems = []
    if by_name.get("RAY_AUTH_MODE", {}).get("value") != "token":
        problems.append(f"{where}: RAY_AUTH_MODE is not token")
    token = by_name.get("RAY_AUTH_TOKEN", {})
    ref = token.get("valueFrom", {}).get("secretKeyRef", {})
    if "value" in token or ref.get("name") != TOKEN_SECRET or not ref.get("key"):
        problems.append(f"{where}: RAY_AUTH_TOKEN must come from the Secret {TOKEN_SECRET} (secretKeyRef)")
    return problems


def kuberay_problems(docs: list[dict]) -> list[str]:
    """Security and structure rules for a RayCluster / RayJob manifest file."""
    obj = _ray_object(docs)
    spec = _cluster_spec(obj)
    head = spec["headGroupSpec"]
    problems = []
    services = [head.get("serviceType", "ClusterIP"), (head.get("headService") or {}).get("spec", {}).get("type")]
    services += [d["spec"].get("type") for d in docs if d.get("kind") == "Service"]
    problems += [f"service type {t} exposes the head" for t in services if t in ("LoadBalancer", "NodePort")]
    if head.get("serviceType") != "ClusterIP":
        problems.append(f"head serviceType {head.get('serviceType')!r}, want ClusterIP")
    if head.get("enableIngress"):
        problems.append("enableIngress exposes the dashboard")
    host = head["rayStartParams"].get("dashboard-host")
    groups = [("head", head)] + [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]
    if host not in LOOPBACK:
        # Only a RayJob needs the operator to reach the dashboard (KubeRay polls it through the head
        # Service); then the NetworkPolicy below is what fences the pod network.
        if obj["kind"] != "RayJob" or host != "0.0.0.0":
            problems.append(f"dashboard-host {host!r}: want 127.0.0.1")
        elif (spec.get("authOptions") or {}).get("mode") != "token":
            problems.append("dashboard on the pod network needs authOptions.mode token (the operator's token)")
    problems += _policy_problems(docs, groups)
    problems += _token_mount_problems(spec, groups)
    problems += [
        f"{where}: 0.0.0.0"
        for where, s in _strings(docs)
        if "0.0.0.0" in s and not where.endswith("headGroupSpec.rayStartParams.dashboard-host")
    ]
    for name, group in groups:
        for container in group["template"]["spec"]["containers"]:
            problems += _env_problems(container.get("env"), f"{name}/{container['name']}")
    if spec.get("enableInTreeAutoscaling"):
        problems += _env_problems((spec.get("autoscalerOptions") or {}).get("env"), "autoscaler")
    for name, group in groups[1:]:
        lo, n, hi = group.get("minReplicas"), group.get("replicas"), group.get("maxReplicas")
        if None in (lo, n, hi) or not lo <= n <= hi:
            problems.append(f"{name}: want minReplicas <= replicas <= maxReplicas, got {lo}, {n}, {hi}")
        (worker,) = group["template"]["spec"]["containers"]
        gpus = int(worker.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
        if name in ROLES and gpus < 1:
            problems.append(f"{name}: no nvidia.com/gpu limit")
        custom = group["rayStartParams"].get("resources")
        if name in ROLES and (not custom or json.loads(json.loads(custom)).get(name, 0) < 1):
            problems.append(f"{name}: no custom resource {name!r} in rayStartParams")
    return problems


def test_kuberay_files_present(manifests):
    assert set(manifests) == {"raycluster.yaml", "rayjob.yaml"}
    assert _ray_object(manifests["raycluster.yaml"])["kind"] == "RayCluster"
    assert _ray_object(manifests["rayjob.yaml"])["kind"] == "RayJob"


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay_manifest_rules(manifests, name):
    assert kuberay_problems(manifests[name]) == []


def test_raycluster_dashboard_on_loopback(manifests):
    head = _cluster_spec(_ray_object(manifests["raycluster.yaml"]))["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "127.0.0.1"


def test_rayjob_runs_a_gpu_recipe(manifests):
    job = _ray_object(manifests["rayjob.yaml"])["spec"]
    assert job["shutdownAfterJobFinishes"] is True
    match = re.fullmatch(r"r2m-ray run (jobs/gpu_\S+\.yaml)", job["entrypoint"])
    assert match, job["entrypoint"]
    load_config(ROOT / match.group(1))
    runtime_env = yaml.safe_load(job["runtimeEnvYAML"])
    assert runtime_env["working_dir"] and runtime_env["env_vars"]["HF_HUB_OFFLINE"] == "1"
    assert _cluster_spec(_ray_object(manifests["rayjob.yaml"]))["authOptions"]["secretName"] == TOKEN_SECRET


def _group(docs: list[dict], name: str) -> dict:
    spec = _cluster_spec(_ray_object(docs))
    return (
        spec["headGroupSpec"] if name == "head" else next(g for g in spec["workerGroupSpecs"] if g["groupName"] == name)
    )


def _mutated(docs: list[dict], change) -> list[dict]:
    docs = copy.deepcopy(docs)
    change(docs)
    return docs


@pytest.mark.parametrize(
    "name, change, expected",
    [
        ("raycluster.yaml", lambda d: _group(d, "head").update(serviceType="LoadBalancer"), "LoadBalancer"),
        ("rayjob.yaml", lambda d: _group(d, "head").update(serviceType="NodePort"), "NodePort"),
        (
            "raycluster.yaml",
            lambda d: _group(d, "head")["rayStartParams"].update({"dashboard-host": "0.0.0.0"}),
            "dashboard-host '0.0.0.0'",
        ),
        ("rayjob.yaml", lambda d: d.pop(), "no NetworkPolicy"),
        ("rayjob.yaml", lambda d: _cluster_spec(_ray_object(d)).pop("authOptions"), "authOptions"),
        (
            "rayjob.yaml",
            lambda d: d[-1]["spec"]["ingress"].append({"from": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}),
            "ipBlock",
        ),
        (
            "raycluster.yaml",
            lambda d: _group(d, "learner")["template"]["spec"]["containers"][0]["env"].__setitem__(
                1, {"name": "RAY_AUTH_TOKEN", "value": "hard-coded"}
            ),
            "learner/ray-worker: RAY_AUTH_TOKEN",
        ),
        (
            "raycluster.yaml",
            lambda d: _group(d, "head")["template"]["spec"]["containers"][0]["env"].pop(0),
            "head/ray-head: RAY_AUTH_MODE",
        ),
        (
            "raycluster.yaml",
            lambda d: _cluster_spec(_ray_object(d))["autoscalerOptions"].pop("env"),
            "autoscaler: RAY_AUTH_MODE",
        ),
        (
            "raycluster.yaml",
            lambda d: _group(d, "rollout")["template"]["spec"]["containers"][0]["resources"]["limits"].pop(
                "nvidia.com/gpu"
            ),
            "rollout: no nvidia.com/gpu",
        ),
        ("rayjob.yaml", lambda d: _group(d, "learner").update(minReplicas=2), "minReplicas <= replicas"),
        ("raycluster.yaml", lambda d: _group(d, "rollout")["rayStartParams"].pop("resources"), "custom resource"),
        # The NetworkPolicy as shipped before: the operator's label from any namespace.
        ("rayjob.yaml", lambda d: _operator_peer(d).update(namespaceSelector={}), "not pinned to one namespace"),
        (
            "rayjob.yaml",
            lambda d: _operator_peer(d).update(namespaceSelector={"matchLabels": {"team": "ray"}}),
            "not pinned to one namespace",
        ),
        (
            "rayjob.yaml",
            lambda d: _operator_peer(d)["namespaceSelector"].update(
                matchExpressions=[{"key": NS_NAME_LABEL, "operator": "Exists"}]
            ),
            "not pinned to one namespace",
        ),
        ("rayjob.yaml", lambda d: _operator_peer(d).pop("podSelector"), "every pod of the namespace"),
        ("rayjob.yaml", lambda d: _policy(d)["spec"]["ingress"][1].pop("ports"), "on every port"),
        (
            "rayjob.yaml",
            lambda d: _policy(d)["spec"]["ingress"][1]["ports"].append({"protocol": "TCP", "port": 10001}),
            "admits port 10001",
        ),
        (
            "raycluster.yaml",
            lambda d: _policy(d)["spec"]["ingress"].append({"from": [{"podSelector": {"matchLabels": {"x": "y"}}}]}),
            "not this cluster's own Ray pods",
        ),
        ("raycluster.yaml", lambda d: d.pop(), "no NetworkPolicy selects the head"),
        (
            "raycluster.yaml",
            lambda d: _group(d, "learner")["template"]["metadata"]["labels"].update({"app.kubernetes.io/name": "x"}),
            "no NetworkPolicy selects the learner",
        ),
        (
            "rayjob.yaml",
            lambda d: _group(d, "head")["template"]["spec"].pop("automountServiceAccountToken"),
            "head: automount",
        ),
        (
            "raycluster.yaml",
            lambda d: _group(d, "rollout")["template"]["spec"].update(automountServiceAccountToken=True),
            "rollout: automount",
        ),
        (
            "raycluster.yaml",
            lambda d: _group(d, "head")["template"]["spec"]["containers"][0]["volumeMounts"].append(
                {"name": "autoscaler-kube-api-access", "mountPath": "/token"}
            ),
            "head/ray-head mounts a service-account token",
        ),
        (
            "rayjob.yaml",
            lambda d: _group(d, "learner")["template"]["spec"]["containers"][0]["volumeMounts"].append(
                {"name": "sa", "mountPath": SA_TOKEN_PATH}
            ),
            "learner/ray-worker mounts a service-account token",
        ),
        (
            "raycluster.yaml",
            lambda d: _cluster_spec(_ray_object(d))["autoscalerOptions"].pop("volumeMounts"),
            "autoscaler has no token",
        ),
    ],
    ids=[
        "lb",
        "nodeport",
        "cluster-public-dashboard",
        "job-no-policy",
        "job-no-authoptions",
        "policy-ipblock",
        "literal-token",
        "no-auth-mode",
        "autoscaler-no-token",
        "no-gpu-limit",
        "replicas-order",
        "no-custom-res",
        "any-namespace",
        "forgeable-namespace-label",
        "namespace-expression",
        "whole-operator-namespace",
        "operator-all-ports",
        "operator-client-port",
        "foreign-pods",
        "cluster-no-policy",
        "worker-not-selected",
        "job-head-token",
        "worker-token",
        "head-mounts-autoscaler-token",
        "worker-mounts-sa-path",
        "autoscaler-no-api-token",
    ],
)
def test_kuberay_checker_flags_mutations(manifests, name, change, expected):
    problems = kuberay_problems(_mutated(manifests[name], change))
    assert any(expected in p for p in problems), problems
