"""Prometheus, Grafana and the Triton/GPU signals the HPA and the on-call rely on.

The recording rules define the scaling signal once -- requests waiting inside the
TensorRT-LLM executor -- prometheus-adapter serves it to the HPA as a per-pod metric,
and the dashboards show the same series.
Dashboards are JSON files in ``infra/dashboards/`` (edit them in Grafana,
export, commit), loaded by Grafana's sidecar from labelled ConfigMaps.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pulumi
import pulumi_kubernetes as k8s

from infra.components import k8s as kube
from infra.components.gpu import GPU_NODE_SELECTOR
from infra.components.serving import APP, WAITING_METRIC, Serving
from infra.config import StackSettings

NAMESPACE = "monitoring"
RELEASE = "kube-prometheus-stack"
PROMETHEUS_URL = f"http://{RELEASE}-prometheus.{NAMESPACE}.svc"
DASHBOARDS = Path(__file__).resolve().parent.parent / "dashboards"
STORAGE_CLASS = "gp3-encrypted"
BY_POD = "namespace, pod, model"
GPU_MEMORY_USED = "DCGM_FI_DEV_FB_USED / (DCGM_FI_DEV_FB_USED + DCGM_FI_DEV_FB_FREE)"

WAITING_SERIES = 'nv_trt_llm_request_metrics{request_type="waiting"}'
"""What the served models export: the scaling rule's only input."""
RECORDING_RULES = {
    "triton:queue_duration_us:rate5m": f"sum by ({BY_POD}) (rate(nv_inference_queue_duration_us[5m]))",
    "triton:compute_infer_duration_us:rate5m": (
        f"sum by ({BY_POD}) (rate(nv_inference_compute_infer_duration_us[5m]))"
    ),
    "triton:request_duration_us:avg5m": (
        f"sum by ({BY_POD}) (rate(nv_inference_request_duration_us[5m]))"
        f" / clamp_min(sum by ({BY_POD}) (rate(nv_inference_request_success[5m])), 1e-9)"
    ),
    "triton:requests:rate5m": f"sum by ({BY_POD}) (rate(nv_inference_request_success[5m]))",
    "triton:failures:rate5m": f"sum by ({BY_POD}) (rate(nv_inference_request_failure[5m]))",
    # The autoscaling signal: requests waiting inside the TensorRT-LLM executor (both serving
    # paths export this gauge: the C++ backend, and the LLM-API model of model_repo/llmapi).
    "triton:requests_waiting": f"sum by (namespace, pod) ({WAITING_SERIES})",
    "triton:kv_cache_utilization": (
        'max by (namespace, pod) (nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="fraction"})'
    ),
    # For non-decoupled models Triton's own queue still tells: time waiting per unit computing.
    "triton:queue_compute_ratio": (
        "sum by (namespace, pod) (rate(nv_inference_queue_duration_us[5m]))"
        " / clamp_min(sum by (namespace, pod) (rate(nv_inference_compute_infer_duration_us[5m])), 1)"
    ),
}


