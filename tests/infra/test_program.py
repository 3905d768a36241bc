"""The Pulumi program under Pulumi's mocks: what each component declares, per stack."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest
import yaml

from dualtrack.plan import STACKS, Plan, PlannedResource, run_program
from infra import contract
from infra.components.cluster import kubeconfig_for
from infra.components.network import subnet_plan
from infra.config import load_settings


def _one(plan: Plan, type_: str, name: str | None = None) -> PlannedResource:
    found = [r for r in plan.of_type(type_) if name is None or r.name == name]
    assert len(found) == 1, f"{type_} {name}: {[r.name for r in found]}"
    return found[0]


def _k8s(plan: Plan, kind: str, name: str) -> dict:
    found = [o for o in plan.kubernetes_objects() if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}"
    return found[0]


# -- network ----------------------------------------------------------------------------------


@pytest.mark.parametrize("stack, azs, nats", [("dev", 2, 1), ("staging", 3, 1), ("prod", 3, 3)])
def test_network(plans: dict[str, Plan], stack: str, azs: int, nats: int) -> None:
    plan = plans[stack]
    subnets = plan.of_type("aws:ec2/subnet:Subnet")
    public = [s for s in subnets if "kubernetes.io/role/elb" in s.inputs["tags"]]
    private = [s for s in subnets if "kubernetes.io/role/internal-elb" in s.inputs["tags"]]
    assert len(public) == len(private) == azs
    assert len({s.inputs["availabilityZone"] for s in private}) == azs
    assert all(s.inputs["tags"][f"kubernetes.io/cluster/dualtrack-{stack}"] == "shared" for s in subnets)
    assert not any(s.inputs.get("mapPublicIpOnLaunch") for s in subnets)
    assert len(plan.of_type("aws:ec2/natGateway:NatGateway")) == nats
    endpoints = {
        e.inputs["serviceName"].rsplit(".", 1)[-1]
        if "ecr" not in e.inputs["serviceName"]
        else e.inputs["serviceName"].split("us-east-1.")[1]
        for e in plan.of_type("aws:ec2/vpcEndpoint:VpcEndpoint")
    }
    assert {"s3", "ecr.api", "ecr.dkr"} <= endpoints
    assert _one(plan, "aws:ec2/defaultSecurityGroup:DefaultSecurityGroup").inputs.get("ingress", []) == []


def test_subnet_plan_is_stable() -> None:
    from ipaddress import IPv4Network

    public, private = subnet_plan(IPv4Network("10.40.0.0/16"), 3)
    assert public == ["10.40.0.0/24", "10.40.1.0/24", "10.40.2.0/24"]
    assert private == ["10.40.16.0/20", "10.40.32.0/20", "10.40.48.0/20"]
    assert subnet_plan(IPv4Network("10.40.0.0/16"), 2)[1] == private[:2]  # adding an AZ renumbers nothing


# -- cluster -------------------------------------------------------------------------------------


@pytest.mark.parametrize("stack", STACKS)
def test_cluster_is_hardened(plans: dict[str, Plan], stack: str) -> None:
    plan = plans[stack]
    settings = load_settings(_config(stack))
    eks = _one(plan, "aws:eks/cluster:Cluster").inputs
    assert eks["version"] == settings.cluster.version
    assert (
        eks["encryptionConfig"]["resources"] == ["secrets"] and eks["encryptionConfig"]["provider"]["keyArn"]
    )
    assert set(eks["enabledClusterLogTypes"]) == {
        "api",
        "audit",
        "authenticator",
        "controllerManager",
        "scheduler",
    }
    vpc = eks["vpcConfig"]
    assert vpc["endpointPrivateAccess"] is True
    assert vpc["endpointPublicAccess"] is bool(settings.cluster.public_access_cidrs)
    assert vpc.get("publicAccessCidrs", []) == [str(c) for c in settings.cluster.public_access_cidrs]
    assert _one(plan, "aws:iam/openIdConnectProvider:OpenIdConnectProvider").inputs["clientIdLists"] == [
        "sts.amazonaws.com"
    ]
    assert {a.inputs["addonName"] for a in plan.of_type("aws:eks/addon:Addon")} == {
        "vpc-cni",
        "coredns",
        "kube-proxy",
        "aws-ebs-csi-driver",
    }
    ebs = next(
        a for a in plan.of_type("aws:eks/addon:Addon") if a.inputs["addonName"] == "aws-ebs-csi-driver"
    )
    assert "irsa-ebs-csi" in ebs.inputs["serviceAccountRoleArn"]
    for template in plan.of_type("aws:ec2/launchTemplate:LaunchTemplate"):
        assert template.inputs["metadataOptions"]["httpTokens"] == "required"
        assert template.inputs["blockDeviceMappings"][0]["ebs"]["encrypted"] == "true"


@pytest.mark.parametrize(
    "stack, groups, capacity", [("dev", 2, "SPOT"), ("staging", 1, "ON_DEMAND"), ("prod", 1, "ON_DEMAND")]
)
def test_gpu_node_groups(plans: dict[str, Plan], stack: str, groups: int, capacity: str) -> None:
    plan = plans[stack]
    settings = load_settings(_config(stack))
    gpu = [
        g
        for g in plan.of_type("aws:eks/nodeGroup:NodeGroup")
        if g.inputs["amiType"] == "AL2023_x86_64_NVIDIA"
    ]
    assert len(gpu) == groups
    primary = next(g for g in gpu if g.name == "cluster-gpu")
    assert primary.inputs["capacityType"] == capacity
    assert primary.inputs["instanceTypes"] == [settings.gpu_nodes.instance_type]
    assert primary.inputs["scalingConfig"] == {
        "desiredSize": settings.gpu_nodes.desired_size,
        "maxSize": settings.gpu_nodes.max_size,
        "minSize": settings.gpu_nodes.min_size,
    }
    for group in plan.of_type("aws:eks/nodeGroup:NodeGroup"):
        # EKS refuses labels under the reserved kubernetes.io/, k8s.io/, eks.amazonaws.com/ prefixes
        assert not any(
            re.search(r"(^|\.)(kubernetes\.io|k8s\.io|eks\.amazonaws\.com)/", k)
            for k in group.inputs["labels"]
        )
    for group in gpu:
        assert group.inputs["taints"] == [{"effect": "NO_SCHEDULE", "key": "nvidia.com/gpu", "value": "true"}]
        assert group.inputs["labels"]["dualtrack.io/pool"] == "gpu"
        assert group.inputs["labels"]["nvidia.com/gpu.present"] == "true"  # device plugin affinity
        assert group.inputs["launchTemplate"]["id"]
    # scale-from-zero: cluster-autoscaler learns the kubelet's model-cache label from an ASG tag
    tags = {t.name: t.inputs for t in plan.of_type("aws:autoscaling/tag:Tag")}
    assert set(tags) == {f"{g.name}-model-cache-label" for g in gpu}
    for group in gpu:
        tag = tags[f"{group.name}-model-cache-label"]
        assert tag["autoscalingGroupName"] == f"eks-{group.name}-plan" and tag["tag"] == {
            "key": "k8s.io/cluster-autoscaler/node-template/label/dualtrack.io/model-cache",
            "value": "nvme",
            "propagateAtLaunch": False,
        }
    gpu_template = _one(plan, "aws:ec2/launchTemplate:LaunchTemplate", "cluster-gpu")
    assert (
        gpu_template.inputs["blockDeviceMappings"][0]["ebs"]["volumeSize"]
        == settings.gpu_nodes.root_volume_gib
    )
    if groups == 2:
        fallback = next(g for g in gpu if g.name == "cluster-gpu-fallback")
        assert fallback.inputs["capacityType"] == "ON_DEMAND"
        assert fallback.inputs["scalingConfig"]["minSize"] == 0
        autoscaler = _one(plan, "kubernetes:helm.sh/v3:Release", "gpu-cluster-autoscaler").inputs
        assert autoscaler["values"]["extraArgs"]["expander"] == "priority"
        # read as the autoscaler does (YAML 1.1, map[int][]string): integer keys, not "50"
        priorities = yaml.safe_load(autoscaler["values"]["expanderPriorities"])
        assert priorities == {50: [".*-gpu-spot-.*"], 10: [".*-gpu-fallback-.*"], 1: [".*"]}
        assert all(type(k) is int for k in priorities)


def test_kubeconfig_uses_short_lived_tokens() -> None:
    config = json.loads(kubeconfig_for("c", "https://e", "Q0E=", "eu-west-1"))
    user = config["users"][0]["user"]
    assert user["exec"]["args"] == ["eks", "get-token", "--cluster-name", "c", "--region", "eu-west-1"]
    assert "token" not in user and "client-key-data" not in user


# -- gpu -----------------------------------------------------------------------------------------


def test_gpu_platform(plans: dict[str, Plan]) -> None:
    plan = plans["prod"]
    critical, batch = _k8s(plan, "PriorityClass", "inference-critical"), _k8s(plan, "PriorityClass", "batch")
    assert critical["value"] > batch["value"] and not critical["globalDefault"]
    releases = {r.inputs["chart"]: r.inputs for r in plan.of_type("kubernetes:helm.sh/v3:Release")}
    for chart in ("nvidia-device-plugin", "dcgm-exporter"):
        assert releases[chart]["values"]["tolerations"][0]["key"] == "nvidia.com/gpu"
        assert releases[chart]["values"]["nodeSelector"] == {"dualtrack.io/pool": "gpu"}
    assert releases["dcgm-exporter"]["values"]["serviceMonitor"]["enabled"] is True
    # Helm merges maps into the chart's default affinity (an empty map changes nothing) and replaces
    # lists: the node selector terms must be a list of their own, naming the GPU pool
    affinity = releases["nvidia-device-plugin"]["values"]["affinity"]["nodeAffinity"]
    assert affinity["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"] == [
        {"matchExpressions": [{"key": "dualtrack.io/pool", "operator": "In", "values": ["gpu"]}]}
    ]
    assert all(r["version"][0].isdigit() for r in releases.values())  # every chart pinned


CRD_OWNERS = {
    "monitoring.coreos.com": "kube-prometheus-stack",
    "networking.istio.io": "base",
    "security.istio.io": "base",
    "elasticsearch.k8s.elastic.co": "eck-operator",
    "kibana.k8s.elastic.co": "eck-operator",
}
"""API group of a custom resource -> the chart that installs its CRDs."""
MONITORING_OBJECTS = ("serviceMonitor", "podMonitor", "prometheusRule")


def _enables_monitoring_objects(values: object) -> bool:
    """A chart value such as ``serviceMonitor: {enabled: true}`` anywhere in the values."""
    if isinstance(values, dict):
        return any(
            (k in MONITORING_OBJECTS and isinstance(v, dict) and v.get("enabled") is True)
            or _enables_monitoring_objects(v)
            for k, v in values.items()
        )
    if isinstance(values, list):
        return any(_enables_monitoring_objects(v) for v in values)
    return False


def _closure(plan: Plan, resource: PlannedResource) -> set[str]:
    by_urn = {r.urn: r for r in plan.resources}
    seen: set[str] = set()
    todo = list(resource.depends_on)
    while todo:
        urn = todo.pop()
        if urn not in seen:
            seen.add(urn)
            todo.extend(by_urn[urn].depends_on if urn in by_urn else ())
    return seen


@pytest.mark.parametrize("stack", STACKS)
def test_every_crd_object_waits_for_the_chart_with_its_crd(plans: dict[str, Plan], stack: str) -> None:
    """A first `up` creates nothing whose kind is not installed yet, nor anything in a namespace
    that does not exist yet (both fail the create, and an atomic release rolls back)."""
    plan = plans[stack]
    releases = {r.inputs["chart"]: r for r in plan.of_type("kubernetes:helm.sh/v3:Release")}
    namespaces = {r.inputs["metadata"]["name"]: r for r in plan.of_type("kubernetes:core/v1:Namespace")}
    checked = 0
    for resource in plan.resources:
        needs: list[PlannedResource] = []
        namespace = None
        if resource.type == "kubernetes:helm.sh/v3:Release":
            namespace = resource.inputs["namespace"]
            if _enables_monitoring_objects(resource.inputs["values"]) and resource.inputs["chart"] != (
                "kube-prometheus-stack"
            ):
                needs.append(releases["kube-prometheus-stack"])
        elif resource.is_kubernetes_object and "/" in resource.inputs["apiVersion"]:
            group = resource.inputs["apiVersion"].split("/")[0]
            if group in CRD_OWNERS:
                needs.append(releases[CRD_OWNERS[group]])
            namespace = resource.inputs["metadata"].get("namespace")
        if namespace in namespaces:
            needs.append(namespaces[namespace])
        closure = _closure(plan, resource)
        for need in needs:
            assert need.urn in closure, f"{resource.name} ({resource.type}) is not ordered after {need.name}"
            checked += 1
    assert checked > 20  # the rule really ran over the program's CRD objects and releases


# -- serving -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "stack, gpus, startup_s", [("dev", 1, 1200), ("staging", 4, 2400), ("prod", 8, 3600)]
)
def test_triton_deployment(plans: dict[str, Plan], stack: str, gpus: int, startup_s: int) -> None:
    plan = plans[stack]
    settings = load_settings(_config(stack))
    deployment = _k8s(plan, "Deployment", f"triton-{settings.serving.model_version}")
    pod = deployment["spec"]["template"]["spec"]
    triton = pod["containers"][0]
    assert (
        triton["image"] == f"nvcr.io/nvidia/tritonserver:{settings.serving.triton_version}-trtllm-python-py3"
    )
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == str(gpus)
    assert triton["resources"]["requests"]["nvidia.com/gpu"] == str(gpus)
    probe = triton["startupProbe"]
    assert probe["httpGet"]["path"] == "/v2/health/ready"
    assert probe["periodSeconds"] * probe["failureThreshold"] >= startup_s
    assert triton["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert {p["containerPort"] for p in triton["ports"]} == {8000, 8001, 8002}
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": f"{settings.serving.shm_gib}Gi"}
    assert pod["priorityClassName"] == "inference-critical"
    assert pod["tolerations"] == [
        {"effect": "NoSchedule", "key": "nvidia.com/gpu", "operator": "Equal", "value": "true"}
    ]
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    assert {
        "key": "node.kubernetes.io/instance-type",
        "operator": "In",
        "values": [settings.gpu_nodes.instance_type],
    } in terms[0]["matchExpressions"]
    assert {"name": "HOME", "value": "/tmp"} in triton["env"]  # read-only root, UID without a home
    assert "replicas" not in deployment["spec"]  # the HPA owns the primary's replica count
    sync = pod["initContainers"][0]
    assert sync["command"][:2] == ["sh", "-c"]
    prefix = f"{settings.serving.profile}/{settings.serving.model_version}"
    assert (
        f"aws s3 sync --no-progress --only-show-errors --delete s3://dualtrack-{stack}-models-plan/{prefix}/ "
        in (sync["command"][2])
    )
    # one version's layout from the node's NVMe cache, read-only; the repository holds models only
    cache = next(v for v in pod["volumes"] if v["name"] == "model-cache")
    assert cache["hostPath"] == {"path": "/mnt/k8s-disks/0/dualtrack-models", "type": "Directory"}
    mount = next(m for m in triton["volumeMounts"] if m["name"] == "model-cache")
    assert mount == {"name": "model-cache", "mountPath": "/models", "subPath": prefix, "readOnly": True}
    assert "--model-repository=/models/repository" in triton["args"]
    assert pod["serviceAccountName"] == "triton"


def test_model_bucket_is_private_encrypted_versioned(plans: dict[str, Plan]) -> None:
    plan = plans["dev"]
    block = _one(plan, "aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock").inputs
    assert all(
        block[k] is True
        for k in ("blockPublicAcls", "blockPublicPolicy", "ignorePublicAcls", "restrictPublicBuckets")
    )
    assert (
        _one(plan, "aws:s3/bucketVersioning:BucketVersioning").inputs["versioningConfiguration"]["status"]
        == "Enabled"
    )
    sse = _one(
        plan, "aws:s3/bucketServerSideEncryptionConfiguration:BucketServerSideEncryptionConfiguration"
    ).inputs
    assert sse["rules"][0]["applyServerSideEncryptionByDefault"]["sseAlgorithm"] == "aws:kms"
    tls = json.loads(_one(plan, "aws:s3/bucketPolicy:BucketPolicy").inputs["policy"])
    assert (
        tls["Statement"][0]["Effect"] == "Deny"
        and tls["Statement"][0]["Condition"]["Bool"]["aws:SecureTransport"] == "false"
    )


def test_model_sync_role_is_limited_to_the_bucket(plans: dict[str, Plan]) -> None:
    plan = plans["dev"]
    reader = _one(plan, "aws:iam/rolePolicy:RolePolicy", "cluster-irsa-triton-models").inputs
    statements = json.loads(reader["policy"])["Statement"]
    actions = {a for s in statements for a in s["Action"]}
    assert actions == {"s3:ListBucket", "s3:GetObject", "kms:Decrypt"}
    assert all("*" not in s["Resource"].replace("/*", "") for s in statements)
    role = next(r for r in plan.of_type("aws:iam/role:Role") if r.name == "cluster-irsa-triton-models")
    condition = json.loads(role.inputs["assumeRolePolicy"])["Statement"][0]["Condition"]["StringEquals"]
    assert "system:serviceaccount:serving:triton" in condition.values()
    sa = _k8s(plan, "ServiceAccount", "triton")
    assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].endswith("cluster-irsa-triton-models")


@pytest.mark.parametrize("stack", STACKS)
def test_service_hpa_pdb(plans: dict[str, Plan], stack: str) -> None:
    plan = plans[stack]
    settings = load_settings(_config(stack))
    service = _k8s(plan, "Service", "triton")
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {
        "http": 8000,
        "grpc": 8001,
        "http-metrics": 8002,
    }
    assert service["spec"]["type"] == "ClusterIP"
    hpa = _k8s(plan, "HorizontalPodAutoscaler", f"triton-{settings.serving.model_version}")
    metric = hpa["spec"]["metrics"][0]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "triton_requests_waiting"
    assert metric["pods"]["target"]["averageValue"] == str(settings.serving.waiting_requests_target)
    assert all(m["type"] != "Resource" for m in hpa["spec"]["metrics"])  # never CPU
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (
        settings.serving.replicas,
        settings.serving.max_replicas,
    )
    assert _k8s(plan, "PodDisruptionBudget", "triton")["spec"]["maxUnavailable"] == 1


@pytest.mark.parametrize("stack", STACKS)
def test_pulumi_waits_as_long_as_a_first_load_takes(plans: dict[str, Plan], stack: str) -> None:
    settings = load_settings(_config(stack))
    deployment = _one(
        plans[stack], "kubernetes:apps/v1:Deployment", f"serving-{settings.serving.model_version}"
    )
    minutes = int(deployment.timeouts["create"].removesuffix("m"))
    profile = settings.serving.model
    # the first sync of every byte at the stated throughput (with its margin), then the first load
    sync_s = profile.artifact_gib() * 1024 / settings.serving.model_sync_mib_per_s
    assert minutes * 60 >= sync_s * 1.5 + profile.startup_timeout_s
    assert deployment.timeouts["update"] == deployment.timeouts["create"]
    version = settings.serving.model_version
    jobs = [
        r
        for r in plans[stack].of_type("kubernetes:batch/v1:Job")
        if r.name == f"serving-engine-build-{version}"
    ]
    if jobs:  # Triton starts only once its engines exist
        assert jobs[0].urn in deployment.depends_on
        assert int(jobs[0].timeouts["create"].removesuffix("m")) * 60 >= 2 * sync_s * 1.5 + 4 * 3600


def test_waits_follow_the_stated_throughput(stack_config) -> None:

    config = stack_config("prod")
    slow = run_program("prod", config)
    config["dualtrack:serving"]["modelSyncMiBps"] = 1000
    fast = run_program("prod", config)

    def wait(plan: Plan) -> int:
        return int(
            _one(plan, "kubernetes:apps/v1:Deployment", "serving-v1").timeouts["create"].removesuffix("m")
        )

    # 671B FP8 = 625 GiB: 64 min at 250 MiB/s with the margin, 16 min at 1,000 MiB/s; plus the first load
    assert wait(slow) == 64 + 60 and wait(fast) == 16 + 60


def test_engine_build_job_only_for_engine_profiles(plans: dict[str, Plan]) -> None:
    jobs = {
        stack: [
            o
            for o in plan.kubernetes_objects()
            if o["kind"] == "Job" and "engine-build" in o["metadata"]["name"]
        ]
        for stack, plan in plans.items()
    }
    # every engine-path version that serves gets its own engines (staging: primary and canary)
    assert len(jobs["dev"]) == 1 and len(jobs["staging"]) == 2 and jobs["prod"] == []  # prod: PyTorch path
    canary = _k8s(plans["staging"], "Deployment", "triton-v2")
    build_v2 = _one(plans["staging"], "kubernetes:batch/v1:Job", "serving-engine-build-v2")
    deployment_v2 = next(r for r in plans["staging"].resources if r.name == "serving-v2")
    assert build_v2.urn in deployment_v2.depends_on and canary["metadata"]["name"] == "triton-v2"
    # the mocks register resources in any order: pick each version's Job by its name
    by_name = {o["metadata"]["name"].rsplit("-", 1)[-1]: o for o in jobs["staging"]}
    assert sorted(by_name) == ["v1", "v2"], [o["metadata"]["name"] for o in jobs["staging"]]
    upload = by_name["v2"]["spec"]["template"]["spec"]["containers"][0]
    assert upload["args"][1].endswith("/deepseek-r1-distill-qwen-32b/v2/engines/")
    job = by_name["v1"]["spec"]["template"]["spec"]
    assert job["priorityClassName"] == "batch"
    assert [c["name"] for c in job["initContainers"]] == ["fetch-checkpoint", "build"]
    assert job["initContainers"][1]["resources"]["limits"]["nvidia.com/gpu"] == "4"
    script = _k8s(plans["staging"], "ConfigMap", "engine-build-v1")["data"]["build.sh"]
    assert "--tp_size 4" in script and "trtllm-build" in script and script.startswith("set -euo pipefail")


# -- mesh ----------------------------------------------------------------------------------------


def test_priority_routing_and_canary(plans: dict[str, Plan]) -> None:
    vs = _k8s(plans["staging"], "VirtualService", "triton")["spec"]
    assert vs["gateways"] == ["istio-ingress/dualtrack"]
    routes = {r["name"]: r for r in vs["http"]}
    assert list(routes) == ["grpc-high", "grpc-default", "http-high", "http-default"]
    high = routes["http-high"]
    assert high["match"][0]["headers"] == {"x-priority": {"exact": "high"}}
    assert [d["destination"]["subset"] for d in high["route"]] == ["primary"]
    default = routes["http-default"]
    assert {d["destination"]["subset"]: d["weight"] for d in default["route"]} == {
        "primary": 90,
        "canary": 10,
    }
    assert default["timeout"] == "600s" and "5xx" not in default["retries"]["retryOn"]
    canary = _k8s(plans["staging"], "Deployment", "triton-v2")
    assert canary["spec"]["replicas"] == 1  # no HPA on the canary: its size is config
    dr = _k8s(plans["staging"], "DestinationRule", "triton")["spec"]
    assert {s["name"] for s in dr["subsets"]} == {"primary", "canary"}
    assert dr["trafficPolicy"]["outlierDetection"]["consecutive5xxErrors"] == 5
    assert dr["trafficPolicy"]["connectionPool"]["http"]["http2MaxRequests"] > 0
    # no canary configured: everything goes to the primary subset
    dev_default = {r["name"]: r for r in _k8s(plans["dev"], "VirtualService", "triton")["spec"]["http"]}[
        "http-default"
    ]
    assert [(d["destination"]["subset"], d["weight"]) for d in dev_default["route"]] == [("primary", 100)]


@pytest.mark.parametrize("stack", STACKS)
def test_mesh_security(plans: dict[str, Plan], stack: str) -> None:
    plan = plans[stack]
    settings = load_settings(_config(stack))
    assert _k8s(plan, "PeerAuthentication", "namespace-default")["spec"] == {"mtls": {"mode": "STRICT"}}
    assert _k8s(plan, "AuthorizationPolicy", "deny-by-default")["spec"] == {}
    allow = _k8s(plan, "AuthorizationPolicy", "allow-ingress")["spec"]
    source = allow["rules"][0]["from"][0]["source"]
    assert source["principals"] == ["cluster.local/ns/istio-ingress/sa/istio-ingress"]
    assert source["requestPrincipals"] == [f"{settings.mesh.jwt.issuer}/*"]
    jwt = [o for o in plan.kubernetes_objects() if o["kind"] == "RequestAuthentication"]
    assert {o["metadata"]["namespace"] for o in jwt} == {"istio-ingress", "serving"}
    assert all(o["spec"]["jwtRules"][0]["jwksUri"] == settings.mesh.jwt.jwks_uri for o in jwt)
    gateway = _k8s(plan, "Gateway", "dualtrack")["spec"]["servers"][0]
    assert gateway["tls"]["mode"] == "SIMPLE" and gateway["hosts"] == [settings.mesh.hostname]
    hosts = _k8s(plan, "AuthorizationPolicy", "require-jwt")["spec"]["rules"][0]["to"][0]["operation"][
        "hosts"
    ]
    assert hosts == [settings.mesh.hostname, f"{settings.mesh.hostname}:*"]  # gRPC sends host:443
    ingress = _one(plan, "kubernetes:helm.sh/v3:Release", "mesh-gateway").inputs
    assert ingress["namespace"] == "istio-ingress"
    annotations = ingress["values"]["service"]["annotations"]
    assert annotations["service.beta.kubernetes.io/aws-load-balancer-type"] == "nlb"
    assert "service.beta.kubernetes.io/aws-load-balancer-internal" not in annotations
    assert ingress["values"]["service"]["loadBalancerSourceRanges"] == settings.onprem_cidrs
    assert {
        r.inputs["version"]
        for r in plan.of_type("kubernetes:helm.sh/v3:Release")
        if r.inputs["repositoryOpts"]["repo"].startswith("https://istio-release")
    } == {settings.mesh.istio_version}


# -- observability / logging ------------------------------------------------------------------------


def test_monitoring(plans: dict[str, Plan]) -> None:
    plan = plans["prod"]
    rules = _k8s(plan, "PrometheusRule", "triton")["spec"]["groups"]
    recorded = {r["record"]: r["expr"] for r in rules[0]["rules"]}
    # the HPA's signal: requests waiting inside the executor (Triton's queue stays empty for decoupled
    # models); the served models export its input (tests/infra/test_pod_replay.py)
    assert recorded["triton:requests_waiting"] == (
        'sum by (namespace, pod) (nv_trt_llm_request_metrics{request_type="waiting"})'
    )
    assert "nv_inference_queue_duration_us" in recorded["triton:queue_compute_ratio"]
    assert "nv_inference_compute_infer_duration_us" in recorded["triton:queue_compute_ratio"]
    alerts = {r["alert"] for r in rules[1]["rules"]}
    assert {"TritonDown", "TritonQueueRatioHigh", "GpuMemoryNearlyFull", "GpuTemperatureHigh"} <= alerts
    monitor = _k8s(plan, "ServiceMonitor", "triton")["spec"]
    assert monitor["endpoints"][0]["port"] == "http-metrics"
    adapter = _one(plan, "kubernetes:helm.sh/v3:Release", "observability-prometheus-adapter").inputs
    rule = adapter["values"]["rules"]["custom"][0]
    assert rule["name"] == {"matches": "^triton:requests_waiting$", "as": "triton_requests_waiting"}
    assert rule["seriesQuery"].startswith("triton:requests_waiting{")
    dashboards = [
        o
        for o in plan.kubernetes_objects()
        if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("dashboard-")
    ]
    assert {d["metadata"]["name"] for d in dashboards} == {"dashboard-triton", "dashboard-gpu"}
    assert all(d["metadata"]["labels"]["grafana_dashboard"] == "1" for d in dashboards)
    stack = _one(plan, "kubernetes:helm.sh/v3:Release", "observability-kube-prometheus-stack").inputs
    assert stack["values"]["grafana"]["admin"]["existingSecret"] == "grafana-admin"
    assert stack["values"]["prometheus"]["prometheusSpec"]["retention"] == "30d"


def test_logging_retention(plans: dict[str, Plan]) -> None:
    for stack, days in (("dev", 7), ("prod", 90)):
        job = _k8s(plans[stack], "Job", f"log-retention-{days}d")
        script = job["spec"]["template"]["spec"]["containers"][0]["command"][2]
        assert f'"min_age": "{days}d"' in script and "_ilm/policy/dualtrack-retention" in script
    es = _k8s(plans["prod"], "Elasticsearch", "logs")["spec"]
    assert es["nodeSets"][0]["count"] == 3
    fluent = _one(plans["prod"], "kubernetes:helm.sh/v3:Release", "logging-fluent-bit").inputs
    assert fluent["values"]["tolerations"] == [{"operator": "Exists"}]  # GPU nodes' logs too
    assert "Logstash_Prefix dualtrack" in fluent["values"]["config"]["outputs"]


# -- messaging / images -----------------------------------------------------------------------------


@pytest.mark.parametrize("stack", STACKS)
def test_msk(plans: dict[str, Plan], stack: str) -> None:
    plan = plans[stack]
    settings = load_settings(_config(stack))
    msk = _one(plan, "aws:msk/cluster:Cluster").inputs
    assert (
        msk["clientAuthentication"]["sasl"]["iam"] is True
        and msk["clientAuthentication"]["unauthenticated"] is False
    )
    assert msk["encryptionInfo"]["encryptionInTransit"] == {"clientBroker": "TLS", "inCluster": True}
    assert (
        msk["numberOfBrokerNodes"]
        == len(settings.network.availability_zones) * settings.messaging.brokers_per_az
    )
    sg = _one(plan, "aws:ec2/securityGroup:SecurityGroup", "messaging-msk").inputs
    assert [(r["fromPort"], r["toPort"]) for r in sg["ingress"]] == [(9098, 9098)]
    assert sg["ingress"][0]["cidrBlocks"] == [*settings.onprem_cidrs, str(settings.network.cidr)]
    config = _one(plan, "aws:msk/configuration:Configuration").inputs["serverProperties"]
    assert "auto.create.topics.enable=false" in config
    policy = json.loads(_one(plan, "aws:iam/policy:Policy", "messaging-client").inputs["policy"])
    by_action = {a: s["Resource"] for s in policy["Statement"] for a in s["Action"]}
    topic = settings.messaging.topic
    assert [arn.rsplit("/", 1)[1] for arn in by_action["kafka-cluster:ReadData"]] == [topic, f"{topic}.dlq"]
    assert all(":topic/" in arn for arn in by_action["kafka-cluster:WriteData"])
    # the consumers read the topics' retention; changing it is the cluster admin's, not a client's
    assert len(by_action["kafka-cluster:DescribeTopicDynamicConfiguration"]) == 2
    assert "kafka-cluster:AlterTopicDynamicConfiguration" not in by_action
    # MSK maps idempotent writes to a cluster permission: on the topic it would be refused
    assert ":cluster/" in by_action["kafka-cluster:WriteDataIdempotently"]


def test_ecr_and_optional_image_build(plans: dict[str, Plan], stack_config) -> None:

    repo = _one(plans["dev"], "aws:ecr/repository:Repository").inputs
    assert (
        repo["imageTagMutability"] == "IMMUTABLE" and repo["imageScanningConfiguration"]["scanOnPush"] is True
    )
    assert not plans["dev"].of_type("docker:index/image:Image")
    config = stack_config("dev")
    config["dualtrack:images"] = {"build": True, "tag": "1.2.3"}
    built = run_program("dev", config)
    image = _one(built, "docker:index/image:Image").inputs
    assert re.search(r"/dev/dualtrack-serving:1\.2\.3-[0-9a-f]{12}$", image["imageName"])
    assert image["build"]["args"]["TRITON_IMAGE"].endswith("-trtllm-python-py3")
    assert image["registry"]["password"] == "[secret]"
    triton = _k8s(built, "Deployment", "triton-v1")["spec"]["template"]["spec"]["containers"][0]
    assert "@sha256:" in triton["image"] and "dualtrack-serving" in triton["image"]


def test_image_tag_follows_the_content(tmp_path) -> None:
    """Immutable tags: a second build of changed content must not reuse the first one's tag."""
    import shutil

    from infra.components.images import IMAGE_INPUTS, ROOT, content_tag

    for entry in IMAGE_INPUTS:
        source = ROOT / entry
        target = tmp_path / entry
        target.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if source.is_dir() else shutil.copy2)(source, target)
    base = "nvcr.io/nvidia/tritonserver:25.10-trtllm-python-py3"
    first = content_tag("0.1.0", base, tmp_path)
    assert first == content_tag("0.1.0", base, ROOT) and first.startswith("0.1.0-")
    (tmp_path / "model_repo" / "profiles.yaml").write_text("profiles: {}\n")
    changed = content_tag("0.1.0", base, tmp_path)
    assert changed != first
    assert content_tag("0.1.0", base.replace("25.10", "25.11"), tmp_path) != changed


