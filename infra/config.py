"""Typed, validated stack settings: the edge between ``stacks/Pulumi.<env>.yaml`` and the program.

Every setting lives under the ``dualtrack:`` namespace as one object per concern
(``dualtrack:network``, ``dualtrack:gpuNodes``, ...), camelCase like Pulumi's own
providers, plus ``aws:region``. :func:`load_settings` turns the raw key/value map
into :class:`StackSettings` or raises :class:`ConfigError` whose every line names
the key, the bad value and what is allowed -- an operator never sees a traceback
for a typo. Cross-field rules (a 671B profile on A100, tensor parallel larger than
the node, weights that do not fit) are checked here, before a resource exists.

Secrets are not part of these settings: they are read with
``pulumi.Config.require_secret`` so they stay wrapped (see :data:`SECRET_KEYS`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from ipaddress import IPv4Network
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from infra.catalog import GPU_INSTANCES, ModelProfile, model_profiles

NAMESPACE = "dualtrack"

SECRET_KEYS: dict[str, str] = {
    "grafanaAdminPassword": "Grafana admin (pulumi config set --secret dualtrack:grafanaAdminPassword)",
}
"""Secret settings, always set with ``pulumi config set --secret``; never in a stack file in clear."""

KUBERNETES_VERSIONS = ("1.32", "1.33", "1.34")
"""EKS versions this program is validated against (schemas checked offline per version)."""
ISTIO_KUBERNETES = {"1.26": ("1.29", "1.32"), "1.27": ("1.29", "1.33"), "1.28": ("1.30", "1.34")}
"""Kubernetes versions each Istio minor release supports (Istio's support matrix)."""

_TAG = re.compile(r"^\d{2}\.\d{2}(\.\d+)?$")
_SEMVER = re.compile(r"^\d+\.\d+\.\d+$")
_AZ = re.compile(r"^[a-z]{2}(-gov)?-[a-z]+-\d[a-z]$")
_DNS = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}$")
_INSTANCE = re.compile(r"^[a-z][a-z0-9-]*\.[0-9]*[a-z0-9]+$")


class ConfigError(ValueError):
    """The stack configuration is wrong; the message is for the operator, verbatim."""


class _Located(ValueError):
    """A cross-field error that knows which key it is about."""

    def __init__(self, key: str, value: Any, message: str) -> None:
        super().__init__(message)
        self.key, self.value, self.message = key, value, message


def _key(name: str) -> str:
    """Python field name -> Pulumi config key (camelCase; ``GiB`` spelt as units are)."""
    return to_camel(name).replace("Gib", "GiB").replace("MibPerS", "MiBps")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, alias_generator=_key, populate_by_name=True)


def _unique_cidrs(value: list[IPv4Network], *, allow_any: bool = False) -> list[IPv4Network]:
    if not allow_any and any(n.prefixlen == 0 for n in value):
        raise ValueError("0.0.0.0/0 admits the whole internet; list the networks that need access")
    if len(set(value)) != len(value):
        raise ValueError("CIDRs must be unique")
    return value


class Network(_Section):
    """VPC layout. Availability zones are named, so a plan is the same on every machine."""

    cidr: IPv4Network = IPv4Network("10.40.0.0/16")
    availability_zones: list[str] = Field(min_length=2, max_length=6)
    nat_gateways: Literal["single", "perAz"] | None = Field(
        None, description="One NAT (cheap) or one per AZ (survives an AZ loss). Default: perAz in prod."
    )

    @model_validator(mode="after")
    def _room_for_subnets(self) -> Network:
        """Public /24s share the first /20; each AZ gets a private /20 (network.subnet_plan)."""
        needed = len(self.availability_zones) + 1
        if self.cidr.prefixlen > 20 or 2 ** (20 - self.cidr.prefixlen) < needed:
            raise _Located(
                "network.cidr",
                str(self.cidr),
                f"too small for {len(self.availability_zones)} AZs: needs {needed} x /20 "
                f"(a /{20 - (needed - 1).bit_length()} or larger)",
            )
        return self

    @field_validator("availability_zones")
    @classmethod
    def _az_names(cls, v: list[str]) -> list[str]:
        bad = [z for z in v if not _AZ.match(z)]
        if bad:
            raise ValueError(f"not availability zone names: {bad} (expected e.g. us-east-1a)")
        if len(set(v)) != len(v):
            raise ValueError("availability zones must be distinct")
        return v


