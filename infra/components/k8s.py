"""Small builders shared by the Kubernetes-side components.

Kept here so every workload gets the same labels, the same hardened container
defaults and pinned Helm releases, and the policy pack's rules (limits, pinned
images) hold by construction rather than by memory.
"""

from __future__ import annotations

from typing import Any

import pulumi
import pulumi_kubernetes as k8s

MANAGED_BY = {"app.kubernetes.io/part-of": "dualtrack", "app.kubernetes.io/managed-by": "pulumi"}
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Equal", "value": "true", "effect": "NoSchedule"}
"""Kubernetes spelling of the GPU node taint set on the node groups (cluster.GPU_TAINT)."""


def labels(app: str, **extra: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": app, **MANAGED_BY, **extra}


def resources(
    cpu: str,
    memory: str,
    *,
    cpu_limit: str | None = None,
    memory_limit: str | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Requests and limits; memory limit defaults to the request (no overcommit surprises)."""
    return {
        "requests": {"cpu": cpu, "memory": memory, **(extra or {})},
        "limits": {"cpu": cpu_limit or cpu, "memory": memory_limit or memory, **(extra or {})},
    }


APP_UID = 10001
"""Every container runs as this UID: high, so it maps to no user on the node."""


def pod_security(**extra: Any) -> dict[str, Any]:
    """Pod-level: volumes writable by the app group, default seccomp."""
    return {"fsGroup": APP_UID, "seccompProfile": {"type": "RuntimeDefault"}, **extra}


def security_context(*, run_as_user: int | None = APP_UID, read_only_root: bool = True) -> dict[str, Any]:
    """Non-root, no privilege escalation, no capabilities, default seccomp."""
    ctx: dict[str, Any] = {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": read_only_root,
        "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    if run_as_user is not None:
        ctx["runAsUser"] = run_as_user
        ctx["runAsGroup"] = run_as_user
    return ctx


def namespace(
    name: str, resource_name: str, *, istio: bool = False, opts: pulumi.ResourceOptions
) -> k8s.core.v1.Namespace:
    """A namespace with Pod Security admission labels (and sidecar injection where meshed)."""
    ns_labels = {
        **MANAGED_BY,
        "pod-security.kubernetes.io/audit": "restricted",
        "pod-security.kubernetes.io/warn": "restricted",
    }
    if istio:
        ns_labels["istio-injection"] = "enabled"
    return k8s.core.v1.Namespace(resource_name, metadata={"name": name, "labels": ns_labels}, opts=opts)


def custom_resource(
    resource_name: str,
    api_version: str,
    kind: str,
    name: str,
    namespace: str,
    spec: dict[str, Any],
    opts: pulumi.ResourceOptions,
) -> k8s.apiextensions.CustomResource:
    """A namespaced custom resource (Istio, prometheus-operator, ECK) with the common labels."""
    return k8s.apiextensions.CustomResource(
        resource_name,
        api_version=api_version,
        kind=kind,
        metadata={"name": name, "namespace": namespace, "labels": MANAGED_BY},
        spec=spec,
        opts=opts,
    )


def network_policy(
    resource_name: str,
    name: str,
    namespace: str,
    pod_labels: dict[str, str],
    ingress: list[dict[str, Any]],
    opts: pulumi.ResourceOptions,
) -> k8s.networking.v1.NetworkPolicy:
    """Ingress allow-list for the selected pods (``ingress=[]`` admits nothing)."""
    return k8s.networking.v1.NetworkPolicy(
        resource_name,
        metadata={"name": name, "namespace": namespace, "labels": MANAGED_BY},
        spec={
            "podSelector": {"matchLabels": pod_labels} if pod_labels else {},
            "policyTypes": ["Ingress"],
            "ingress": ingress,
        },
        opts=opts,
    )


def from_namespace(namespace: str, *ports: int) -> dict[str, Any]:
    """One ingress rule: pods of ``namespace`` may reach ``ports``."""
    return {
        "from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}}}],
        "ports": [{"protocol": "TCP", "port": p} for p in ports],
    }


ISTIO_CHARTS = "https://istio-release.storage.googleapis.com/charts"
PROMETHEUS_CHARTS = "https://prometheus-community.github.io/helm-charts"
CHART_REPOSITORIES = {
    "base": ISTIO_CHARTS,
    "istiod": ISTIO_CHARTS,
    "gateway": ISTIO_CHARTS,
    "kube-prometheus-stack": PROMETHEUS_CHARTS,
    "prometheus-adapter": PROMETHEUS_CHARTS,
    "nvidia-device-plugin": "https://nvidia.github.io/k8s-device-plugin",
    "dcgm-exporter": "https://nvidia.github.io/dcgm-exporter/helm-charts",
    "cluster-autoscaler": "https://kubernetes.github.io/autoscaler",
    "eck-operator": "https://helm.elastic.co",
    "fluent-bit": "https://fluent.github.io/helm-charts",
}
"""Where each chart comes from (versions are stack settings: dualtrack:charts / mesh.istioVersion)."""


def release(
    resource_name: str,
    *,
    chart: str,
    version: str,
    namespace: str,
    values: dict[str, Any],
    opts: pulumi.ResourceOptions,
    name: str | None = None,
    timeout_s: int = 900,
) -> k8s.helm.v3.Release:
    """A Helm release pinned to a chart version; atomic so a failed upgrade rolls back."""
    return k8s.helm.v3.Release(
        resource_name,
        name=name or resource_name,
        chart=chart,
        version=version,
        repository_opts=k8s.helm.v3.RepositoryOptsArgs(repo=CHART_REPOSITORIES[chart]),
        namespace=namespace,
        values=values,
        atomic=True,
        cleanup_on_fail=True,
        timeout=timeout_s,
        opts=opts,
    )