# -- outputs and shape ---------------------------------------------------------------------------------


@pytest.mark.parametrize("stack", STACKS)
def test_outputs_fulfil_the_contract(plans: dict[str, Plan], stack: str) -> None:
    outputs = plans[stack].outputs
    assert set(outputs) == set(contract.OUTPUT_KEYS)
    parsed = contract.parse_outputs(outputs)
    assert parsed.environment == stack and parsed.kafka_topic == "knowledge_updates"
    assert parsed.triton_http_endpoint.startswith("https://") and parsed.kafka_bootstrap_brokers.endswith(
        ":9098"
    )
    assert outputs["kubeconfig"] == "[secret]"


@pytest.mark.parametrize("stack", STACKS)
def test_every_resource_belongs_to_a_component(plans: dict[str, Plan], stack: str) -> None:
    plan = plans[stack]
    components = {r.name for r in plan.resources if r.type.startswith("dualtrack:cloud:")}
    assert components == {
        "network",
        "cluster",
        "gpu",
        "serving",
        "observability",
        "mesh",
        "logging",
        "messaging",
        "images",
        "access",
    }
    orphans = [
        r.name
        for r in plan.resources
        if r.parent is None and not r.type.startswith(("dualtrack:cloud:", "pulumi:providers:"))
    ]
    assert orphans == []
    counts = Counter(r.type for r in plan.resources)
    assert counts["pulumi:providers:aws"] == 1 and counts["pulumi:providers:kubernetes"] == 1


