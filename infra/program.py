"""The whole cloud stack, in dependency order: settings -> components -> contract outputs.

``infra/__main__.py`` calls :func:`main`; the offline plan (``dualtrack plan``)
and the tests call it under Pulumi's mocks, so what they check is exactly what
``pulumi up`` declares.
"""

from __future__ import annotations

from typing import Any

import pulumi
import pulumi_aws as aws
import pulumi_kubernetes as k8s

from infra import contract
from infra.components.access import PipelineAccess
from infra.components.cluster import Cluster
from infra.components.gpu import GpuPlatform
from infra.components.images import Images
from infra.components.logging import Logging
from infra.components.mesh import Mesh
from infra.components.messaging import SASL_MECHANISM, SECURITY_PROTOCOL, Messaging
from infra.components.network import Network
from infra.components.observability import Observability
from infra.components.serving import Serving
from infra.config import NAMESPACE, ConfigError, StackSettings, settings_from_pulumi


def build(settings: StackSettings, grafana_password: pulumi.Input[str]) -> dict[str, Any]:
    """Declare every resource; returns the contract outputs (keys of infra/contract.py)."""
    aws_provider = aws.Provider(
        "aws",
        region=settings.region,
        default_tags=aws.ProviderDefaultTagsArgs(
            tags={"project": "dualtrack", "environment": settings.environment, "managed-by": "pulumi"}
        ),
    )
    on_aws = pulumi.ResourceOptions(providers={"aws": aws_provider})
    network = Network("network", settings, opts=on_aws)
    cluster = Cluster("cluster", settings, network.private_subnet_ids, opts=on_aws)
    k8s_provider = k8s.Provider(
        "eks",
        kubeconfig=cluster.kubeconfig,
        enable_server_side_apply=True,
        opts=pulumi.ResourceOptions(depends_on=cluster.gpu_node_groups),
    )
    on_both = pulumi.ResourceOptions(providers={"aws": aws_provider, "kubernetes": k8s_provider})

    images = Images("images", settings, opts=on_aws)
    GpuPlatform("gpu", settings, cluster, opts=on_both)
    serving = Serving("serving", settings, cluster, image=images.image, opts=on_both)
    observability = Observability("observability", settings, serving, grafana_password, opts=on_both)
    mesh = Mesh("mesh", settings, serving, opts=on_both)
    Logging("logging", settings, observability.storage_class, opts=on_both)
    PipelineAccess("access", opts=on_both)
    messaging = Messaging("messaging", settings, network.vpc_id, network.private_subnet_ids, opts=on_aws)

    host = settings.mesh.hostname
    return {
        "environment": settings.environment,
        "region": settings.region,
        "clusterName": cluster.name,
        "serviceHostname": host,
        "ingressHostname": mesh.ingress_hostname,
        "tritonHttpEndpoint": f"https://{host}",
        "tritonGrpcEndpoint": f"{host}:443",
        "modelName": settings.serving.model.served_name,
        "modelProfile": settings.serving.profile,
        "modelBucket": serving.bucket,
        "jwtIssuer": settings.mesh.jwt.issuer,
        "jwtAudience": settings.mesh.jwt.audiences[0],
        "kafkaBootstrapBrokers": messaging.bootstrap_brokers,
        "kafkaTopic": settings.messaging.topic,
        "kafkaSecurityProtocol": SECURITY_PROTOCOL,
        "kafkaSaslMechanism": SASL_MECHANISM,
        "kafkaClientPolicyArn": messaging.client_policy_arn,
        "kubeconfig": cluster.kubeconfig,
    }


def main() -> None:
    """Entry point for ``pulumi up``/``preview``: read config, declare, export the contract."""
    try:
        settings = settings_from_pulumi()
    except ConfigError as exc:
        # RunError is reported by the engine as a plain message, without a Python traceback.
        raise pulumi.RunError(f"invalid stack configuration:\n{exc}") from None
    password = pulumi.Config(NAMESPACE).require_secret("grafanaAdminPassword")
    contract.export(build(settings, password))
