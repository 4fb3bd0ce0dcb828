"""Network fencing of the shipped cluster configs: who can reach the nodes, and how.

AWS: every node in one pre-created security group, from a CloudFormation stack that takes SSH only
from a required parameter. GCP: a dedicated VPC network and tag, fenced by the README's gcloud
commands. KubeRay: NetworkPolicy ingress and service-account tokens, applied by
test_cluster_configs.kuberay_problems (whose mutation test covers them). No cluster is started.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT

AWS_STACK = ROOT / "cluster" / "aws" / "r2m-ray-network.cfn.yaml"
README = ROOT / "cluster" / "README.md"

DASHBOARD_PORT, CLIENT_PORT = 8265, 10001
# Set by the API server to the namespace's own name and immutable: the only namespace label that a
# namespace owner cannot copy onto another namespace.
NS_NAME_LABEL = "kubernetes.io/metadata.name"
SA_TOKEN_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"


def _prepare(raw: dict) -> dict:
    """Ray's own preprocessing: merge the provider's defaults.yaml, setup commands, node min/max."""
    from ray.autoscaler._private.util import prepare_config

    return prepare_config(copy.deepcopy(raw))


# ---------------------------------------------------------------- AWS security group and stack


def aws_network_problems(cfg: dict) -> list[str]:
    """Every node in one pre-created security group and named subnets: Ray must create no group.

    The group Ray creates when a node_config names none always gets SSH from 0.0.0.0/0
    (ray/autoscaler/_private/aws/config.py, _create_default_ssh_inbound_rules), and
    provider.security_group can only add rules to it.
    """
    problems = []
    if "security_group" in cfg.get("provider", {}):
        problems.append("provider.security_group: only shapes the group Ray creates (SSH from 0.0.0.0/0); drop it")
    groups = set()
    for name, node in cfg["available_node_types"].items():
        conf = node["node_config"]
        sgs = conf.get("SecurityGroupIds")
        if not sgs:
            problems.append(f"{name}: no SecurityGroupIds, so Ray creates its own group with SSH from 0.0.0.0/0")
            continue
        problems += [
            f"{name}: {sg!r} is not a security group id (sg-...)" for sg in sgs if not str(sg).startswith("sg-")
        ]
        groups.add(tuple(sorted(sgs)))
        if not conf.get("SubnetIds"):
            problems.append(f"{name}: no SubnetIds, so Ray picks any public subnet (e.g. the default VPC's)")
    if len(groups) > 1:
        problems.append(
            f"node types in different security groups {sorted(groups)}: the intra-cluster rule is per group"
        )
    return problems


def _intrinsic(value: Any, fn: str) -> Any:
    return value.get(fn) if isinstance(value, dict) and set(value) == {fn} else None


def aws_stack_problems(template: dict) -> list[str]:
    """The CloudFormation stack that creates the group: SSH from a required, non-world parameter."""
    resources = template.get("Resources", {})
    params = template.get("Parameters", {})
    problems = []
    groups = [k for k, r in resources.items() if r["Type"] == "AWS::EC2::SecurityGroup"]
    if len(groups) != 1:
        return [f"want exactly one security group, found {groups}"]
    (group,) = groups
    if resources[group]["Properties"].get("GroupName") in (None, "default"):
        problems.append("the security group must have its own name, not default")
    self_ref = {"Fn::GetAtt": [group, "GroupId"]}
    rules = [
        (f"{group}.SecurityGroupIngress", r) for r in resources[group]["Properties"].get("SecurityGroupIngress", [])
    ]
    for key, r in resources.items():
        if r["Type"] == "AWS::EC2::SecurityGroupIngress":
            if r["Properties"].get("GroupId") != self_ref:
                problems.append(f"{key}: ingress to a group other than {group}")
            rules.append((key, r["Properties"]))
    if not any(r.get("SourceSecurityGroupId") == self_ref and str(r.get("IpProtocol")) == "-1" for _, r in rules):
        problems.append("no all-traffic rule between members of the group (Ray needs every port between nodes)")
    ssh = []
    for key, rule in rules:
        if rule.get("SourceSecurityGroupId") == self_ref:
            continue
        if "CidrIpv6" in rule or "SourcePrefixListId" in rule or "SourceSecurityGroupId" in rule:
            problems.append(f"{key}: ingress from outside the group other than an IPv4 SSH range: {rule}")
            continue
        if (str(rule.get("IpProtocol")), rule.get("FromPort"), rule.get("ToPort")) != ("tcp", 22, 22):
            problems.append(f"{key}: ingress from outside the group on a port other than tcp/22: {rule}")
        cidr = rule.get("CidrIp")
        param = _intrinsic(cidr, "Ref")
        if param is None:
            problems.append(f"{key}: SSH source {cidr!r} is hard-coded; want a required parameter")
            continue
        ssh.append(key)
        spec = params.get(param, {})
        if "Default" in spec:
            problems.append(f"{key}: parameter {param} has a Default ({spec['Default']!r}); the user must choose")
        pattern = spec.get("AllowedPattern")
        if not pattern or re.fullmatch(pattern, "0.0.0.0/0") or re.fullmatch(pattern, "0.0.0.0/1"):
            problems.append(f"{key}: parameter {param} accepts 0.0.0.0/0 (AllowedPattern {pattern!r})")
        elif not re.fullmatch(pattern, "203.0.113.7/32"):
            problems.append(f"{key}: parameter {param} rejects a /32 (AllowedPattern {pattern!r})")
    if not ssh:
        problems.append("no SSH rule from the SSH-range parameter: `ray up` cannot reach the head")
    output = template.get("Outputs", {}).get("SecurityGroupId", {}).get("Value")
    if _intrinsic(output, "Fn::GetAtt") != [group, "GroupId"]:
        problems.append("no SecurityGroupId output for the node_configs")
    return problems


@pytest.fixture(scope="module")
def aws_stack() -> dict:
    return yaml.safe_load(AWS_STACK.read_text())


def test_aws_specifics(launchers, aws_stack):
    aws = launchers["aws-gpu.yaml"]
    assert aws["provider"]["region"] == "us-west-2"
    for node in aws["available_node_types"].values():
        assert node["node_config"]["InstanceType"]
    assert aws_network_problems(aws) == []
    assert aws_network_problems(_prepare(aws)) == []
    assert aws_stack_problems(aws_stack) == []
    # The placeholders point at the stack's outputs, not at an existing (e.g. default) group.
    for node in aws["available_node_types"].values():
        assert all(
            "REPLACE_ME" in x for x in node["node_config"]["SecurityGroupIds"] + node["node_config"]["SubnetIds"]
        )
    # The subnets' zones must be among the zones Ray may use, or Ray rejects the subnets.
    zones = aws["provider"]["availability_zone"].split(",")
    for param in ("ZoneA", "ZoneB"):
        assert aws_stack["Parameters"][param]["Default"] in zones


def test_aws_readme_and_header_name_the_stack(launchers):
    rel = AWS_STACK.relative_to(ROOT).as_posix()
    assert f"--template-file {rel}" in README.read_text()
    assert f"--template-file {rel}" in (ROOT / "cluster" / "aws-gpu.yaml").read_text()


def _edit_stack(change):
    def mutate(template):
        template = copy.deepcopy(template)
        change(template)
        return template

    return mutate


def _ssh(t: dict) -> dict:
    return t["Resources"]["SshIngress"]["Properties"]


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda t: _ssh(t).update(CidrIp="0.0.0.0/0"), "hard-coded"),
        (lambda t: t["Parameters"]["SshCidr"].update(Default="0.0.0.0/0"), "has a Default"),
        (lambda t: t["Parameters"]["SshCidr"].update(AllowedPattern=".*"), "accepts 0.0.0.0/0"),
        (lambda t: t["Parameters"]["SshCidr"].pop("AllowedPattern"), "accepts 0.0.0.0/0"),
        (lambda t: _ssh(t).update(FromPort=8265, ToPort=8265), "other than tcp/22"),
        (lambda t: _ssh(t).pop("CidrIp") and _ssh(t).update(CidrIpv6="::/0"), "outside the group"),
        (lambda t: t["Resources"].pop("IntraClusterIngress"), "between members"),
        (lambda t: t["Resources"]["SecurityGroup"]["Properties"].update(GroupName="default"), "not default"),
        (
            lambda t: t["Resources"]["SecurityGroup"]["Properties"].update(
                SecurityGroupIngress=[{"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "CidrIp": "0.0.0.0/0"}]
            ),
            "hard-coded",
        ),
    ],
    ids=[
        "world-ssh",
        "ssh-default",
        "any-pattern",
        "no-pattern",
        "open-8265",
        "ipv6-world",
        "no-intra",
        "default-name",
        "inline-world",
    ],
)
def test_aws_stack_checker_flags_mutations(aws_stack, change, expected):
    problems = aws_stack_problems(_edit_stack(change)(aws_stack))
    assert any(expected in p for p in problems), problems


def _drop_node_key(cfg: dict, node: str, key: str) -> dict:
    cfg = copy.deepcopy(cfg)
    cfg["available_node_types"][node]["node_config"].pop(key)
    return cfg


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda c: _drop_node_key(c, "r2m.learner", "SecurityGroupIds"), "creates its own group"),
        (lambda c: _drop_node_key(c, "r2m.head", "SubnetIds"), "no SubnetIds"),
        (
            lambda c: {**c, "provider": {**c["provider"], "security_group": {"GroupName": "x"}}},
            "provider.security_group",
        ),
    ],
    ids=["worker-no-group", "head-no-subnet", "provider-group"],
)
def test_aws_network_checker_flags_mutations(launchers, mutate, expected):
    problems = aws_network_problems(mutate(launchers["aws-gpu.yaml"]))
    assert any(expected in p for p in problems), problems


def test_aws_network_checker_flags_split_groups(launchers):
    cfg = copy.deepcopy(launchers["aws-gpu.yaml"])
    cfg["available_node_types"]["r2m.rollout"]["node_config"]["SecurityGroupIds"] = ["sg-other"]
    assert any("different security groups" in p for p in aws_network_problems(cfg))


# ---------------------------------------------------------------- GCP network


def gcp_network_problems(cfg: dict) -> list[str]:
    """Every node on one dedicated VPC network (not `default`) and tagged for its firewall rules."""
    problems, networks, tags = [], set(), set()
    for name, node in cfg["available_node_types"].items():
        conf = node["node_config"]
        interfaces = conf.get("networkInterfaces")
        if not interfaces:
            problems.append(
                f"{name}: no networkInterfaces, so Ray picks the region's first listed subnet (usually the default network's)"
            )
            continue
        for iface in interfaces:
            for key in ("network", "subnetwork"):
                url = iface.get(key)
                if not url:
                    problems.append(f"{name}: networkInterfaces without a {key}")
                elif url.rstrip("/").split("/")[-1] == "default":
                    problems.append(f"{name}: {key} {url} is the project's default network")
            networks.add((iface.get("network"), iface.get("subnetwork")))
        items = (conf.get("tags") or {}).get("items") or []
        if not items:
            problems.append(f"{name}: no network tag for the cluster's firewall rules to target")
        tags.add(tuple(sorted(items)))
    if len(networks) > 1:
        problems.append(f"node types on different networks {sorted(networks)}")
    if len(tags) > 1:
        problems.append(f"node types with different network tags {sorted(tags)}")
    return problems


def test_gcp_specifics(launchers):
    gcp = launchers["gcp-gpu.yaml"]
    assert "REPLACE_ME" in gcp["provider"]["project_id"]
    for name, node in gcp["available_node_types"].items():
        if node["resources"].get("GPU", 0):
            conf = node["node_config"]
            (accel,) = conf["guestAccelerators"]
            assert accel["acceleratorCount"] == node["resources"]["GPU"], name
            assert conf["scheduling"]["onHostMaintenance"] == "TERMINATE", name
    assert gcp_network_problems(gcp) == []
    assert gcp_network_problems(_prepare(gcp)) == []


def _gcloud_commands(text: str) -> list[str]:
    """The gcloud commands in the README's code blocks, continuation lines joined."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [line.strip() for line in joined.splitlines() if line.strip().startswith("gcloud compute")]