def _config(stack: str) -> dict:
    from dualtrack.plan import load_stack_config, runtime_config

    return runtime_config(load_stack_config(stack))[0]


# -- the entry point Pulumi runs -------------------------------------------------------------------


def _run_entry_point(config: dict, monkeypatch: pytest.MonkeyPatch) -> dict:
    """Run ``infra/`` the way the Pulumi language host does (runpy on the directory) under mocks."""
    import runpy

    import pulumi
    import pulumi.runtime.settings as runtime_settings

    from dualtrack.plan import ROOT, PlanMocks, RecordingMonitor, runtime_config

    exported: dict = {}
    monkeypatch.setattr(pulumi, "export", lambda key, value: exported.__setitem__(key, value))
    values, secret_keys = runtime_config(config)
    mocks = PlanMocks("us-east-1", "dev")
    runtime_settings.ROOT.set(None)
    pulumi.runtime.set_all_config(values, secret_keys)
    pulumi.runtime.set_mocks(mocks, project="dualtrack", stack="dev", monitor=RecordingMonitor(mocks))

    def program() -> None:
        runpy.run_path(str(ROOT / "infra"), run_name="__main__")

    pulumi.runtime.test(program)()
    return exported


def test_entry_point_exports_the_contract(stack_config, monkeypatch: pytest.MonkeyPatch) -> None:
    exported = _run_entry_point(stack_config("dev"), monkeypatch)
    assert tuple(exported) == contract.OUTPUT_KEYS