def alert_rules(settings: StackSettings) -> list[dict[str, Any]]:
    obs, ns = settings.observability, settings.serving.namespace
    up = f'up{{namespace="{ns}", service="{APP}"}}'
    return [
        {
            "alert": "TritonDown",
            "expr": f"sum({up}) == 0 or absent({up})",
            "for": "5m",
            "labels": {"severity": "critical"},
            "annotations": {
                "summary": "No Triton replica is being scraped in namespace " + ns,
                "runbook_url": "docs/operations.md#triton-down",
            },
        },
        {
            "alert": "TritonQueueRatioHigh",
            "expr": f"max by (namespace, pod) (triton:queue_compute_ratio) > {obs.queue_ratio_alert}",
            "for": "10m",
            "labels": {"severity": "warning"},
            "annotations": {
                "summary": "Requests wait longer than they compute on {{ $labels.pod }}; "
                "for a decoupled model requests wait in the executor instead (triton:requests_waiting)",
                "runbook_url": "docs/operations.md#queue-ratio-high",
            },
        },
        {
            "alert": "TritonRequestFailures",
            "expr": (
                "sum by (namespace, model) (triton:failures:rate5m)"
                " > 0.05 * sum by (namespace, model) (triton:requests:rate5m)"
            ),
            "for": "10m",
            "labels": {"severity": "warning"},
            "annotations": {"summary": "More than 5% of {{ $labels.model }} requests fail"},
        },
        {
            "alert": "GpuMemoryNearlyFull",
            "expr": f"{GPU_MEMORY_USED} > {obs.gpu_memory_alert_fraction}",
            "for": "10m",
            "labels": {"severity": "warning"},
            "annotations": {
                "summary": "GPU {{ $labels.gpu }} on {{ $labels.Hostname }} above "
                f"{obs.gpu_memory_alert_fraction:.0%} memory"
            },
        },
        {
            "alert": "GpuTemperatureHigh",
            "expr": f"DCGM_FI_DEV_GPU_TEMP > {obs.gpu_temperature_alert_c}",
            "for": "5m",
            "labels": {"severity": "critical"},
            "annotations": {
                "summary": "GPU {{ $labels.gpu }} on {{ $labels.Hostname }} above "
                f"{obs.gpu_temperature_alert_c} C"
            },
        },
    ]


