"""Every Kubernetes object the program declares validates against real schemas.

Core kinds: kubernetes-validate's strict OpenAPI schemas for the stack's own EKS
version (unknown fields are errors). Custom resources (Istio, prometheus-operator):
the validators generated from those projects' CRDs (npm ``@kubernetes-models/*``,
run with node). ECK's Elasticsearch/Kibana have no published schema package: they
are listed here by name so any *other* unvalidated kind fails the test.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest

from dualtrack.plan import STACKS, Plan, load_stack_config, runtime_config
from infra.config import load_settings

CRD_VALIDATOR = Path(__file__).parent / "crd_schemas"
NO_PUBLISHED_SCHEMA = {
    ("elasticsearch.k8s.elastic.co/v1", "Elasticsearch"),
    ("kibana.k8s.elastic.co/v1", "Kibana"),
}


def _is_core(obj: dict) -> bool:
    group = obj["apiVersion"].rpartition("/")[0]
    return group == "" or group.endswith(".k8s.io") or "." not in group


def _validate_crs(objects: list[dict]) -> list[dict]:
    node = shutil.which("node")
    assert node, "node is needed for the CRD schema validators (make test installs them)"
    assert (CRD_VALIDATOR / "node_modules").is_dir(), (
        "run `make install-dev` (npm ci in tests/infra/crd_schemas)"
    )
    out = subprocess.run(
        [node, str(CRD_VALIDATOR / "validate.mjs")],
        input=json.dumps(objects),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(out.stdout)


@pytest.mark.parametrize("stack", STACKS)
def test_core_objects_match_the_clusters_kubernetes_version(plans: dict[str, Plan], stack: str) -> None:
    version = load_settings(runtime_config(load_stack_config(stack))[0]).cluster.version + ".0"
    core = [o for o in plans[stack].kubernetes_objects() if _is_core(o)]
    assert len(core) >= 15
    problems = []
    for obj in core:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            problems.append(f"{obj['kind']}/{obj['metadata']['name']}: {exc.message}")
    assert problems == []


@pytest.mark.parametrize("stack", STACKS)
def test_custom_resources_match_their_crds(plans: dict[str, Plan], stack: str) -> None:
    custom = [o for o in plans[stack].kubernetes_objects() if not _is_core(o)]
    results = _validate_crs(custom)
    assert [r for r in results if r["status"] == "invalid"] == []
    unvalidated = {(r["apiVersion"], r["kind"]) for r in results if r["status"] == "no-schema"}
    assert unvalidated == NO_PUBLISHED_SCHEMA
    assert sum(r["status"] == "valid" for r in results) >= 12


def test_validators_reject_broken_objects(plans: dict[str, Plan]) -> None:
    """Both validators really check: a mistyped field fails each of them."""
    objects = plans["dev"].kubernetes_objects()
    deployment = copy.deepcopy(next(o for o in objects if o["kind"] == "Deployment"))
    deployment["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, "1.33.0", strict=True)
    deployment = copy.deepcopy(next(o for o in objects if o["kind"] == "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["gpus"] = 1  # unknown field
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, "1.33.0", strict=True)
    route = copy.deepcopy(next(o for o in objects if o["kind"] == "VirtualService"))
    route["spec"]["http"][0]["timeout"] = 600
    (result,) = _validate_crs([route])
    assert result["status"] == "invalid" and "timeout" in result["error"]