def _flag(command: str, name: str) -> str | None:
    match = re.search(rf"--{name}=(\"[^\"]*\"|\S+)", command)
    return match.group(1).strip('"') if match else None


def test_gcp_readme_creates_that_network_with_ssh_from_a_variable(launchers):
    """Firewall rules are not part of a Ray config: the README's commands must fence the network."""
    (iface,) = {
        (i["network"], i["subnetwork"])
        for node in launchers["gcp-gpu.yaml"]["available_node_types"].values()
        for i in node["node_config"]["networkInterfaces"]
    }
    network, subnet = (url.split("/")[-1] for url in iface)
    (tag,) = {
        t for n in launchers["gcp-gpu.yaml"]["available_node_types"].values() for t in n["node_config"]["tags"]["items"]
    }
    commands = _gcloud_commands(README.read_text())
    assert any(
        c.startswith(f"gcloud compute networks create {network} ") and _flag(c, "subnet-mode") == "custom"
        for c in commands
    )
    assert any(
        c.startswith(f"gcloud compute networks subnets create {subnet} ") and _flag(c, "network") == network
        for c in commands
    )
    rules = [c for c in commands if c.startswith("gcloud compute firewall-rules create")]
    assert rules
    for rule in rules:
        assert _flag(rule, "network") == network, rule
        assert _flag(rule, "direction") == "INGRESS" and _flag(rule, "target-tags") == tag, rule
        ranges = _flag(rule, "source-ranges")
        if ranges is None:
            assert _flag(rule, "source-tags") == tag, rule  # member to member only
        else:
            assert ranges == "$R2M_SSH_CIDR" and _flag(rule, "rules") == "tcp:22", rule
    assert any(_flag(r, "source-ranges") == "$R2M_SSH_CIDR" for r in rules)
    assert "0.0.0.0/0" not in " ".join(commands)


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda n: n["node_config"].pop("networkInterfaces"), "no networkInterfaces"),
        (
            lambda n: n["node_config"]["networkInterfaces"][0].update(network="global/networks/default"),
            "default network",
        ),
        (
            lambda n: n["node_config"]["networkInterfaces"][0].update(
                subnetwork="projects/p/regions/us-central1/subnetworks/default"
            ),
            "default network",
        ),
        (lambda n: n["node_config"].pop("tags"), "no network tag"),
    ],
    ids=["no-interfaces", "default-network", "default-subnet", "no-tag"],
)
def test_gcp_network_checker_flags_mutations(launchers, change, expected):
    cfg = copy.deepcopy(launchers["gcp-gpu.yaml"])
    change(cfg["available_node_types"]["r2m_learner"])
    problems = gcp_network_problems(cfg)
    assert any(expected in p for p in problems), problems


