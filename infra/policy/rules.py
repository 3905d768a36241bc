"""The guardrails every dualtrack stack must satisfy, as pulumi-policy (CrossGuard) rules.

Each rule is a small function over one resource's properties (or the whole
stack for rules about relationships), so it can be unit-tested by feeding it
the resources captured from the mocked program -- and broken variants of them.
Properties are the engine's camelCase names; values Pulumi does not know yet
during a preview (ids of resources still to be created) are simply absent, so
rules never fail on an unknown, only on a known bad value.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from pulumi_policy import (
    ReportViolation,
    ResourceValidationArgs,
    ResourceValidationPolicy,
    StackValidationArgs,
    StackValidationPolicy,
)

INGRESS_NAMESPACE = "istio-ingress"
GPU_INSTANCE = re.compile(r"^(p\d|g\d)[a-z]*\.")
PUBLIC_ACLS = {"public-read", "public-read-write", "authenticated-read"}
WORKLOADS = {
    "kubernetes:apps/v1:Deployment": ("spec", "template", "spec"),
    "kubernetes:apps/v1:StatefulSet": ("spec", "template", "spec"),
    "kubernetes:apps/v1:DaemonSet": ("spec", "template", "spec"),
    "kubernetes:apps/v1:ReplicaSet": ("spec", "template", "spec"),
    "kubernetes:batch/v1:Job": ("spec", "template", "spec"),
    "kubernetes:batch/v1:CronJob": ("spec", "jobTemplate", "spec", "template", "spec"),
    "kubernetes:core/v1:Pod": ("spec",),
}
PEER_AUTHENTICATION = "kubernetes:security.istio.io/v1:PeerAuthentication"


def _get(props: Mapping[str, Any] | None, *path: str) -> Any:
    value: Any = props
    for key in path:
        if not isinstance(value, Mapping):
            return None
        value = value.get(key)
    return value


# -- resource rules: (resource type, props) -> problems -------------------------------------------


def bucket_acl_problems(resource_type: str, props: Mapping[str, Any]) -> list[str]:
    if resource_type in (
        "aws:s3/bucket:Bucket",
        "aws:s3/bucketAclV2:BucketAclV2",
        "aws:s3/bucketAcl:BucketAcl",
    ):
        acl = props.get("acl")
        if acl in PUBLIC_ACLS:
            return [f"S3 ACL {acl!r} makes objects public; model and knowledge data must stay private"]
    if resource_type == "aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock":
        off = [
            k
            for k in ("blockPublicAcls", "blockPublicPolicy", "ignorePublicAcls", "restrictPublicBuckets")
            if props.get(k) is not True
        ]
        if off:
            return [f"public access block must set {', '.join(off)} to true"]
    return []


def imds_problems(resource_type: str, props: Mapping[str, Any]) -> list[str]:
    if resource_type not in ("aws:ec2/launchTemplate:LaunchTemplate", "aws:ec2/instance:Instance"):
        return []
    if _get(props, "metadataOptions", "httpTokens") != "required":
        return [
            "IMDSv2 must be required (metadataOptions.httpTokens = required): IMDSv1 leaks node credentials"
        ]
    return []


def eks_encryption_problems(resource_type: str, props: Mapping[str, Any]) -> list[str]:
    if resource_type != "aws:eks/cluster:Cluster":
        return []
    config = props.get("encryptionConfig") or {}
    if "secrets" not in (config.get("resources") or []) or not _get(config, "provider"):
        return [
            "EKS must envelope-encrypt Kubernetes secrets with a KMS key "
            "(encryptionConfig.resources: [secrets])"
        ]
    return []


def gpu_taint_problems(resource_type: str, props: Mapping[str, Any]) -> list[str]:
    if resource_type != "aws:eks/nodeGroup:NodeGroup":
        return []
    gpu = "NVIDIA" in str(props.get("amiType", "")) or any(
        GPU_INSTANCE.match(t) for t in props.get("instanceTypes") or []
    )
    tainted = any(
        t.get("key") == "nvidia.com/gpu" and t.get("effect") == "NO_SCHEDULE"
        for t in props.get("taints") or []
    )
    if gpu and not tainted:
        return ["GPU node groups must carry the nvidia.com/gpu=true:NoSchedule taint"]
    return []


def image_is_pinned(image: str) -> bool:
    """A digest, or a tag that is not ``latest`` (``repo:tag``; a registry port is not a tag)."""
    if "@sha256:" in image:
        return True
    name, _, tag = image.rpartition(":")
    return bool(name) and "/" not in tag and tag not in ("", "latest")


def container_problems(resource_type: str, props: Mapping[str, Any]) -> list[str]:
    path = WORKLOADS.get(resource_type)
    if path is None:
        return []
    pod = _get(props, *path) or {}
    problems = []
    for container in [*(pod.get("initContainers") or []), *(pod.get("containers") or [])]:
        name = container.get("name", "?")
        limits = _get(container, "resources", "limits") or {}
        missing = [r for r in ("cpu", "memory") if r not in limits]
        if missing:
            problems.append(f"container {name!r} has no {' or '.join(missing)} limit")
        image = container.get("image")
        if isinstance(image, str) and not image_is_pinned(image):
            problems.append(f"container {name!r} image {image!r} is not pinned to a version tag or digest")
    return problems


def load_balancer_problems(resource_type: str, props: Mapping[str, Any]) -> list[str]:
    if resource_type == "kubernetes:core/v1:Service":
        namespace = _get(props, "metadata", "namespace") or "default"
        if _get(props, "spec", "type") == "LoadBalancer" and namespace != INGRESS_NAMESPACE:
            return [
                f"LoadBalancer Service in namespace {namespace!r}: only {INGRESS_NAMESPACE} may face outside"
            ]
    if resource_type == "kubernetes:helm.sh/v3:Release":
        namespace = props.get("namespace") or "default"
        if _get(props, "values", "service", "type") == "LoadBalancer" and namespace != INGRESS_NAMESPACE:
            return [
                f"Helm release in namespace {namespace!r} asks for a LoadBalancer; "
                f"only {INGRESS_NAMESPACE} may"
            ]
    return []


# -- stack rules: all resources -> problems --------------------------------------------------------


def _pairs(resources: Iterable[Any]) -> list[tuple[str, str, Mapping[str, Any]]]:
    return [(r.resource_type, r.name, r.props) for r in resources]


def bucket_public_access_problems(resources: Iterable[Any]) -> list[str]:
    """Every bucket has a public access block (matched by bucket name, or logical name in preview)."""
    items = _pairs(resources)
    blocks = [
        (name, props)
        for t, name, props in items
        if t == "aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock"
    ]
    problems = []
    for t, name, props in items:
        if t != "aws:s3/bucket:Bucket":
            continue
        ids = {props.get("bucket"), props.get("id")} - {None}
        if not any(block_name == name or block.get("bucket") in ids for block_name, block in blocks):
            problems.append(f"bucket {name!r} has no BucketPublicAccessBlock")
    return problems


def node_group_imds_problems(resources: Iterable[Any]) -> list[str]:
    """A node group without a launch template gets EKS's default metadata options (IMDSv1 allowed)."""
    return [
        f"node group {name!r} has no launch template, so IMDSv2 is not enforced"
        for t, name, props in _pairs(resources)
        if t == "aws:eks/nodeGroup:NodeGroup" and not props.get("launchTemplate")
    ]