class NodeGroupSize(_Section):
    min_size: int = Field(ge=0)
    desired_size: int = Field(ge=0)
    max_size: int = Field(ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> NodeGroupSize:
        if not self.min_size <= self.desired_size <= self.max_size:
            raise ValueError(
                f"sizes must satisfy minSize <= desiredSize <= maxSize, got "
                f"{self.min_size} <= {self.desired_size} <= {self.max_size}"
            )
        return self


class SystemNodes(NodeGroupSize):
    """Nodes for everything that is not a model: add-ons, mesh, monitoring, logging."""

    instance_type: str = "m6i.2xlarge"
    min_size: int = Field(2, ge=1)
    desired_size: int = Field(3, ge=1)
    max_size: int = Field(6, ge=1)
    disk_gib: int = Field(100, ge=20, le=16384)

    @field_validator("instance_type")
    @classmethod
    def _shape(cls, v: str) -> str:
        if not _INSTANCE.match(v):
            raise ValueError("expected an EC2 instance type such as m6i.2xlarge")
        if v in GPU_INSTANCES:
            raise ValueError("is a GPU instance type; system nodes run add-ons, use e.g. m6i.2xlarge")
        return v


class GpuNodes(NodeGroupSize):
    """The GPU node group. Spot saves money (the seed's cost option); the on-demand
    fallback group (scaled from zero by the autoscaler) keeps serving when spot is reclaimed."""

    instance_type: str
    capacity: Literal["on-demand", "spot"] = "on-demand"
    on_demand_fallback: bool = True
    fallback_max_size: int = Field(1, ge=1)
    root_volume_gib: int = Field(500, ge=200, le=16384)

    @field_validator("instance_type")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in GPU_INSTANCES:
            raise ValueError(f"unknown GPU instance type; allowed: {', '.join(sorted(GPU_INSTANCES))}")
        return v


class Cluster(_Section):
    version: str = "1.33"
    public_access_cidrs: list[IPv4Network] = Field(
        default_factory=list,
        description="Who may reach the public API endpoint; empty = private endpoint only.",
    )
    log_types: list[Literal["api", "audit", "authenticator", "controllerManager", "scheduler"]] = Field(
        default_factory=lambda: ["api", "audit", "authenticator", "controllerManager", "scheduler"],
        min_length=1,
    )
    system_nodes: SystemNodes = SystemNodes()
    admin_role_arns: list[str] = Field(
        default_factory=list,
        description="IAM roles given cluster-admin access entries (the deploy pipeline).",
    )
    viewer_role_arns: list[str] = Field(
        default_factory=list, description="IAM roles given read-only access entries (the preview pipeline)."
    )

    @field_validator("admin_role_arns", "viewer_role_arns")
    @classmethod
    def _role_arns(cls, v: list[str]) -> list[str]:
        bad = [a for a in v if not re.match(r"^arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]+$", a)]
        if bad:
            raise ValueError(f"not IAM role ARNs: {bad} (expected arn:aws:iam::<account>:role/<name>)")
        return v

    @field_validator("version")
    @classmethod
    def _supported(cls, v: str) -> str:
        if v not in KUBERNETES_VERSIONS:
            raise ValueError(f"unsupported EKS version; allowed: {', '.join(KUBERNETES_VERSIONS)}")
        return v

    @field_validator("public_access_cidrs")
    @classmethod
    def _cidrs(cls, v: list[IPv4Network]) -> list[IPv4Network]:
        return _unique_cidrs(v)


class Canary(_Section):
    """A second model version behind the same Service; receives the weighted share of
    normal-priority traffic (``x-priority: high`` always goes to the primary)."""

    version: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,30}$")
    weight: int = Field(ge=0, le=50)
    replicas: int = Field(1, ge=1)
    profile: str | None = None


