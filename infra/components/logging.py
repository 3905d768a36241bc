"""Central logs (the seed's ELK): ECK-managed Elasticsearch + Kibana, fluent-bit on every node.

fluent-bit runs on every node -- GPU nodes included (it tolerates every taint) --
and ships container logs to daily ``dualtrack-*`` indices; an ILM policy set by
a one-shot Job deletes them after ``logging.retentionDays``.
"""

from __future__ import annotations

import json

import pulumi
import pulumi_kubernetes as k8s

from infra.components import k8s as kube
from infra.config import StackSettings

NAMESPACE = "logging"
OPERATOR_NAMESPACE = "elastic-system"
CLUSTER = "logs"
ES_URL = f"https://{CLUSTER}-es-http.{NAMESPACE}.svc:9200"
INDEX_PREFIX = "dualtrack"
CURL_IMAGE = "curlimages/curl:8.17.0"


def ilm_policy(retention_days: int) -> dict:
    return {
        "policy": {
            "phases": {
                "hot": {"min_age": "0ms", "actions": {"set_priority": {"priority": 100}}},
                "delete": {"min_age": f"{retention_days}d", "actions": {"delete": {}}},
            }
        }
    }


def index_template() -> dict:
    return {
        "index_patterns": [f"{INDEX_PREFIX}-*"],
        "template": {"settings": {"index.lifecycle.name": f"{INDEX_PREFIX}-retention"}},
        "priority": 200,
    }


