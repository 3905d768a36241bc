"""Istio: the only way into the model, with mTLS inside and a JWT at the door.

Traffic from the on-prem gateway arrives at the ingress gateway (a load balancer
admitting only the on-prem egress CIDRs), must carry a JWT signed by the on-prem
gateway, and is routed by the seed's priority rule: ``x-priority: high`` goes to
the primary model version, everything else is split by weight between primary
and canary. Retries cover connection failures only -- a half-generated answer is
never replayed -- and timeouts are long enough for a whole generation. Inside
the serving namespace mTLS is STRICT and authorization denies by default,
admitting only the ingress gateway's identity.
"""

from __future__ import annotations

from typing import Any

import pulumi
import pulumi_kubernetes as k8s

from infra.components import k8s as kube
from infra.components.serving import APP, PORTS, Serving
from infra.config import StackSettings

SYSTEM_NS = "istio-system"
INGRESS_NS = "istio-ingress"
INGRESS_NAME = "istio-ingress"
INGRESS_PRINCIPAL = f"cluster.local/ns/{INGRESS_NS}/sa/{INGRESS_NAME}"
GATEWAY = "dualtrack"
GRPC_PREFIX = "/inference.GRPCInferenceService/"
RETRY_ON = "connect-failure,refused-stream,reset-before-request,unavailable"
"""Only failures before the model saw the request; 5xx/timeouts mid-generation are not retried."""