class Serving(_Section):
    namespace: str = Field("serving", pattern=r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
    profile: str
    triton_version: str = Field(description="NGC release, e.g. 25.10 -> tritonserver:25.10-trtllm-python-py3")
    image_repository: str = "nvcr.io/nvidia/tritonserver"
    model_version: str = Field("v1", pattern=r"^[a-z0-9][a-z0-9-]{0,30}$")
    replicas: int = Field(1, ge=1)
    max_replicas: int = Field(2, ge=1)
    tensor_parallel: int | None = Field(None, ge=1, description="Override of the profile's tp size.")
    waiting_requests_target: float = Field(
        2,
        gt=0,
        le=1000,
        description="HPA target: requests waiting inside the TensorRT-LLM executor per replica.",
    )
    shm_gib: int = Field(64, ge=1, le=2048)
    model_sync_mib_per_s: int = Field(
        250,
        ge=10,
        le=20000,
        description="Stated S3 -> node cache throughput of the sync step; sizes every wait on it.",
    )
    canary: Canary | None = None
    sync_image: str = "public.ecr.aws/aws-cli/aws-cli:2.31.6"

    @field_validator("profile")
    @classmethod
    def _known_profile(cls, v: str) -> str:
        if v not in model_profiles():
            raise ValueError(f"unknown model profile; allowed: {', '.join(sorted(model_profiles()))}")
        return v

    @field_validator("triton_version")
    @classmethod
    def _pinned(cls, v: str) -> str:
        if not _TAG.match(v):
            raise ValueError("must be a pinned NGC release such as 25.10 (never latest)")
        return v

    @field_validator("sync_image")
    @classmethod
    def _pinned_image(cls, v: str) -> str:
        return _pinned_ref(v)

    @model_validator(mode="after")
    def _replicas(self) -> Serving:
        if self.max_replicas < self.replicas:
            raise ValueError(f"maxReplicas ({self.max_replicas}) must be >= replicas ({self.replicas})")
        return self

    @property
    def image(self) -> str:
        return f"{self.image_repository}:{self.triton_version}-trtllm-python-py3"

    @property
    def model(self) -> ModelProfile:
        return model_profiles()[self.profile]


def _pinned_ref(v: str) -> str:
    """An image reference with a fixed tag or digest (``latest`` and tagless refs move)."""
    name, _, tag = v.rpartition(":")
    if "@sha256:" in v:
        return v
    if not name or "/" in tag or tag in ("", "latest"):
        raise ValueError("image must be pinned to a version tag or digest (never latest)")
    return v


PRIVATE_JWK_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth", "k")
"""JWK members that carry private or symmetric key material (RFC 7518): never in a stack file."""


class Jwt(_Section):
    """The on-prem gateway signs requests to the cloud; Istio checks them at the ingress.

    Istio needs the issuer's public keys: ``jwks`` inline (the JSON of the key set, public keys
    only -- what a private issuer on premises needs, since Istio cannot reach it) or ``jwksUri``
    where Istio can fetch them. Exactly one of the two.
    """

    issuer: str = Field(pattern=r"^https://")
    jwks_uri: str | None = Field(None, pattern=r"^https://")
    jwks: str | None = Field(None, description='Public JWK set as JSON: {"keys": [...]}')
    audiences: list[str] = Field(default_factory=lambda: ["dualtrack-cloud"], min_length=1)

    @field_validator("jwks")
    @classmethod
    def _public_key_set(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            keys = json.loads(v).get("keys")
        except (json.JSONDecodeError, AttributeError):
            raise ValueError('not a JWK set: expected JSON like {"keys": [{"kty": "RSA", ...}]}') from None
        if (
            not isinstance(keys, list)
            or not keys
            or not all(isinstance(k, dict) and "kty" in k for k in keys)
        ):
            raise ValueError('a JWK set needs "keys": a non-empty list of keys, each with "kty"')
        secret = sorted({m for k in keys for m in PRIVATE_JWK_MEMBERS if m in k})
        if secret:
            raise ValueError(
                f"holds private or symmetric key material ({', '.join(secret)}): give the public keys only"
            )
        return json.dumps({"keys": keys}, sort_keys=True, separators=(",", ":"))

    @model_validator(mode="after")
    def _one_key_source(self) -> Jwt:
        if (self.jwks is None) == (self.jwks_uri is None):
            raise ValueError("set exactly one of jwks (inline public keys) and jwksUri")
        return self


class Mesh(_Section):
    istio_version: str = "1.27.3"
    hostname: str
    tls_credential_name: str = Field("dualtrack-ingress-tls", pattern=r"^[a-z0-9][a-z0-9.-]{0,252}$")
    jwt: Jwt
    ingress_scheme: Literal["internet-facing", "internal"] = Field(
        "internet-facing", description="internal when the sites reach the VPC over VPN/Direct Connect."
    )
    request_timeout_s: int = Field(600, ge=30, le=3600, description="Whole generation, all retries.")
    per_try_timeout_s: int = Field(300, ge=10, le=3600)
    retries: int = Field(2, ge=0, le=5)

    @field_validator("istio_version")
    @classmethod
    def _semver(cls, v: str) -> str:
        if not _SEMVER.match(v):
            raise ValueError("must be a pinned release such as 1.27.3")
        return v

    @field_validator("hostname")
    @classmethod
    def _dns(cls, v: str) -> str:
        if not _DNS.match(v):
            raise ValueError("must be a DNS name such as llm.dev.example.com")
        return v

    @model_validator(mode="after")
    def _timeouts(self) -> Mesh:
        if self.per_try_timeout_s > self.request_timeout_s:
            raise ValueError(
                f"perTryTimeoutS ({self.per_try_timeout_s}) must not exceed requestTimeoutS "
                f"({self.request_timeout_s})"
            )
        return self


class Charts(_Section):
    """Helm chart versions, pinned (a moving chart is an unreviewed change)."""

    kube_prometheus_stack: str = "79.5.0"
    prometheus_adapter: str = "5.2.0"
    nvidia_device_plugin: str = "0.18.0"
    dcgm_exporter: str = "4.6.0"
    eck_operator: str = "3.2.0"
    fluent_bit: str = "0.54.0"
    cluster_autoscaler: str = "9.52.1"

    @field_validator("*")
    @classmethod
    def _semver(cls, v: str) -> str:
        if not _SEMVER.match(v):
            raise ValueError("must be a pinned chart version such as 1.2.3")
        return v


class Observability(_Section):
    retention: str = Field("15d", pattern=r"^\d+[dhw]$")
    prometheus_storage_gib: int = Field(100, ge=10)
    gpu_memory_alert_fraction: float = Field(0.95, gt=0, le=1)
    gpu_temperature_alert_c: int = Field(85, ge=50, le=110)
    queue_ratio_alert: float = Field(2.0, gt=0)


class Logging(_Section):
    elastic_version: str = "8.19.6"
    retention_days: int = Field(14, ge=1, le=3650)
    storage_gib: int = Field(200, ge=10)
    elasticsearch_nodes: int = Field(3, ge=1, le=15)

    @field_validator("elastic_version")
    @classmethod
    def _semver(cls, v: str) -> str:
        if not _SEMVER.match(v):
            raise ValueError("must be a pinned release such as 8.19.6")
        return v


class Messaging(_Section):
    kafka_version: str = "3.8.x"
    broker_instance_type: str = Field("kafka.m7g.large", pattern=r"^kafka\.[a-z0-9]+\.[a-z0-9]+$")
    brokers_per_az: int = Field(1, ge=1, le=10)
    volume_gib: int = Field(100, ge=1, le=16384)
    topic: str = Field("knowledge_updates", pattern=r"^[A-Za-z0-9._-]{1,249}$")
    client_cidrs: list[IPv4Network] = Field(
        default_factory=list,
        description="Networks that reach the brokers' private addresses over VPN/Direct Connect "
        "(default: onpremEgressCidrs). MSK is never exposed to the internet.",
    )

    @field_validator("client_cidrs")
    @classmethod
    def _cidrs(cls, v: list[IPv4Network]) -> list[IPv4Network]:
        return _unique_cidrs(v)


class Images(_Section):
    build: bool = Field(
        False, description="Build and push the serving image (needs Docker where pulumi runs)."
    )
    repository_name: str = Field("dualtrack-serving", pattern=r"^[a-z0-9][a-z0-9._/-]{1,255}$")
    tag: str = Field("0.1.0", pattern=r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")

    @field_validator("tag")
    @classmethod
    def _not_latest(cls, v: str) -> str:
        if v == "latest":
            raise ValueError("immutable repositories need a version tag (never latest)")
        return v


class StackSettings(_Section):
    """Everything one environment declares. Field names are the ``dualtrack:`` keys."""

    environment: Literal["dev", "staging", "prod"]
    region: str = Field(pattern=r"^[a-z]{2}(-gov)?-[a-z]+-\d$")
    onprem_egress_cidrs: list[IPv4Network] = Field(
        min_length=1,
        description="Where the on-prem sites egress from: the only sources the ingress and MSK admit.",
    )
    network: Network
    cluster: Cluster = Cluster()
    gpu_nodes: GpuNodes
    serving: Serving
    mesh: Mesh
    charts: Charts = Charts()
    observability: Observability = Observability()
    logging: Logging = Logging()
    messaging: Messaging
    images: Images = Images()

    @property
    def name(self) -> str:
        """Prefix for every physical name (cluster, bucket, MSK...)."""
        return f"dualtrack-{self.environment}"

    @property
    def onprem_cidrs(self) -> list[str]:
        return [str(c) for c in self.onprem_egress_cidrs]

    @field_validator("onprem_egress_cidrs")
    @classmethod
    def _cidrs(cls, v: list[IPv4Network]) -> list[IPv4Network]:
        return _unique_cidrs(v)

    @property
    def nat_per_az(self) -> bool:
        mode = self.network.nat_gateways or ("perAz" if self.environment == "prod" else "single")
        return mode == "perAz"

    @property
    def tensor_parallel(self) -> int:
        gpu = GPU_INSTANCES[self.gpu_nodes.instance_type].gpu
        return self.serving.tensor_parallel or self.serving.model.tensor_parallel_on(gpu)

    @property
    def gpus_per_replica(self) -> int:
        return self.tensor_parallel * self.serving.model.pipeline_parallel

    @model_validator(mode="after")
    def _fits(self) -> StackSettings:
        """Refuse serving combinations that cannot run, naming what would."""
        node = GPU_INSTANCES[self.gpu_nodes.instance_type]
        for key, profile_name in self._profiles_in_use():
            profile = model_profiles()[profile_name]
            fitting = sorted(
                name
                for name, inst in GPU_INSTANCES.items()
                if inst.gpu in profile.gpu_types and profile.tensor_parallel_on(inst.gpu) <= inst.gpus
            )
            if node.gpu not in profile.gpu_types:
                raise _Located(
                    "gpuNodes.instanceType",
                    self.gpu_nodes.instance_type,
                    f"has {node.gpu} GPUs, which {key} {profile_name!r} does not support "
                    f"(supported GPUs: {', '.join(profile.gpu_types)}); allowed instance types: "
                    f"{', '.join(fitting)}",
                )
            tp = self.serving.tensor_parallel or profile.tensor_parallel_on(node.gpu)
            gpus = tp * profile.pipeline_parallel
            if gpus > node.gpus and self.serving.tensor_parallel:
                raise _Located(
                    "serving.tensorParallel",
                    tp,
                    f"tensor parallel {tp} x pipeline parallel {profile.pipeline_parallel} needs {gpus} "
                    f"GPUs but {self.gpu_nodes.instance_type} has {node.gpus}; allowed: 1 to "
                    f"{node.gpus // profile.pipeline_parallel}",
                )
            if gpus > node.gpus:
                raise _Located(
                    "gpuNodes.instanceType",
                    self.gpu_nodes.instance_type,
                    f"{key} {profile_name!r} needs {gpus} GPUs per replica (tensor parallel {tp} x "
                    f"pipeline parallel {profile.pipeline_parallel}) on {node.gpu} but this type has "
                    f"{node.gpus}; multi-node serving is not supported; allowed instance types: "
                    f"{', '.join(fitting)}",
                )
            capacity = gpus * node.gpu_memory_gib * 0.9
            if profile.weights_gib() > capacity:
                raise _Located(
                    "gpuNodes.instanceType",
                    self.gpu_nodes.instance_type,
                    f"{key} {profile_name!r} needs about {profile.weights_gib():.0f} GiB of GPU memory for "
                    f"its weights; {gpus} x {node.gpu} ({node.gpu_memory_gb} GB = "
                    f"{node.gpu_memory_gib:.0f} GiB) offer {capacity:.0f}; "
                    f"allowed instance types: {', '.join(fitting)}",
                )
        istio = ".".join(self.mesh.istio_version.split(".")[:2])
        supported = ISTIO_KUBERNETES.get(istio)
        if supported is None:
            raise _Located(
                "mesh.istioVersion",
                self.mesh.istio_version,
                f"Istio {istio} is not one this program knows; allowed minor releases: "
                f"{', '.join(sorted(ISTIO_KUBERNETES))}",
            )
        if not _version(supported[0]) <= _version(self.cluster.version) <= _version(supported[1]):
            raise _Located(
                "cluster.version",
                self.cluster.version,
                f"Istio {self.mesh.istio_version} supports Kubernetes {supported[0]} to {supported[1]}; "
                f"lower cluster.version or raise mesh.istioVersion "
                f"({', '.join(f'{i}: {lo}-{hi}' for i, (lo, hi) in sorted(ISTIO_KUBERNETES.items()))})",
            )
        if self.messaging.brokers_per_az * len(self.network.availability_zones) < 2:
            raise _Located("messaging.brokersPerAz", self.messaging.brokers_per_az, "MSK needs >= 2 brokers")
        return self

    def _profiles_in_use(self) -> list[tuple[str, str]]:
        used = [(f"{NAMESPACE}:serving.profile", self.serving.profile)]
        if self.serving.canary and self.serving.canary.profile:
            used.append((f"{NAMESPACE}:serving.canary.profile", self.serving.canary.profile))
        return used


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split("."))


def _pulumi_key(loc: tuple[Any, ...]) -> str:
    """``("gpu_nodes", "instance_type")`` -> ``dualtrack:gpuNodes.instanceType``."""
    if not loc:
        return f"{NAMESPACE}:<stack>"
    if loc[0] == "region":
        return "aws:region"
    head, *rest = loc
    parts = [_key(str(head))] + [f"[{p}]" if isinstance(p, int) else _key(str(p)) for p in rest]
    return f"{NAMESPACE}:" + ".".join(parts).replace(".[", "[")


def _shown(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _parse(key: str, value: Any) -> Any:
    """Pulumi hands structured config over as JSON text."""
    if isinstance(value, str) and value[:1] in "{[":
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{key}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    return value


def load_settings(values: Mapping[str, Any]) -> StackSettings:
    """Validate a raw config map (``{"aws:region": ..., "dualtrack:network": {...}}``).

    Unknown ``dualtrack:`` keys are errors (a typo must not silently fall back to a default).
    """
    data: dict[str, Any] = {}
    problems: list[str] = []
    allowed = {_key(name) for name in StackSettings.model_fields if name != "region"}
    for key, value in values.items():
        ns, _, name = key.partition(":")
        if key == "aws:region":
            data["region"] = value
        elif ns == NAMESPACE and name in SECRET_KEYS:
            continue
        elif ns == NAMESPACE:
            if name not in allowed:
                problems.append(
                    f"{key}: unknown setting; allowed: "
                    + ", ".join(f"{NAMESPACE}:{k}" for k in sorted(allowed | set(SECRET_KEYS)))
                )
                continue
            data[name] = _parse(key, value)
    if problems:
        raise ConfigError("\n".join(problems))
    try:
        return StackSettings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format(exc)) from None


def _format(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        ctx_error = (err.get("ctx") or {}).get("error")
        if isinstance(ctx_error, _Located):
            lines.append(f"{NAMESPACE}:{ctx_error.key}: {_shown(ctx_error.value)} -- {ctx_error.message}")
            continue
        key = _pulumi_key(tuple(err["loc"]))
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            lines.append(f"{key}: required setting is missing")
        elif err["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown setting {_allowed_fields(err['loc'])}")
        else:
            lines.append(f"{key}: {_shown(err.get('input'))} -- {message}")
    return "\n".join(lines)


def _allowed_fields(loc: tuple[Any, ...]) -> str:
    """The valid keys at the level of a misspelt one, e.g. the fields of ``gpuNodes``."""
    model: Any = StackSettings
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) or next(
            (f for f in model.model_fields.values() if f.alias == part), None
        )
        annotation = getattr(field, "annotation", None)
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return ""
    return "(allowed: " + ", ".join(f.alias or n for n, f in model.model_fields.items()) + ")"


def settings_from_pulumi() -> StackSettings:
    """Read the running stack's configuration (inside ``pulumi up``/``preview`` or mocks)."""
    import pulumi.runtime.config as runtime_config  # the SDK's config map: all keys, for typo checks

    values: dict[str, Any] = {**runtime_config.get_config_env(), **runtime_config.CONFIG.get()}
    return load_settings(values)
