"""What the pipelines may do inside the cluster: the preview identity reads and dry-runs only.

``pulumi preview`` against a cluster reads every object the program manages, the Secrets it
manages and the Helm release records (Secrets in each release's namespace), and asks the API
server for a server-side dry run of every change (the provider applies server-side). The
preview role (``cluster.viewerRoleArns``) gets exactly that:

- cluster-wide read without Secrets (EKS's ``AmazonEKSViewPolicy``, set on its access entry),
  plus read of what that policy leaves out and the program manages: custom resources, RBAC,
  admission policies, CRDs;
- read of Secrets in the namespaces that hold Helm releases or program-managed Secrets;
- create/update/patch/delete on the API groups the program writes -- which RBAC cannot limit
  to dry runs, so a ValidatingAdmissionPolicy refuses every write of that identity that is
  not one. The admission objects themselves are outside its rights (a policy does not guard
  its own kind), so the identity can never lift its guard.
"""

from __future__ import annotations

import pulumi
import pulumi_kubernetes as k8s

from infra.components import k8s as kube

PREVIEW_GROUP = "dualtrack:preview"
"""The Kubernetes group the preview role's EKS access entry maps to (cluster.py)."""
WRITTEN_API_GROUPS = (
    "",
    "apps",
    "batch",
    "policy",
    "autoscaling",
    "networking.k8s.io",
    "scheduling.k8s.io",
    "storage.k8s.io",
    "rbac.authorization.k8s.io",
    "apiextensions.k8s.io",
    "monitoring.coreos.com",
    "networking.istio.io",
    "security.istio.io",
    "elasticsearch.k8s.elastic.co",
    "kibana.k8s.elastic.co",
)
"""Every API group whose objects the program or its charts create (dry-run rights only)."""
WRITE_VERBS = ["create", "update", "patch", "delete"]
READ_VERBS = ["get", "list", "watch"]
READ_BEYOND_VIEW = (
    "rbac.authorization.k8s.io",
    "admissionregistration.k8s.io",
    "apiextensions.k8s.io",
    "monitoring.coreos.com",
    "networking.istio.io",
    "security.istio.io",
    "elasticsearch.k8s.elastic.co",
    "kibana.k8s.elastic.co",
)
"""Groups the program manages that Kubernetes' ``view`` role does not read."""
DRY_RUN_ONLY = "request.dryRun == true"
IS_PREVIEW = f"'{PREVIEW_GROUP}' in request.userInfo.groups"


class PipelineAccess(pulumi.ComponentResource):
    """RBAC and the dry-run guard for the preview identity."""

    def __init__(
        self,
        name: str,
        secret_namespaces: dict[str, k8s.core.v1.Namespace],
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        """``secret_namespaces``: where Helm keeps release records or the program keeps Secrets
        (kube-system, which always exists, is added)."""
        super().__init__("dualtrack:cloud:PipelineAccess", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        subjects = [{"kind": "Group", "name": PREVIEW_GROUP, "apiGroup": "rbac.authorization.k8s.io"}]
        guard = k8s.admissionregistration.v1.ValidatingAdmissionPolicy(
            f"{name}-dry-run-only",
            metadata={"name": "dualtrack-preview-dry-run-only", "labels": kube.MANAGED_BY},
            spec={
                "failurePolicy": "Fail",
                "matchConstraints": {
                    "resourceRules": [
                        {
                            "apiGroups": ["*"],
                            "apiVersions": ["*"],
                            "operations": ["CREATE", "UPDATE", "DELETE", "CONNECT"],
                            "resources": ["*", "*/*"],
                        }
                    ]
                },
                "matchConditions": [{"name": "preview-identity", "expression": IS_PREVIEW}],
                "validations": [
                    {
                        "expression": DRY_RUN_ONLY,
                        "message": "the preview identity may only dry-run (pulumi preview); "
                        "changes are made by the deploy role",
                        "reason": "Forbidden",
                    }
                ],
            },
            opts=child,
        )
        binding = k8s.admissionregistration.v1.ValidatingAdmissionPolicyBinding(
            f"{name}-dry-run-only",
            metadata={"name": "dualtrack-preview-dry-run-only", "labels": kube.MANAGED_BY},
            spec={"policyName": "dualtrack-preview-dry-run-only", "validationActions": ["Deny"]},
            opts=pulumi.ResourceOptions(parent=self, depends_on=[guard]),
        )
        # The write rights exist only once the guard is bound.
        guarded = pulumi.ResourceOptions(parent=self, depends_on=[binding])
        dry_run = k8s.rbac.v1.ClusterRole(
            f"{name}-preview-dry-run",
            metadata={"name": "dualtrack-preview-dry-run", "labels": kube.MANAGED_BY},
            rules=[
                {"apiGroups": list(READ_BEYOND_VIEW), "resources": ["*"], "verbs": READ_VERBS},
                {"apiGroups": list(WRITTEN_API_GROUPS), "resources": ["*"], "verbs": WRITE_VERBS},
            ],
            opts=guarded,
        )
        k8s.rbac.v1.ClusterRoleBinding(
            f"{name}-preview-dry-run",
            metadata={"name": "dualtrack-preview-dry-run", "labels": kube.MANAGED_BY},
            role_ref={
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "dualtrack-preview-dry-run",
            },
            subjects=subjects,
            opts=pulumi.ResourceOptions(parent=self, depends_on=[dry_run]),
        )
        secrets = k8s.rbac.v1.ClusterRole(
            f"{name}-preview-secrets",
            metadata={"name": "dualtrack-preview-secrets", "labels": kube.MANAGED_BY},
            rules=[{"apiGroups": [""], "resources": ["secrets"], "verbs": READ_VERBS}],
            opts=child,
        )
        for namespace, created in {"kube-system": None, **secret_namespaces}.items():
            k8s.rbac.v1.RoleBinding(
                f"{name}-preview-secrets-{namespace}",
                metadata={
                    "name": "dualtrack-preview-secrets",
                    "namespace": namespace,
                    "labels": kube.MANAGED_BY,
                },
                role_ref={
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "ClusterRole",
                    "name": "dualtrack-preview-secrets",
                },
                subjects=subjects,
                opts=pulumi.ResourceOptions(
                    parent=self, depends_on=[secrets, *([created] if created else [])]
                ),
            )
        self.register_outputs({})