# ---------------------------------------------------------------- KubeRay NetworkPolicy and tokens


def _labels_match(selector: dict, labels: dict) -> bool:
    wanted = selector.get("matchLabels", {})
    return bool(wanted) and all(labels.get(k) == v for k, v in wanted.items())


def _peer_problems(policy: str, rule: dict, peer: dict, cluster_pods: list[dict]) -> list[str]:
    """A peer is either this cluster's own pods (same namespace), or one operator namespace + pods."""
    if "ipBlock" in peer:
        return [f"{policy}: ipBlock {peer['ipBlock']}"]
    pods, namespaces = peer.get("podSelector"), peer.get("namespaceSelector")
    if namespaces is None:
        # A bare podSelector matches pods in the policy's own namespace only.
        if (
            pods is None
            or pods.get("matchExpressions")
            or not all(_labels_match(pods, labels) for labels in cluster_pods)
        ):
            return [f"{policy}: peer {peer} is not this cluster's own Ray pods"]
        return []
    problems = []
    wanted = namespaces.get("matchLabels") or {}
    if set(namespaces) != {"matchLabels"} or set(wanted) != {NS_NAME_LABEL} or not wanted[NS_NAME_LABEL]:
        problems.append(
            f"{policy}: namespaceSelector {namespaces} is not pinned to one namespace by {NS_NAME_LABEL}: "
            "any namespace can carry (or be given) the labels it matches"
        )
    if not (pods or {}).get("matchLabels"):
        problems.append(f"{policy}: a peer without pod labels admits every pod of the namespace")
    ports = rule.get("ports") or []
    if not ports:
        problems.append(f"{policy}: ingress from outside the cluster's pods on every port")
    problems += [
        f"{policy}: admits port {p.get('port')} from outside the cluster's pods; the operator needs only {DASHBOARD_PORT}"
        for p in ports
        if p.get("port") not in (DASHBOARD_PORT, "dashboard")
    ]
    return problems