def strict_mtls_problems(resources: Iterable[Any]) -> list[str]:
    """Each sidecar-injected namespace has a namespace-wide STRICT PeerAuthentication."""
    items = _pairs(resources)
    meshed = [
        _get(props, "metadata", "name")
        for t, _, props in items
        if t == "kubernetes:core/v1:Namespace"
        and (_get(props, "metadata", "labels") or {}).get("istio-injection") == "enabled"
    ]
    strict = {
        _get(props, "metadata", "namespace")
        for t, _, props in items
        if t == PEER_AUTHENTICATION
        and _get(props, "spec", "mtls", "mode") == "STRICT"
        and not _get(props, "spec", "selector")
    }
    if not meshed:
        return ["no namespace has Istio sidecar injection: the serving namespace must be in the mesh"]
    return [
        f"namespace {ns!r} has no namespace-wide STRICT PeerAuthentication"
        for ns in meshed
        if ns not in strict
    ]


# -- wiring -----------------------------------------------------------------------------------------


def _resource_policy(
    name: str, description: str, check: Callable[[str, Mapping[str, Any]], list[str]]
) -> ResourceValidationPolicy:
    def validate(args: ResourceValidationArgs, report_violation: ReportViolation) -> None:
        for problem in check(args.resource_type, args.props):
            report_violation(problem, None)

    return ResourceValidationPolicy(name=name, description=description, validate=validate)


def _stack_policy(
    name: str, description: str, check: Callable[[Iterable[Any]], list[str]]
) -> StackValidationPolicy:
    def validate(args: StackValidationArgs, report_violation: ReportViolation) -> None:
        for problem in check(args.resources):
            report_violation(problem, None)

    return StackValidationPolicy(name=name, description=description, validate=validate)


POLICIES = [
    _resource_policy(
        "s3-no-public-acl", "S3 buckets and public access blocks keep data private.", bucket_acl_problems
    ),
    _stack_policy(
        "s3-public-access-blocked",
        "Every S3 bucket has a public access block.",
        bucket_public_access_problems,
    ),
    _resource_policy("imdsv2-required", "Launch templates and instances require IMDSv2.", imds_problems),
    _stack_policy(
        "node-groups-use-launch-templates",
        "Node groups get IMDSv2 through a launch template.",
        node_group_imds_problems,
    ),
    _resource_policy(
        "eks-secrets-encrypted", "EKS encrypts Kubernetes secrets with KMS.", eks_encryption_problems
    ),
    _resource_policy(
        "gpu-nodes-tainted", "GPU node groups are tainted nvidia.com/gpu=true:NoSchedule.", gpu_taint_problems
    ),
    _resource_policy(
        "containers-limited-and-pinned",
        "Every container has CPU/memory limits and a pinned image.",
        container_problems,
    ),
    _resource_policy(
        "no-loadbalancer-outside-ingress",
        "Only the ingress namespace exposes a LoadBalancer.",
        load_balancer_problems,
    ),
    _stack_policy("strict-mtls", "Meshed namespaces enforce STRICT mTLS.", strict_mtls_problems),
]
"""Every rule of the pack, in the order the pack reports them."""
