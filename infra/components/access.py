"""What the pipelines may do inside the cluster: the preview identity reads and dry-runs only.

``pulumi preview`` (without ``--refresh``) diffs against Pulumi's state, renders Helm releases
client-side, and asks the API server for a server-side dry run of every change to an object
the program declares (the provider applies server-side), so the diff shows what the server
would really store. The preview role (``cluster.viewerRoleArns``) gets exactly that:

- cluster-wide read without Secrets (EKS's ``AmazonEKSViewPolicy``, set on its access entry);
- read and create/update/patch/delete of exactly the kinds the program declares, named one by
  one (no wildcard, no subresource) -- RBAC cannot limit writes to dry runs, so a
  ValidatingAdmissionPolicy refuses every write of that identity that is not one;
- no Secret at all: Helm's release records, Istio's CA and TLS keys, the Elasticsearch and
  Grafana passwords stay unreadable (the one managed Secret's preview is client-side);
- escalate/bind on its own role only, which a dry run of that role and its binding needs;
- read only of the admission policy objects: a policy does not guard its own kind, so the
  identity can never lift its guard.
"""

from __future__ import annotations

import pulumi
import pulumi_kubernetes as k8s

from infra.components import k8s as kube

PREVIEW_GROUP = "dualtrack:preview"
ROLE = "dualtrack-preview-dry-run"
"""The Kubernetes group the preview role's EKS access entry maps to (cluster.py)."""
DECLARED = {
    "": ("namespaces", "configmaps", "services", "serviceaccounts"),
    "apps": ("deployments",),
    "batch": ("jobs",),
    "policy": ("poddisruptionbudgets",),
    "autoscaling": ("horizontalpodautoscalers",),
    "networking.k8s.io": ("networkpolicies",),
    "scheduling.k8s.io": ("priorityclasses",),
    "storage.k8s.io": ("storageclasses",),
    "rbac.authorization.k8s.io": ("clusterroles", "clusterrolebindings"),
    "monitoring.coreos.com": ("servicemonitors", "prometheusrules"),
    "networking.istio.io": ("gateways", "virtualservices", "destinationrules"),
    "security.istio.io": ("authorizationpolicies", "requestauthentications", "peerauthentications"),
    "elasticsearch.k8s.elastic.co": ("elasticsearches",),
    "kibana.k8s.elastic.co": ("kibanas",),
}
"""Every kind the program declares (Secrets apart), by API group: read and dry-run these.
Named one by one: a wildcard would also match subresources such as serviceaccounts/token,
which mints a real token even in a dry run."""
GUARD_KINDS = ("validatingadmissionpolicies", "validatingadmissionpolicybindings")
"""Read only: a policy does not guard its own kind, so these stay out of the write rights."""
WRITE_VERBS = ["create", "update", "patch", "delete"]
READ_VERBS = ["get", "list", "watch"]
DRY_RUN_ONLY = "request.dryRun == true"
IS_PREVIEW = f"'{PREVIEW_GROUP}' in request.userInfo.groups"


class PipelineAccess(pulumi.ComponentResource):
    """RBAC and the dry-run guard for the preview identity."""

    def __init__(self, name: str, opts: pulumi.ResourceOptions | None = None) -> None:
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
            metadata={"name": ROLE, "labels": kube.MANAGED_BY},
            rules=[
                *(
                    {"apiGroups": [group], "resources": list(kinds), "verbs": READ_VERBS + WRITE_VERBS}
                    for group, kinds in DECLARED.items()
                ),
                # a dry run of this role and its binding is checked for escalation against RBAC
                # alone; named, so nothing else can be bound even if the guard went missing
                {
                    "apiGroups": ["rbac.authorization.k8s.io"],
                    "resources": ["clusterroles"],
                    "resourceNames": [ROLE],
                    "verbs": ["escalate", "bind"],
                },
                {
                    "apiGroups": ["admissionregistration.k8s.io"],
                    "resources": list(GUARD_KINDS),
                    "verbs": READ_VERBS,
                },
            ],
            opts=guarded,
        )
        k8s.rbac.v1.ClusterRoleBinding(
            f"{name}-preview-dry-run",
            metadata={"name": ROLE, "labels": kube.MANAGED_BY},
            role_ref={
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": ROLE,
            },
            subjects=subjects,
            opts=pulumi.ResourceOptions(parent=self, depends_on=[dry_run]),
        )
        self.register_outputs({})