class Mesh(pulumi.ComponentResource):
    """Istio control plane, ingress gateway and the serving namespace's traffic and security policy."""

    ingress_hostname: pulumi.Output[str]

    def __init__(
        self, name: str, settings: StackSettings, serving: Serving, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__("dualtrack:cloud:Mesh", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        cfg = settings.mesh
        version = cfg.istio_version

        system_ns = kube.namespace(SYSTEM_NS, f"{name}-system-ns", opts=child)
        ingress_ns = kube.namespace(INGRESS_NS, f"{name}-ingress-ns", opts=child)
        base = kube.release(
            f"{name}-base",
            name="istio-base",
            chart="base",
            version=version,
            namespace=SYSTEM_NS,
            values={"defaultRevision": "default"},
            opts=pulumi.ResourceOptions(parent=self, depends_on=[system_ns]),
        )
        istiod = kube.release(
            f"{name}-istiod",
            name="istiod",
            chart="istiod",
            version=version,
            namespace=SYSTEM_NS,
            values={
                "meshConfig": {"accessLogFile": "/dev/stdout", "enablePrometheusMerge": True},
                "pilot": {"nodeSelector": {"dualtrack.io/pool": "system"}, "autoscaleMin": 2},
            },
            opts=pulumi.ResourceOptions(parent=self, depends_on=[base]),
        )
        # Read by Kubernetes' built-in AWS service controller (no load-balancer controller here):
        # it makes internet-facing NLBs unless told `internal`.
        lb_annotations = {
            "service.beta.kubernetes.io/aws-load-balancer-type": "nlb",
            "service.beta.kubernetes.io/aws-load-balancer-cross-zone-load-balancing-enabled": "true",
        }
        if cfg.ingress_scheme == "internal":
            lb_annotations["service.beta.kubernetes.io/aws-load-balancer-internal"] = "true"
        gateway_release = kube.release(
            f"{name}-gateway",
            name=INGRESS_NAME,
            chart="gateway",
            version=version,
            namespace=INGRESS_NS,
            values={
                "service": {
                    "type": "LoadBalancer",
                    "annotations": lb_annotations,
                    "loadBalancerSourceRanges": settings.onprem_cidrs,
                    "externalTrafficPolicy": "Local",
                    "ports": [{"name": "https", "port": 443, "targetPort": 8443, "protocol": "TCP"}],
                },
                "autoscaling": {"minReplicas": 2, "maxReplicas": 6},
                "resources": kube.resources("500m", "512Mi", cpu_limit="2", memory_limit="1Gi"),
                "nodeSelector": {"dualtrack.io/pool": "system"},
            },
            opts=pulumi.ResourceOptions(parent=self, depends_on=[istiod, ingress_ns]),
        )
        # Istio's CRDs come with the base chart (istiod waits for it); the serving
        # and ingress namespaces must exist before objects are created in them.
        crd_opts = pulumi.ResourceOptions(
            parent=self, depends_on=[istiod, ingress_ns, serving.namespace_resource]
        )
        ns = serving.namespace

        kube.custom_resource(
            f"{name}-gateway-cr",
            "networking.istio.io/v1",
            "Gateway",
            GATEWAY,
            INGRESS_NS,
            {
                "selector": {"istio": "ingress"},
                "servers": [
                    {
                        "port": {"number": 443, "name": "https", "protocol": "HTTPS"},
                        "tls": {
                            "mode": "SIMPLE",
                            "credentialName": cfg.tls_credential_name,
                            "minProtocolVersion": "TLSV1_2",
                        },
                        "hosts": [cfg.hostname],
                    }
                ],
            },
            pulumi.ResourceOptions(parent=self, depends_on=[gateway_release]),
        )

        kube.custom_resource(
            f"{name}-virtual-service",
            "networking.istio.io/v1",
            "VirtualService",
            APP,
            ns,
            {
                "hosts": [cfg.hostname],
                "gateways": [f"{INGRESS_NS}/{GATEWAY}"],
                "http": self._routes(settings, serving.service_host),
            },
            crd_opts,
        )

        dr_subsets = [{"name": "primary", "labels": {"version": settings.serving.model_version}}]
        if settings.serving.canary:
            dr_subsets.append({"name": "canary", "labels": {"version": settings.serving.canary.version}})
        batch = settings.serving.model.max_batch_size
        kube.custom_resource(
            f"{name}-destination-rule",
            "networking.istio.io/v1",
            "DestinationRule",
            APP,
            ns,
            {
                "host": serving.service_host,
                "trafficPolicy": {
                    "tls": {"mode": "ISTIO_MUTUAL"},
                    "loadBalancer": {"simple": "LEAST_REQUEST"},
                    "connectionPool": {
                        "tcp": {"maxConnections": batch * 4, "connectTimeout": "10s"},
                        # Limits of each client-side Envoy (every ingress gateway pod keeps its own
                        # counts), not of a Triton replica: G gateway pods admit G x these. About
                        # two batches each; beyond that fail fast (503) so the on-prem router's
                        # breaker falls back instead of waiting.
                        "http": {
                            "http2MaxRequests": batch * 2,
                            "http1MaxPendingRequests": batch * 2,
                            "maxRequestsPerConnection": 0,
                            "idleTimeout": f"{cfg.request_timeout_s}s",
                        },
                    },
                    "outlierDetection": {
                        "consecutive5xxErrors": 5,
                        "interval": "30s",
                        "baseEjectionTime": "120s",
                        "maxEjectionPercent": 50,
                    },
                },
                "subsets": dr_subsets,
            },
            crd_opts,
        )

        kube.custom_resource(
            f"{name}-mtls",
            "security.istio.io/v1",
            "PeerAuthentication",
            "default",
            ns,
            {
                "mtls": {"mode": "STRICT"},
                # Prometheus (outside the mesh) scrapes Triton's metrics port in plain text.
                "selector": {"matchLabels": {"app": APP}},
                "portLevelMtls": {str(PORTS["http-metrics"]): {"mode": "PERMISSIVE"}},
            },
            crd_opts,
        )
        kube.custom_resource(
            f"{name}-mtls-namespace",
            "security.istio.io/v1",
            "PeerAuthentication",
            "namespace-default",
            ns,
            {"mtls": {"mode": "STRICT"}},
            crd_opts,
        )

        # Inline keys where the issuer is private (Istio cannot fetch from the premises).
        key_source = {"jwks": cfg.jwt.jwks} if cfg.jwt.jwks else {"jwksUri": cfg.jwt.jwks_uri}
        jwt_rule = {
            "issuer": cfg.jwt.issuer,
            **key_source,
            "audiences": cfg.jwt.audiences,
            "forwardOriginalToken": True,
        }
        kube.custom_resource(
            f"{name}-jwt-ingress",
            "security.istio.io/v1",
            "RequestAuthentication",
            "onprem-gateway-jwt",
            INGRESS_NS,
            {"selector": {"matchLabels": {"istio": "ingress"}}, "jwtRules": [jwt_rule]},
            crd_opts,
        )
        kube.custom_resource(
            f"{name}-authz-ingress",
            "security.istio.io/v1",
            "AuthorizationPolicy",
            "require-jwt",
            INGRESS_NS,
            {
                "selector": {"matchLabels": {"istio": "ingress"}},
                "action": "ALLOW",
                "rules": [
                    {
                        "from": [{"source": {"requestPrincipals": [f"{cfg.jwt.issuer}/*"]}}],
                        # gRPC clients send the authority with its port (host:443).
                        "to": [{"operation": {"hosts": [cfg.hostname, f"{cfg.hostname}:*"]}}],
                    }
                ],
            },
            crd_opts,
        )
        kube.custom_resource(
            f"{name}-jwt-serving",
            "security.istio.io/v1",
            "RequestAuthentication",
            "onprem-gateway-jwt",
            ns,
            {"selector": {"matchLabels": {"app": APP}}, "jwtRules": [jwt_rule]},
            crd_opts,
        )
        # An ALLOW policy with no rules matches nothing: everything in the namespace is denied...
        kube.custom_resource(
            f"{name}-authz-deny",
            "security.istio.io/v1",
            "AuthorizationPolicy",
            "deny-by-default",
            ns,
            {},
            crd_opts,
        )
        # ...except what the ingress gateway forwards with a valid JWT, and metrics scrapes.
        kube.custom_resource(
            f"{name}-authz-allow",
            "security.istio.io/v1",
            "AuthorizationPolicy",
            "allow-ingress",
            ns,
            {
                "selector": {"matchLabels": {"app": APP}},
                "action": "ALLOW",
                "rules": [
                    {
                        "from": [
                            {
                                "source": {
                                    "principals": [INGRESS_PRINCIPAL],
                                    "requestPrincipals": [f"{cfg.jwt.issuer}/*"],
                                }
                            }
                        ],
                        "to": [{"operation": {"ports": [str(PORTS["http"]), str(PORTS["grpc"])]}}],
                    },
                    {
                        "to": [
                            {
                                "operation": {
                                    "ports": [str(PORTS["http-metrics"])],
                                    "methods": ["GET"],
                                    "paths": ["/metrics"],
                                }
                            }
                        ]
                    },
                ],
            },
            crd_opts,
        )

        service = k8s.core.v1.Service.get(
            f"{name}-ingress-service",
            f"{INGRESS_NS}/{INGRESS_NAME}",
            opts=pulumi.ResourceOptions(parent=self, depends_on=[gateway_release]),
        )
        self.ingress_hostname = service.status.apply(_lb_hostname)
        self.register_outputs({"ingressHostname": self.ingress_hostname})

    @staticmethod
    def _routes(settings: StackSettings, host: str) -> list[dict[str, Any]]:
        """gRPC and HTTP routes, each split by the priority header (high first: first match wins)."""
        cfg, canary = settings.mesh, settings.serving.canary

        def destinations(port: int, high: bool) -> list[dict[str, Any]]:
            primary = {"destination": {"host": host, "subset": "primary", "port": {"number": port}}}
            if high or canary is None or canary.weight == 0:
                return [{**primary, "weight": 100}]
            return [
                {**primary, "weight": 100 - canary.weight},
                {
                    "destination": {"host": host, "subset": "canary", "port": {"number": port}},
                    "weight": canary.weight,
                },
            ]

        routes = []
        for protocol, port, match in (
            ("grpc", PORTS["grpc"], {"uri": {"prefix": GRPC_PREFIX}}),
            ("http", PORTS["http"], {"uri": {"prefix": "/"}}),
        ):
            for high in (True, False):
                route_match = {**match, "headers": {"x-priority": {"exact": "high"}}} if high else match
                routes.append(
                    {
                        "name": f"{protocol}-{'high' if high else 'default'}",
                        "match": [route_match],
                        "route": destinations(port, high),
                        "timeout": f"{cfg.request_timeout_s}s",
                        "retries": {
                            "attempts": cfg.retries,
                            "perTryTimeout": f"{cfg.per_try_timeout_s}s",
                            "retryOn": RETRY_ON,
                        },
                    }
                )
        return routes


def _lb_hostname(status: Any) -> str:
    """The NLB's DNS name from ``status.loadBalancer.ingress[0]`` (typed output or plain dict)."""

    def field(obj: Any, name: str, attr: str) -> Any:
        return obj.get(name) if type(obj) is dict else getattr(obj, attr, None)

    ingress = (field(field(status, "loadBalancer", "load_balancer") or {}, "ingress", "ingress") or [{}])[0]
    return field(ingress, "hostname", "hostname") or field(ingress, "ip", "ip") or "pending"