class Logging(pulumi.ComponentResource):
    """ECK operator, one Elasticsearch cluster, Kibana, fluent-bit and the retention policy."""

    def __init__(
        self,
        name: str,
        settings: StackSettings,
        storage_class: str,
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        super().__init__("dualtrack:cloud:Logging", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        cfg = settings.logging
        system = {"dualtrack.io/pool": "system"}

        operator_ns = kube.namespace(OPERATOR_NAMESPACE, f"{name}-operator-ns", opts=child)
        ns = kube.namespace(NAMESPACE, f"{name}-ns", opts=child)
        operator = kube.release(
            f"{name}-eck-operator",
            name="elastic-operator",
            chart="eck-operator",
            version=settings.charts.eck_operator,
            namespace=OPERATOR_NAMESPACE,
            values={
                "nodeSelector": system,
                "resources": kube.resources("100m", "256Mi", cpu_limit="1", memory_limit="1Gi"),
            },
            opts=pulumi.ResourceOptions(parent=self, depends_on=[operator_ns]),
        )
        crd_opts = pulumi.ResourceOptions(parent=self, depends_on=[operator, ns])
        es_memory = "8Gi" if settings.environment == "prod" else "4Gi"
        es = kube.custom_resource(
            f"{name}-elasticsearch",
            "elasticsearch.k8s.elastic.co/v1",
            "Elasticsearch",
            CLUSTER,
            NAMESPACE,
            spec={
                "version": cfg.elastic_version,
                "nodeSets": [
                    {
                        "name": "default",
                        "count": cfg.elasticsearch_nodes,
                        "config": {"node.store.allow_mmap": False},
                        "podTemplate": {
                            "spec": {
                                "nodeSelector": system,
                                "containers": [
                                    {
                                        "name": "elasticsearch",
                                        "resources": kube.resources("1", es_memory, cpu_limit="2"),
                                    }
                                ],
                            }
                        },
                        "volumeClaimTemplates": [
                            {
                                "metadata": {"name": "elasticsearch-data"},
                                "spec": {
                                    "accessModes": ["ReadWriteOnce"],
                                    "storageClassName": storage_class,
                                    "resources": {"requests": {"storage": f"{cfg.storage_gib}Gi"}},
                                },
                            }
                        ],
                    }
                ],
            },
            opts=crd_opts,
        )
        kube.custom_resource(
            f"{name}-kibana",
            "kibana.k8s.elastic.co/v1",
            "Kibana",
            CLUSTER,
            NAMESPACE,
            spec={
                "version": cfg.elastic_version,
                "count": 1,
                "elasticsearchRef": {"name": CLUSTER},
                "podTemplate": {
                    "spec": {
                        "nodeSelector": system,
                        "containers": [
                            {"name": "kibana", "resources": kube.resources("500m", "1Gi", cpu_limit="1")}
                        ],
                    }
                },
            },
            opts=crd_opts,
        )
        password_env = {
            "name": "ES_PASSWORD",
            "valueFrom": {"secretKeyRef": {"name": f"{CLUSTER}-es-elastic-user", "key": "elastic"}},
        }
        kube.release(
            f"{name}-fluent-bit",
            name="fluent-bit",
            chart="fluent-bit",
            version=settings.charts.fluent_bit,
            namespace=NAMESPACE,
            values={
                "tolerations": [{"operator": "Exists"}],
                "env": [password_env],
                "resources": kube.resources("100m", "128Mi", cpu_limit="500m", memory_limit="256Mi"),
                "config": {
                    "outputs": (
                        "[OUTPUT]\n"
                        "    Name es\n    Match kube.*\n"
                        f"    Host {CLUSTER}-es-http.{NAMESPACE}.svc\n    Port 9200\n"
                        "    HTTP_User elastic\n    HTTP_Passwd ${ES_PASSWORD}\n"
                        "    tls On\n    tls.verify Off\n"
                        f"    Logstash_Format On\n    Logstash_Prefix {INDEX_PREFIX}\n"
                        "    Suppress_Type_Name On\n    Replace_Dots On\n    Retry_Limit False\n"
                    )
                },
            },
            opts=pulumi.ResourceOptions(parent=self, depends_on=[es]),
        )
        script = (
            "set -eu\n"
            'auth="elastic:$(cat /secrets/elastic)"\n'
            f'until curl -skf -u "$auth" {ES_URL}/_cluster/health; do sleep 10; done\n'
            f'curl -skf -u "$auth" -X PUT -H "Content-Type: application/json" '
            f"{ES_URL}/_ilm/policy/{INDEX_PREFIX}-retention "
            f"-d '{json.dumps(ilm_policy(cfg.retention_days))}'\n"
            f'curl -skf -u "$auth" -X PUT -H "Content-Type: application/json" '
            f"{ES_URL}/_index_template/{INDEX_PREFIX} -d '{json.dumps(index_template())}'\n"
        )
        kube.network_policy(
            f"{name}-retention-netpol",
            "log-retention",
            NAMESPACE,
            {"app.kubernetes.io/name": "log-retention"},
            [],
            pulumi.ResourceOptions(parent=self, depends_on=[ns]),
        )
        k8s.batch.v1.Job(
            f"{name}-retention",
            metadata={
                "name": f"log-retention-{cfg.retention_days}d",
                "namespace": NAMESPACE,
                "labels": kube.labels("log-retention"),
            },
            spec={
                "backoffLimit": 6,
                "template": {
                    "metadata": {"labels": kube.labels("log-retention")},
                    "spec": {
                        "restartPolicy": "OnFailure",
                        "nodeSelector": system,
                        "securityContext": kube.pod_security(),
                        "automountServiceAccountToken": False,
                        "volumes": [
                            {
                                "name": "elastic-user",
                                "secret": {"secretName": f"{CLUSTER}-es-elastic-user", "defaultMode": 0o440},
                            }
                        ],
                        "containers": [
                            {
                                "name": "set-retention",
                                "image": CURL_IMAGE,
                                "command": ["sh", "-c", script],
                                "resources": kube.resources(
                                    "50m", "64Mi", cpu_limit="200m", memory_limit="128Mi"
                                ),
                                "securityContext": kube.security_context(),
                                "volumeMounts": [
                                    {"name": "elastic-user", "mountPath": "/secrets", "readOnly": True}
                                ],
                            }
                        ],
                    },
                },
            },
            opts=pulumi.ResourceOptions(parent=self, depends_on=[es]),
        )
        self.register_outputs({})