class Observability(pulumi.ComponentResource):
    """kube-prometheus-stack, prometheus-adapter, Triton scrape config, rules and dashboards."""

    storage_class: str

    def __init__(
        self,
        name: str,
        settings: StackSettings,
        serving: Serving,
        grafana_password: pulumi.Input[str],
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        super().__init__("dualtrack:cloud:Observability", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        obs = settings.observability
        system = {"dualtrack.io/pool": "system"}

        storage = k8s.storage.v1.StorageClass(
            f"{name}-gp3",
            metadata={"name": STORAGE_CLASS, "labels": kube.MANAGED_BY},
            provisioner="ebs.csi.aws.com",
            parameters={"type": "gp3", "encrypted": "true"},
            reclaim_policy="Retain",
            volume_binding_mode="WaitForFirstConsumer",
            allow_volume_expansion=True,
            opts=child,
        )
        self.storage_class = STORAGE_CLASS
        ns = kube.namespace(NAMESPACE, f"{name}-ns", opts=child)
        in_ns = pulumi.ResourceOptions(parent=self, depends_on=[ns])
        admin = k8s.core.v1.Secret(
            f"{name}-grafana-admin",
            metadata={"name": "grafana-admin", "namespace": NAMESPACE, "labels": kube.MANAGED_BY},
            string_data={"admin-user": "admin", "admin-password": grafana_password},
            opts=in_ns,
        )
        stack = kube.release(
            f"{name}-kube-prometheus-stack",
            name=RELEASE,
            chart="kube-prometheus-stack",
            version=settings.charts.kube_prometheus_stack,
            namespace=NAMESPACE,
            values={
                "prometheus": {
                    "prometheusSpec": {
                        "retention": obs.retention,
                        "nodeSelector": system,
                        # Pick up every ServiceMonitor/PodMonitor/PrometheusRule, not only the chart's own.
                        "serviceMonitorSelectorNilUsesHelmValues": False,
                        "podMonitorSelectorNilUsesHelmValues": False,
                        "ruleSelectorNilUsesHelmValues": False,
                        "storageSpec": {
                            "volumeClaimTemplate": {
                                "spec": {
                                    "storageClassName": STORAGE_CLASS,
                                    "accessModes": ["ReadWriteOnce"],
                                    "resources": {"requests": {"storage": f"{obs.prometheus_storage_gib}Gi"}},
                                }
                            }
                        },
                    }
                },
                "alertmanager": {"alertmanagerSpec": {"nodeSelector": system}},
                "grafana": {
                    "admin": {
                        "existingSecret": "grafana-admin",
                        "userKey": "admin-user",
                        "passwordKey": "admin-password",
                    },
                    "nodeSelector": system,
                    "sidecar": {
                        "dashboards": {
                            "enabled": True,
                            "label": "grafana_dashboard",
                            "labelValue": "1",
                            "searchNamespace": "ALL",
                        }
                    },
                },
                "prometheusOperator": {"nodeSelector": system},
            },
            opts=pulumi.ResourceOptions(parent=self, depends_on=[admin, storage]),
        )
        kube.release(
            f"{name}-prometheus-adapter",
            name="prometheus-adapter",
            chart="prometheus-adapter",
            version=settings.charts.prometheus_adapter,
            namespace=NAMESPACE,
            values={
                "prometheus": {"url": PROMETHEUS_URL, "port": 9090},
                "nodeSelector": system,
                "rules": {
                    "default": False,
                    "custom": [
                        {
                            "seriesQuery": 'triton:requests_waiting{namespace!="",pod!=""}',
                            "resources": {
                                "overrides": {
                                    "namespace": {"resource": "namespace"},
                                    "pod": {"resource": "pod"},
                                }
                            },
                            "name": {"matches": "^triton:requests_waiting$", "as": WAITING_METRIC},
                            "metricsQuery": "max(<<.Series>>{<<.LabelMatchers>>}) by (<<.GroupBy>>)",
                        }
                    ],
                },
            },
            opts=pulumi.ResourceOptions(parent=self, depends_on=[stack]),
        )
        self.prometheus_operator = stack
        """The release that installs the prometheus-operator CRDs: charts that create a
        ServiceMonitor/PodMonitor/PrometheusRule are installed after it."""
        kube.release(
            f"{name}-dcgm-exporter",
            name="dcgm-exporter",
            chart="dcgm-exporter",
            version=settings.charts.dcgm_exporter,
            namespace="kube-system",
            values={
                "nodeSelector": GPU_NODE_SELECTOR,
                "tolerations": [kube.GPU_TOLERATION],
                "serviceMonitor": {"enabled": True, "additionalLabels": {"release": RELEASE}},
                "resources": kube.resources("100m", "256Mi", cpu_limit="500m", memory_limit="512Mi"),
            },
            # the release it is under GpuPlatform("gpu"), where stacks created it first
            opts=pulumi.ResourceOptions(
                parent=self,
                depends_on=[stack],
                aliases=[
                    pulumi.Alias(
                        name="gpu-dcgm-exporter",
                        parent=pulumi.create_urn("gpu", "dualtrack:cloud:GpuPlatform"),
                    )
                ],
            ),
        )
        crd_opts = pulumi.ResourceOptions(parent=self, depends_on=[stack, serving.namespace_resource])
        kube.custom_resource(
            f"{name}-triton-servicemonitor",
            "monitoring.coreos.com/v1",
            "ServiceMonitor",
            APP,
            serving.namespace,
            spec={
                "selector": {"matchLabels": {"app.kubernetes.io/name": APP}},
                "namespaceSelector": {"matchNames": [serving.namespace]},
                "endpoints": [{"port": "http-metrics", "path": "/metrics", "interval": "15s"}],
            },
            opts=crd_opts,
        )
        kube.custom_resource(
            f"{name}-triton-rules",
            "monitoring.coreos.com/v1",
            "PrometheusRule",
            "triton",
            NAMESPACE,
            spec={
                "groups": [
                    {
                        "name": "triton.recording",
                        "interval": "30s",
                        "rules": [{"record": k, "expr": v} for k, v in RECORDING_RULES.items()],
                    },
                    {"name": "triton.alerts", "rules": alert_rules(settings)},
                ]
            },
            opts=crd_opts,
        )
        for path in sorted(DASHBOARDS.glob("*.json")):
            k8s.core.v1.ConfigMap(
                f"{name}-dashboard-{path.stem}",
                metadata={
                    "name": f"dashboard-{path.stem}",
                    "namespace": NAMESPACE,
                    "labels": {**kube.MANAGED_BY, "grafana_dashboard": "1"},
                },
                data={
                    path.name: json.dumps(
                        json.loads(path.read_text(encoding="utf-8")), indent=1, sort_keys=True
                    )
                },
                opts=in_ns,
            )
        self.register_outputs({})