def _policy_problems(docs: list[dict], groups: list[tuple[str, dict]]) -> list[str]:
    """Every Ray pod is ingress-isolated; outside its own pods only a pinned namespace gets in."""
    cluster_pods = [g["template"].get("metadata", {}).get("labels", {}) for _, g in groups]
    policies = [d for d in docs if d.get("kind") == "NetworkPolicy" and "Ingress" in d["spec"].get("policyTypes", [])]
    problems = [
        f"no NetworkPolicy selects the {name} pods: they accept ingress from anywhere"
        for (name, _), labels in zip(groups, cluster_pods)
        if not any(_labels_match(p["spec"].get("podSelector", {}), labels) for p in policies)
    ]
    for policy in policies:
        name = policy["metadata"]["name"]
        for rule in policy["spec"].get("ingress", []):
            peers = rule.get("from") or []
            if not peers:
                problems.append(f"{name}: an ingress rule admits every source")
            for peer in peers:
                problems += _peer_problems(name, rule, peer, cluster_pods)
    return problems


def _token_volumes(pod: dict) -> set[str]:
    return {
        v["name"]
        for v in pod.get("volumes") or []
        if any("serviceAccountToken" in src for src in (v.get("projected") or {}).get("sources", []))
    }


def _token_mount_problems(spec: dict, groups: list[tuple[str, dict]]) -> list[str]:
    """No Ray container gets a Kubernetes API token; only the autoscaler sidecar, when there is one."""
    problems = []
    for name, group in groups:
        pod = group["template"]["spec"]
        if pod.get("automountServiceAccountToken") is not False:
            problems.append(f"{name}: automountServiceAccountToken is not false: every container gets an API token")
        tokens = _token_volumes(pod)
        for container in (pod.get("containers") or []) + (pod.get("initContainers") or []):
            for mount in container.get("volumeMounts") or []:
                if mount["name"] in tokens or mount["mountPath"].startswith("/var/run/secrets/kubernetes.io"):
                    problems.append(f"{name}/{container['name']} mounts a service-account token ({mount['name']})")
    head_tokens = _token_volumes(groups[0][1]["template"]["spec"])
    mounts = (spec.get("autoscalerOptions") or {}).get("volumeMounts") or []
    token_mounts = [m for m in mounts if m["name"] in head_tokens]
    if not spec.get("enableInTreeAutoscaling"):
        if token_mounts or head_tokens:
            problems.append("a service-account token volume without an autoscaler to use it")
    elif groups[0][1]["template"]["spec"].get("automountServiceAccountToken") is False and not any(
        m["mountPath"].rstrip("/") == SA_TOKEN_PATH and m.get("readOnly") for m in token_mounts
    ):
        problems.append(f"autoscaler has no token mounted read-only at {SA_TOKEN_PATH}: it cannot scale the cluster")
    return problems


def _policy(docs: list[dict]) -> dict:
    (policy,) = [d for d in docs if d.get("kind") == "NetworkPolicy"]
    return policy


def _operator_peer(docs: list[dict]) -> dict:
    (peer,) = [p for r in _policy(docs)["spec"]["ingress"] for p in r["from"] if "namespaceSelector" in p]
    return peer


def test_rayjob_admits_the_operator_namespace_only(manifests):
    peer = _operator_peer(manifests["rayjob.yaml"])
    assert set(peer["namespaceSelector"]["matchLabels"]) == {NS_NAME_LABEL}
    assert peer["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "kuberay-operator"}
    # RayCluster pods need nothing from outside themselves: no namespace peer at all.
    assert not [
        p
        for r in _policy(manifests["raycluster.yaml"])["spec"]["ingress"]
        for p in r["from"]
        if "namespaceSelector" in p
    ]