def test_entry_point_reports_bad_config_without_traceback(
    stack_config, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pulumi

    config = stack_config("dev")
    config["dualtrack:gpuNodes"]["instanceType"] = "p9.mega"
    with pytest.raises(pulumi.RunError, match=r"dualtrack:gpuNodes.instanceType: 'p9.mega'"):
        _run_entry_point(config, monkeypatch)


def test_internal_ingress_and_pipeline_access(stack_config) -> None:
    config = stack_config("prod")
    config["dualtrack:mesh"]["ingressScheme"] = "internal"
    config["dualtrack:cluster"]["adminRoleArns"] = ["arn:aws:iam::123456789012:role/deploy"]
    config["dualtrack:cluster"]["viewerRoleArns"] = ["arn:aws:iam::123456789012:role/preview"]
    config["dualtrack:messaging"]["clientCidrs"] = ["10.99.0.0/16"]
    plan = run_program("prod", config)
    ingress = _one(plan, "kubernetes:helm.sh/v3:Release", "mesh-gateway").inputs
    assert (
        ingress["values"]["service"]["annotations"]["service.beta.kubernetes.io/aws-load-balancer-internal"]
        == "true"
    )
    policies = {
        a.inputs["principalArn"]: a.inputs["policyArn"]
        for a in plan.of_type("aws:eks/accessPolicyAssociation:AccessPolicyAssociation")
    }
    access = "arn:aws:eks::aws:cluster-access-policy/"
    assert policies == {
        "arn:aws:iam::123456789012:role/deploy": access + "AmazonEKSClusterAdminPolicy",
        "arn:aws:iam::123456789012:role/preview": access + "AmazonEKSViewPolicy",
    }
    assert len(plan.of_type("aws:eks/accessEntry:AccessEntry")) == 2
    sg = _one(plan, "aws:ec2/securityGroup:SecurityGroup", "messaging-msk").inputs
    assert sg["ingress"][0]["cidrBlocks"] == ["10.99.0.0/16", "10.42.0.0/16"]


def test_gpu_nodes_boot_with_the_nvme_model_cache(plans: dict[str, Plan], tmp_path) -> None:
    """The GPU launch template's user data: nodeadm's RAID0 and label, and the boot script, run."""
    import base64
    import email
    import subprocess

    template = _one(plans["prod"], "aws:ec2/launchTemplate:LaunchTemplate", "cluster-gpu").inputs
    message = email.message_from_string(base64.b64decode(template["userData"]).decode())
    parts = {p.get_content_type(): p.get_payload() for p in message.walk() if not p.is_multipart()}
    node = yaml.safe_load(parts["application/node.eks.aws"])
    assert node["kind"] == "NodeConfig" and node["spec"]["instance"]["localStorage"] == {"strategy": "RAID0"}
    assert node["spec"]["kubelet"]["flags"] == ["--node-labels=dualtrack.io/model-cache=nvme"]
    pod = _k8s(plans["prod"], "Deployment", "triton-v1")["spec"]["template"]["spec"]
    (term,) = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    assert {"key": "dualtrack.io/model-cache", "operator": "In", "values": ["nvme"]} in term[
        "matchExpressions"
    ]
    script = tmp_path / "boot.sh"
    script.write_text(parts["text/x-shellscript"])
    calls = tmp_path / "calls"
    for name, code in (("mountpoint", "$MOUNTED"), ("install", "0")):
        (tmp_path / name).write_text(f'#!/bin/sh\necho "{name} $*" >> {calls}\nexit {code}\n')
        (tmp_path / name).chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin"}
    refused = subprocess.run(
        ["bash", str(script)], env={**env, "MOUNTED": "1"}, capture_output=True, text=True
    )
    assert refused.returncode == 1 and "instance-store RAID0 is not mounted" in refused.stderr
    assert "install" not in calls.read_text()  # nothing created on the root volume
    calls.unlink()
    done = subprocess.run(["bash", str(script)], env={**env, "MOUNTED": "0"}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert calls.read_text().splitlines() == [
        "mountpoint -q /mnt/k8s-disks/0",
        "install -d -o 10001 -g 10001 -m 0750 /mnt/k8s-disks/0/dualtrack-models",
        "install -o 10001 -g 10001 -m 0640 /dev/null /mnt/k8s-disks/0/dualtrack-models/.dualtrack-cache",
    ]


@pytest.mark.parametrize("stack", STACKS)
def test_moved_resources_keep_their_state(plans: dict[str, Plan], stack: str) -> None:
    """Renames are aliased: without, `up` creates the new resource before deleting the old one --
    Helm refuses a second release of the same name, and the old Job's deletion removes the new one."""
    aliased = {(r.type, r.name): r.aliases for r in plans[stack].resources if r.aliases}
    assert aliased[("kubernetes:helm.sh/v3:Release", "observability-dcgm-exporter")] == ("gpu-dcgm-exporter",)
    if stack != "prod":  # engine-path stacks: the primary's build kept its unversioned name's state
        for type_ in ("kubernetes:batch/v1:Job", "kubernetes:core/v1:ConfigMap"):
            assert aliased[(type_, "serving-engine-build-v1")] == ("serving-engine-build",)
    assert ("kubernetes:batch/v1:Job", "serving-engine-build-v2") not in aliased  # a new canary build is new
