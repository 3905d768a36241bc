"""The policy pack, fed the resources captured from the mocked program -- and broken variants."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from pulumi_policy import (
    PolicyCustomTimeouts,
    PolicyResource,
    PolicyResourceOptions,
    ResourceValidationArgs,
    ResourceValidationPolicy,
    StackValidationArgs,
)

from dualtrack.plan import STACKS, Plan, PlannedResource
from infra.policy.rules import POLICIES, image_is_pinned


def _opts(parent: str | None) -> PolicyResourceOptions:
    return PolicyResourceOptions(False, [], None, [], PolicyCustomTimeouts(0, 0, 0), [], parent)


def violations(resources: list[PlannedResource]) -> dict[str, list[str]]:
    """Run every policy of the pack the way the engine does; ``{policy: [messages]}``."""
    found: dict[str, list[str]] = {}

    def reporter(name: str) -> Any:
        return lambda message, urn=None: found.setdefault(name, []).append(message)

    stack = [
        PolicyResource(r.type, r.inputs, r.urn, r.name, _opts(r.parent), None, None, [], {})
        for r in resources
    ]
    for policy in POLICIES:
        if isinstance(policy, ResourceValidationPolicy):
            for r in resources:
                policy.validate(
                    ResourceValidationArgs(r.type, r.inputs, r.urn, r.name, _opts(r.parent), None),
                    reporter(policy.name),
                )
        else:
            policy.validate(StackValidationArgs(stack), reporter(policy.name))
    return found


def _mutate(plan: Plan, type_: str, change: Any, name: str | None = None) -> list[PlannedResource]:
    """A copy of the plan's resources with ``change(inputs)`` applied to the first match."""
    resources = [copy.deepcopy(r) for r in plan.resources]
    target = next(r for r in resources if r.type == type_ and (name is None or r.name == name))
    change(target.inputs)
    return resources


def _drop(plan: Plan, type_: str) -> list[PlannedResource]:
    return [r for r in plan.resources if r.type != type_]


@pytest.mark.parametrize("stack", STACKS)
def test_every_stack_passes_the_pack(plans: dict[str, Plan], stack: str) -> None:
    assert violations(plans[stack].resources) == {}


def test_pack_has_the_required_rules() -> None:
    assert {p.name for p in POLICIES} >= {
        "s3-no-public-acl",
        "s3-public-access-blocked",
        "imdsv2-required",
        "eks-secrets-encrypted",
        "gpu-nodes-tainted",
        "containers-limited-and-pinned",
        "strict-mtls",
        "no-loadbalancer-outside-ingress",
    }


BAD_VARIANTS = {
    "public bucket ACL": (
        "aws:s3/bucket:Bucket",
        lambda i: i.update(acl="public-read"),
        None,
        "s3-no-public-acl",
    ),
    "public access block off": (
        "aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock",
        lambda i: i.update(blockPublicPolicy=False),
        None,
        "s3-no-public-acl",
    ),
    "IMDSv1 allowed": (
        "aws:ec2/launchTemplate:LaunchTemplate",
        lambda i: i["metadataOptions"].update(httpTokens="optional"),
        "cluster-gpu",
        "imdsv2-required",
    ),
    "node group without launch template": (
        "aws:eks/nodeGroup:NodeGroup",
        lambda i: i.pop("launchTemplate"),
        "cluster-system",
        "node-groups-use-launch-templates",
    ),
    "EKS secrets not encrypted": (
        "aws:eks/cluster:Cluster",
        lambda i: i.pop("encryptionConfig"),
        None,
        "eks-secrets-encrypted",
    ),
    "GPU nodes untainted": (
        "aws:eks/nodeGroup:NodeGroup",
        lambda i: i.pop("taints"),
        "cluster-gpu",
        "gpu-nodes-tainted",
    ),
    "container without limits": (
        "kubernetes:apps/v1:Deployment",
        lambda i: i["spec"]["template"]["spec"]["containers"][0]["resources"].pop("limits"),
        None,
        "containers-limited-and-pinned",
    ),
    "image latest": (
        "kubernetes:apps/v1:Deployment",
        lambda i: i["spec"]["template"]["spec"]["initContainers"][0].update(image="amazon/aws-cli:latest"),
        None,
        "containers-limited-and-pinned",
    ),
    "untagged image in a job": (
        "kubernetes:batch/v1:Job",
        lambda i: i["spec"]["template"]["spec"]["containers"][0].update(image="curlimages/curl"),
        None,
        "containers-limited-and-pinned",
    ),
    "LoadBalancer in serving": (
        "kubernetes:core/v1:Service",
        lambda i: i["spec"].update(type="LoadBalancer"),
        "serving-svc",
        "no-loadbalancer-outside-ingress",
    ),
    "chart LoadBalancer outside ingress": (
        "kubernetes:helm.sh/v3:Release",
        lambda i: i.update(namespace="monitoring"),
        "mesh-gateway",
        "no-loadbalancer-outside-ingress",
    ),
    "mTLS permissive": (
        "kubernetes:security.istio.io/v1:PeerAuthentication",
        lambda i: i["spec"]["mtls"].update(mode="PERMISSIVE"),
        "mesh-mtls-namespace",
        "strict-mtls",
    ),
}


@pytest.mark.parametrize("case", list(BAD_VARIANTS))
def test_bad_variant_is_refused(plans: dict[str, Plan], case: str) -> None:
    type_, change, name, policy = BAD_VARIANTS[case]
    found = violations(_mutate(plans["dev"], type_, change, name))
    assert list(found) == [policy], found
    assert found[policy][0]  # a message the operator can act on


def test_missing_public_access_block_is_refused(plans: dict[str, Plan]) -> None:
    found = violations(_drop(plans["dev"], "aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock"))
    assert found == {"s3-public-access-blocked": ["bucket 'serving-models' has no BucketPublicAccessBlock"]}


def test_missing_peer_authentication_is_refused(plans: dict[str, Plan]) -> None:
    found = violations(_drop(plans["dev"], "kubernetes:security.istio.io/v1:PeerAuthentication"))
    assert found == {"strict-mtls": ["namespace 'serving' has no namespace-wide STRICT PeerAuthentication"]}


@pytest.mark.parametrize(
    "image, pinned",
    [
        ("nvcr.io/nvidia/tritonserver:25.10-trtllm-python-py3", True),
        ("repo@sha256:" + "0" * 64, True),
        ("registry:5000/app", False),
        ("busybox:latest", False),
        ("busybox", False),
    ],
)
def test_image_pinning(image: str, pinned: bool) -> None:
    assert image_is_pinned(image) is pinned
