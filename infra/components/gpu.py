"""GPU platform: device plugin, scheduling priorities, node autoscaling.

(The DCGM exporter, whose chart creates a ServiceMonitor, lives with the monitoring stack
that installs that CRD: see observability.py.)

``inference-critical`` sits above ``batch`` (the seed's PriorityClasses) so an
engine build or a batch job is preempted before a serving replica. The cluster
autoscaler uses the priority expander: the spot GPU group first, the on-demand
fallback group only when spot capacity cannot be had.
"""

from __future__ import annotations

import json

import pulumi
import pulumi_kubernetes as k8s

from infra.components import k8s as kube
from infra.components.cluster import CAPACITY_LABEL, POOL_LABEL, Cluster
from infra.config import StackSettings

PRIORITY_CLASSES = {
    "inference-critical": (1_000_000, "Triton serving replicas: never preempted by other dualtrack work"),
    "batch": (1_000, "Engine builds, index jobs: preemptible"),
}
GPU_NODE_SELECTOR = {POOL_LABEL: "gpu"}


class GpuPlatform(pulumi.ComponentResource):
    """Cluster-wide pieces every GPU workload relies on."""

    def __init__(
        self, name: str, settings: StackSettings, cluster: Cluster, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__("dualtrack:cloud:GpuPlatform", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        charts = settings.charts

        for pc_name, (value, description) in PRIORITY_CLASSES.items():
            k8s.scheduling.v1.PriorityClass(
                f"{name}-{pc_name}",
                metadata={"name": pc_name, "labels": kube.MANAGED_BY},
                value=value,
                global_default=False,
                preemption_policy="PreemptLowerPriority",
                description=description,
                opts=child,
            )

        kube.release(
            f"{name}-device-plugin",
            name="nvidia-device-plugin",
            chart="nvidia-device-plugin",
            version=charts.nvidia_device_plugin,
            namespace="kube-system",
            values={
                "nodeSelector": GPU_NODE_SELECTOR,
                # The chart's default affinity names node-feature-discovery labels, which this
                # cluster does not run. Helm merges maps (an empty one changes nothing) but
                # replaces lists: these terms replace the default's, so the pool label decides.
                "affinity": {
                    "nodeAffinity": {
                        "requiredDuringSchedulingIgnoredDuringExecution": {
                            "nodeSelectorTerms": [
                                {
                                    "matchExpressions": [
                                        {"key": k, "operator": "In", "values": [v]}
                                        for k, v in GPU_NODE_SELECTOR.items()
                                    ]
                                }
                            ]
                        }
                    }
                },
                "tolerations": [kube.GPU_TOLERATION],
                "priorityClassName": "system-node-critical",
            },
            opts=child,
        )
        autoscaler_role = cluster.service_account_role(
            "cluster-autoscaler",
            "kube-system",
            "cluster-autoscaler",
            policy=cluster.name.apply(_autoscaler_policy),
        )
        gpu = settings.gpu_nodes
        # Matched against ASG names, which embed the node group name prefixes set in cluster.py.
        priorities = {50: [".*-gpu-spot-.*"], 10: [".*-gpu-fallback-.*"], 1: [".*"]}
        kube.release(
            f"{name}-cluster-autoscaler",
            name="cluster-autoscaler",
            chart="cluster-autoscaler",
            version=charts.cluster_autoscaler,
            namespace="kube-system",
            values={
                "cloudProvider": "aws",
                "awsRegion": settings.region,
                "autoDiscovery": {"clusterName": cluster.name},
                "rbac": {
                    "serviceAccount": {
                        "name": "cluster-autoscaler",
                        "annotations": {"eks.amazonaws.com/role-arn": autoscaler_role.arn},
                    }
                },
                "extraArgs": {
                    "expander": "priority"
                    if gpu.capacity == "spot" and gpu.on_demand_fallback
                    else "least-waste",
                    "balance-similar-node-groups": "false",
                    "skip-nodes-with-system-pods": "false",
                },
                # The autoscaler reads this as YAML with integer keys (map[int][]string): a JSON
                # object would quote them ("50") and the priority expander would refuse the config.
                "expanderPriorities": expander_priorities(priorities),
                "nodeSelector": {POOL_LABEL: "system"},
                "priorityClassName": "system-cluster-critical",
                "resources": kube.resources("100m", "300Mi", cpu_limit="500m", memory_limit="600Mi"),
            },
            opts=child,
        )
        self.register_outputs({"capacityLabel": CAPACITY_LABEL})


def expander_priorities(priorities: dict[int, list[str]]) -> str:
    """The priority expander's ConfigMap value: YAML, integer priorities as plain integer keys."""
    return "".join(
        f"{priority}:\n" + "".join(f"  - {json.dumps(pattern)}\n" for pattern in patterns)
        for priority, patterns in sorted(priorities.items(), reverse=True)
    )


def _autoscaler_policy(cluster_name: str) -> str:
    """Scale only this cluster's node groups (tag-scoped writes, read-only elsewhere)."""
    return json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Action": [
                        "autoscaling:SetDesiredCapacity",
                        "autoscaling:TerminateInstanceInAutoScalingGroup",
                    ],
                    "Resource": "*",
                    "Condition": {
                        "StringEquals": {f"aws:ResourceTag/k8s.io/cluster-autoscaler/{cluster_name}": "owned"}
                    },
                },
                {
                    "Effect": "Allow",
                    "Action": [
                        "autoscaling:DescribeAutoScalingGroups",
                        "autoscaling:DescribeAutoScalingInstances",
                        "autoscaling:DescribeLaunchConfigurations",
                        "autoscaling:DescribeScalingActivities",
                        "autoscaling:DescribeTags",
                        "ec2:DescribeImages",
                        "ec2:DescribeInstanceTypes",
                        "ec2:DescribeLaunchTemplateVersions",
                        "ec2:GetInstanceTypesFromInstanceRequirements",
                        "eks:DescribeNodegroup",
                    ],
                    "Resource": "*",
                },
            ],
        },
        sort_keys=True,
    )
