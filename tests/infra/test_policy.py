"""The policy pack, fed the resources captured from the mocked program -- and broken variants.

The rules run in the pack's own virtualenv (``infra/policy/venv``, what ``pulumi preview
--policy-pack infra/policy`` loads) through ``infra/policy/offline.py``.
"""

from __future__ import annotations

import copy
import json
import subprocess
from typing import Any

import pytest

from dualtrack.plan import ROOT, STACKS, Plan, PlannedResource

POLICY_DIR = ROOT / "infra" / "policy"
POLICY_PYTHON = POLICY_DIR / "venv" / "bin" / "python"


def _as_json(resources: list[PlannedResource]) -> list[dict[str, Any]]:
    return [
        {"type": r.type, "name": r.name, "urn": r.urn, "parent": r.parent, "props": r.inputs}
        for r in resources
    ]


def run_pack(cases: dict[str, list[PlannedResource]]) -> dict[str, dict[str, list[str]]]:
    """``{case: {policy: [messages]}}`` from one run of the pack in its own environment."""
    assert POLICY_PYTHON.is_file(), "the policy pack's venv is missing: run `make install-dev`"
    payload = json.dumps({"cases": {name: _as_json(res) for name, res in cases.items()}})
    out = subprocess.run(
        [str(POLICY_PYTHON), str(POLICY_DIR / "offline.py")],
        input=payload,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(out.stdout)


def _mutate(plan: Plan, type_: str, change: Any, name: str | None = None) -> list[PlannedResource]:
    """A copy of the plan's resources with ``change(inputs)`` applied to the first match."""
    resources = [copy.deepcopy(r) for r in plan.resources]
    target = next(r for r in resources if r.type == type_ and (name is None or r.name == name))
    change(target.inputs)
    return resources


def _drop(plan: Plan, type_: str) -> list[PlannedResource]:
    return [r for r in plan.resources if r.type != type_]


def test_every_stack_passes_the_pack(plans: dict[str, Plan]) -> None:
    assert run_pack({stack: plans[stack].resources for stack in STACKS}) == {stack: {} for stack in STACKS}


def test_pack_has_the_required_rules() -> None:
    rules = (POLICY_DIR / "rules.py").read_text()
    for name in (
        "s3-no-public-acl",
        "s3-public-access-blocked",
        "imdsv2-required",
        "eks-secrets-encrypted",
        "gpu-nodes-tainted",
        "containers-limited-and-pinned",
        "strict-mtls",
        "no-loadbalancer-outside-ingress",
    ):
        assert f'"{name}"' in rules


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


def _image(image: str) -> Any:
    return lambda i: i["spec"]["template"]["spec"]["initContainers"][0].update(image=image)


PINNED_IMAGES = {  # image -> pinned?
    "nvcr.io/nvidia/tritonserver:25.10-trtllm-python-py3": True,
    "repo@sha256:" + "0" * 64: True,
    "registry:5000/app": False,  # a port is not a tag
    "busybox:latest": False,
    "busybox": False,
}


@pytest.fixture(scope="module")
def verdicts(plans: dict[str, Plan]) -> dict[str, dict[str, list[str]]]:
    """Every bad variant (and every image) through one run of the pack."""
    dev = plans["dev"]
    cases = {
        case: _mutate(dev, type_, change, name) for case, (type_, change, name, _) in BAD_VARIANTS.items()
    }
    cases["no public access block"] = _drop(dev, "aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock")
    cases["no peer authentication"] = _drop(dev, "kubernetes:security.istio.io/v1:PeerAuthentication")
    for image in PINNED_IMAGES:
        cases[f"image {image}"] = _mutate(dev, "kubernetes:apps/v1:Deployment", _image(image))
    return run_pack(cases)


@pytest.mark.parametrize("case", list(BAD_VARIANTS))
def test_bad_variant_is_refused(verdicts: dict, case: str) -> None:
    policy = BAD_VARIANTS[case][3]
    found = verdicts[case]
    assert list(found) == [policy], found
    assert found[policy][0]  # a message the operator can act on


def test_missing_public_access_block_is_refused(verdicts: dict) -> None:
    assert verdicts["no public access block"] == {
        "s3-public-access-blocked": ["bucket 'serving-models' has no BucketPublicAccessBlock"]
    }


def test_missing_peer_authentication_is_refused(verdicts: dict) -> None:
    assert verdicts["no peer authentication"] == {
        "strict-mtls": ["namespace 'serving' has no namespace-wide STRICT PeerAuthentication"]
    }


@pytest.mark.parametrize("image", list(PINNED_IMAGES))
def test_image_pinning(verdicts: dict, image: str) -> None:
    assert (verdicts[f"image {image}"] == {}) is PINNED_IMAGES[image]
