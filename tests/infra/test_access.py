"""The pipelines' rights in the cluster: the preview identity reads and dry-runs, nothing more."""

from __future__ import annotations

import celpy
import pytest

from dualtrack.plan import STACKS, Plan
from infra.components.access import DRY_RUN_ONLY, IS_PREVIEW, PREVIEW_GROUP


def _k8s(plan: Plan, kind: str, name: str) -> dict:
    (found,) = [o for o in plan.kubernetes_objects() if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def _cel(expression: str, request: dict) -> bool:
    """Evaluate a policy expression the way the API server's CEL does, on one admission request."""
    env = celpy.Environment()
    return bool(env.program(env.compile(expression)).evaluate({"request": celpy.json_to_cel(request)}))


@pytest.mark.parametrize(
    "groups, dry_run, admitted",
    [
        ([PREVIEW_GROUP, "system:authenticated"], True, True),  # pulumi preview's server-side dry run
        ([PREVIEW_GROUP, "system:authenticated"], False, False),  # a real write by the preview role
        (["system:masters"], False, True),  # the deploy role is not matched at all
    ],
)
def test_the_guard_admits_only_dry_runs_of_the_preview_identity(
    plans: dict[str, Plan], groups: list[str], dry_run: bool, admitted: bool
) -> None:
    policy = _k8s(plans["prod"], "ValidatingAdmissionPolicy", "dualtrack-preview-dry-run-only")["spec"]
    binding = _k8s(plans["prod"], "ValidatingAdmissionPolicyBinding", "dualtrack-preview-dry-run-only")[
        "spec"
    ]
    assert binding == {"policyName": "dualtrack-preview-dry-run-only", "validationActions": ["Deny"]}
    assert policy["failurePolicy"] == "Fail"  # a broken policy refuses rather than admits
    ((condition,), (validation,)) = policy["matchConditions"], policy["validations"]
    assert (condition["expression"], validation["expression"]) == (IS_PREVIEW, DRY_RUN_ONLY)
    request = {"dryRun": dry_run, "userInfo": {"username": "ci", "groups": groups}}
    matched = _cel(condition["expression"], request)
    assert (not matched or _cel(validation["expression"], request)) is admitted


def _plural(kind: str) -> str:
    word = kind.lower()
    if word.endswith("y") and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + ("es" if word.endswith(("s", "sh", "ch", "x")) else "s")


@pytest.mark.parametrize("stack", STACKS)
def test_preview_rights_are_exactly_what_a_preview_needs(plans: dict[str, Plan], stack: str) -> None:
    plan = plans[stack]
    rules = _k8s(plan, "ClusterRole", "dualtrack-preview-dry-run")["rules"]
    assert all("*" not in r["apiGroups"] + r["resources"] + r["verbs"] for r in rules)
    assert not any(
        "/" in res for r in rules for res in r["resources"]
    )  # no subresource (serviceaccounts/token)
    granted = {
        (g, res) for r in rules if "create" in r["verbs"] for g in r["apiGroups"] for res in r["resources"]
    }
    declared = {
        (o["apiVersion"].rpartition("/")[0], _plural(o["kind"]))
        for o in plan.kubernetes_objects()
        if o["kind"] != "Secret"
    }
    guard = {
        ("admissionregistration.k8s.io", k)
        for k in ("validatingadmissionpolicies", "validatingadmissionpolicybindings")
    }
    assert granted == declared - guard  # exactly what the program declares, never its own guard
    read_only = {
        (g, res)
        for r in rules
        if r["verbs"] == ["get", "list", "watch"]
        for g in r["apiGroups"]
        for res in r["resources"]
    }
    assert read_only == guard
    # no Secret at all (Helm's release records, Istio's keys, passwords): a preview does not read them
    assert not any("secrets" in r["resources"] for r in rules)
    assert not any(o["kind"] == "RoleBinding" for o in plan.kubernetes_objects())
    # escalate/bind only for its own role (a dry run of it and its binding needs them)
    (escalate,) = [r for r in rules if "escalate" in r["verbs"]]
    assert escalate == {
        "apiGroups": ["rbac.authorization.k8s.io"],
        "resources": ["clusterroles"],
        "resourceNames": ["dualtrack-preview-dry-run"],
        "verbs": ["escalate", "bind"],
    }
    subjects = _k8s(plan, "ClusterRoleBinding", "dualtrack-preview-dry-run")["subjects"]
    assert subjects == [{"kind": "Group", "name": PREVIEW_GROUP, "apiGroup": "rbac.authorization.k8s.io"}]
    # the write rights exist only once the guard is bound
    guarded = next(
        r for r in plan.resources if r.name == "access-preview-dry-run" and r.type.endswith("ClusterRole")
    )
    bound = next(r for r in plan.resources if r.type.endswith("ValidatingAdmissionPolicyBinding"))
    assert bound.urn in guarded.depends_on


def test_preview_role_maps_to_the_group(stack_config) -> None:
    from dualtrack.plan import run_program

    config = stack_config("dev")
    config["dualtrack:cluster"]["viewerRoleArns"] = ["arn:aws:iam::111122223333:role/ci-preview"]
    plan = run_program("dev", config)
    (entry,) = plan.of_type("aws:eks/accessEntry:AccessEntry")
    assert entry.inputs["kubernetesGroups"] == [PREVIEW_GROUP]
    (association,) = plan.of_type("aws:eks/accessPolicyAssociation:AccessPolicyAssociation")
    assert association.inputs["policyArn"].endswith("/AmazonEKSViewPolicy")
