"""Offline plans: run the Pulumi program under mocks and write what it declares.

No Pulumi CLI, no cloud credentials: the program in ``infra/`` runs in-process
with :class:`PlanMocks` standing in for the engine and providers (deterministic
ids, ARNs and endpoints), and :class:`RecordingMonitor` captures every resource
with its parent and inputs. :func:`write_plan` turns that into a reviewable tree
under ``plans/<stack>/``:

- ``resources.yaml`` -- every resource: type, name, parent and its inputs
  (Kubernetes objects by reference); secrets are masked as ``[secret]``;
- ``kubernetes/<namespace>/<Kind>-<name>.yaml`` -- every Kubernetes object the
  program declares, as the API server would receive it;
- ``outputs.yaml`` -- the stack outputs, checked against ``infra/contract.py``.

The tree is committed; a test regenerates it and fails when it is stale, so an
infra change always shows as a plain diff in the pull request.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pulumi
import pulumi.runtime.settings as runtime_settings
import yaml
from pulumi.runtime import rpc
from pulumi.runtime.mocks import MockMonitor

ROOT = Path(__file__).resolve().parent.parent
STACKS_DIR = ROOT / "stacks"
PLANS_DIR = ROOT / "plans"
PROJECT = "dualtrack"
ACCOUNT = "123456789012"
SECRET = "[secret]"  # noqa: S105 (the mask, not a password)
ENVIRONMENT_ORDER = ("dev", "staging", "prod")


def stack_names(stacks_dir: Path = STACKS_DIR) -> tuple[str, ...]:
    """Every ``stacks/Pulumi.<name>.yaml``: dev, staging, prod first, then the rest by name."""
    names = {p.name.split(".")[1] for p in stacks_dir.glob("Pulumi.*.yaml")}
    order = {name: i for i, name in enumerate(ENVIRONMENT_ORDER)}
    return tuple(sorted(names, key=lambda n: (order.get(n, len(order)), n)))


STACKS = stack_names()
ECR_TOKEN_CALL = "aws:ecr/getAuthorizationToken:getAuthorizationToken"  # noqa: S105 (a function name)


class PlanError(RuntimeError):
    """The plan could not be produced; the message is for the operator."""


@dataclass(frozen=True)
class PlannedResource:
    """One declared resource: ``inputs`` are what the program passed, secrets masked."""

    urn: str
    type: str
    name: str
    parent: str | None
    custom: bool
    inputs: dict[str, Any]
    depends_on: tuple[str, ...] = ()
    timeouts: dict[str, str] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    """Earlier names of the resource (``name`` of each alias spec): a rename that keeps state."""

    @property
    def is_kubernetes_object(self) -> bool:
        return self.custom and self.type.startswith("kubernetes:") and "apiVersion" in self.inputs

    def kubernetes_object(self) -> dict[str, Any]:
        """The object as sent to the API server (Pulumi adds nothing we need to keep)."""
        return {k: v for k, v in self.inputs.items() if k != "__meta"}


@dataclass
class Plan:
    stack: str
    resources: list[PlannedResource]
    outputs: dict[str, Any]
    seconds: float = 0.0
    reads: list[PlannedResource] = field(default_factory=list)

    def of_type(self, type_: str) -> list[PlannedResource]:
        return [r for r in self.resources if r.type == type_]

    def kubernetes_objects(self) -> list[dict[str, Any]]:
        return [r.kubernetes_object() for r in self.resources if r.is_kubernetes_object]


# --------------------------------------------------------------------------- mocks


def _mask(value: Any) -> Any:
    """Replace every Pulumi secret (wrapped by the RPC layer) with ``[secret]``.

    A secret mapping keeps its keys (``stringData: {admin-password: [secret]}``): they are
    names, not secrets, and the object stays schema-valid.
    """
    if rpc.is_rpc_secret(value):
        inner = rpc.unwrap_rpc_secret(value)
        return {str(k): SECRET for k in inner} if isinstance(inner, dict) else SECRET
    if isinstance(value, dict):
        return {k: _mask(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask(v) for v in value]
    return value


def _plain(value: Any) -> Any:
    """Inputs as YAML-able data: resource references become a marker."""
    if isinstance(value, pulumi.Resource):
        return f"<resource {type(value).__name__}>"
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _service(type_: str) -> str:
    """``aws:s3/bucket:Bucket`` -> ``s3``."""
    return type_.split(":")[1].split("/")[0]


class PlanMocks(pulumi.runtime.Mocks):
    """Deterministic stand-ins for what AWS/Kubernetes would compute (ids, ARNs, endpoints)."""

    def __init__(self, region: str, stack: str) -> None:
        self.region = region
        self.stack = stack

    def new_resource(self, args: Any) -> tuple[str, dict[str, Any]]:
        name, inputs, type_ = args.name, dict(args.inputs), args.typ
        state: dict[str, Any] = dict(inputs)
        if type_.startswith("aws:"):
            state.setdefault(
                "arn",
                f"arn:aws:{_service(type_)}:{self.region}:{ACCOUNT}:{type_.rsplit(':', 1)[1].lower()}/{name}",
            )
            state.setdefault("name", inputs.get("name") or f"{name}-plan")
        extra = {
            "aws:eks/cluster:Cluster": lambda: {
                "endpoint": f"https://{name}.gr7.{self.region}.eks.amazonaws.com",
                "certificateAuthority": {"data": "LS0tLS1CRUdJTiBQTEFOIENBLS0tLS0K"},
                "identities": [
                    {
                        "oidcs": [
                            {
                                "issuer": f"https://oidc.eks.{self.region}.amazonaws.com/id/PLAN{self.stack.upper()}"
                            }
                        ]
                    }
                ],
            },
            "aws:ec2/launchTemplate:LaunchTemplate": lambda: {"latestVersion": 1},
            "aws:eks/nodeGroup:NodeGroup": lambda: {
                "resources": [{"autoscalingGroups": [{"name": f"eks-{name}-plan"}]}]
            },
            "aws:msk/configuration:Configuration": lambda: {"latestRevision": 1},
            "aws:msk/cluster:Cluster": lambda: {
                "arn": f"arn:aws:kafka:{self.region}:{ACCOUNT}:cluster/{inputs.get('clusterName')}/plan-uuid",
                "bootstrapBrokersSaslIam": ",".join(
                    f"b-{i}.{inputs.get('clusterName')}.plan.c2.kafka.{self.region}.amazonaws.com:9098"
                    for i in range(1, int(inputs.get("numberOfBrokerNodes", 2)) + 1)
                ),
            },
            "aws:s3/bucket:Bucket": lambda: {"bucket": f"{inputs.get('bucketPrefix', name + '-')}plan"},
            "aws:kms/key:Key": lambda: {"keyId": f"{name}-key-id"},
            "aws:ecr/repository:Repository": lambda: {
                "registryId": ACCOUNT,
                "repositoryUrl": f"{ACCOUNT}.dkr.ecr.{self.region}.amazonaws.com/{inputs.get('name')}",
            },
            "docker:index/image:Image": lambda: {
                "repoDigest": f"{inputs.get('imageName')}@sha256:{'0' * 64}"
            },
            "kubernetes:core/v1:Service": lambda: (
                {
                    "status": {
                        "loadBalancer": {
                            "ingress": [{"hostname": f"{name}-plan.elb.{self.region}.amazonaws.com"}]
                        }
                    }
                }
                if args.resource_id
                else {}
            ),
        }.get(type_)
        if extra:
            state.update(extra())
        return f"{name}-id", state

    def call(self, args: Any) -> dict[str, Any]:
        if args.token == ECR_TOKEN_CALL:
            return {"userName": "AWS", "proxyEndpoint": "https://ecr.plan", "password": "plan-registry-token"}
        raise PlanError(f"the program calls {args.token}, which the offline plan does not model")


class RecordingMonitor(MockMonitor):
    """MockMonitor that also keeps each registration's parent and secret-masked inputs."""

    def __init__(self, mocks: pulumi.runtime.Mocks) -> None:
        super().__init__(mocks)
        self.recorded: list[PlannedResource] = []
        self.reads: list[PlannedResource] = []

    def _record(self, request: Any, props: Any, into: list[PlannedResource], custom: bool) -> None:
        timeouts = getattr(request, "customTimeouts", None)
        into.append(
            PlannedResource(
                urn=self.make_urn(request.parent, request.type, request.name),
                type=request.type,
                name=request.name,
                parent=request.parent.rsplit("::", 1)[-1] if request.parent else None,
                custom=custom,
                inputs=_plain(_mask(rpc.deserialize_properties(props))),
                depends_on=tuple(getattr(request, "dependencies", ()) or ()),
                aliases=tuple(a.spec.name for a in getattr(request, "aliases", ()) or () if a.spec.name),
                timeouts={
                    k: v for k in ("create", "update", "delete") if timeouts and (v := getattr(timeouts, k))
                },
            )
        )

    def RegisterResource(self, request: Any) -> Any:
        if request.type != "pulumi:pulumi:Stack":
            self._record(request, request.object, self.recorded, bool(request.custom))
        return super().RegisterResource(request)

    def ReadResource(self, request: Any) -> Any:
        self._record(request, request.properties, self.reads, True)
        return super().ReadResource(request)


# --------------------------------------------------------------------------- config


def stack_file(stack: str, stacks_dir: Path = STACKS_DIR) -> Path:
    return stacks_dir / f"Pulumi.{stack}.yaml"


def load_stack_config(stack: str, stacks_dir: Path = STACKS_DIR) -> dict[str, Any]:
    """The ``config:`` map of ``stacks/Pulumi.<stack>.yaml``."""
    path = stack_file(stack, stacks_dir)
    if not path.is_file():
        known = sorted(p.name.split(".")[1] for p in stacks_dir.glob("Pulumi.*.yaml"))
        raise PlanError(f"no stack file {path} (stacks: {', '.join(known) or 'none'})")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise PlanError(f"{path}: not valid YAML: {exc}") from None
    config = data.get("config") or {}
    if not isinstance(config, dict):
        raise PlanError(f"{path}: `config` must be a mapping of key -> value")
    return config


def runtime_config(config: Mapping[str, Any]) -> tuple[dict[str, str], list[str]]:
    """Stack-file config as the Pulumi runtime hands it to a program: strings, objects as JSON.

    ``secure:`` values (ciphertext only the CLI can decrypt) and unset secret settings
    become a placeholder: the plan never sees a real secret.
    """
    from infra.config import NAMESPACE, SECRET_KEYS

    values: dict[str, str] = {}
    secret_keys: list[str] = []
    for key, value in config.items():
        if isinstance(value, dict) and set(value) == {"secure"}:
            values[key], _ = f"[secret:{key}]", secret_keys.append(key)
        else:
            values[key] = value if isinstance(value, str) else json.dumps(value)
    for name in SECRET_KEYS:
        key = f"{NAMESPACE}:{name}"
        if key not in values:
            values[key] = f"[secret:{key}]"
            secret_keys.append(key)
    return values, secret_keys


# --------------------------------------------------------------------------- run


def run_program(
    stack: str, config: Mapping[str, Any] | None = None, *, stacks_dir: Path = STACKS_DIR
) -> Plan:
    """Run ``infra.program`` for ``stack`` under mocks; raises ConfigError/PlanError on bad input."""
    from infra import contract, program
    from infra.config import NAMESPACE, load_settings

    raw = dict(load_stack_config(stack, stacks_dir) if config is None else config)
    values, secret_keys = runtime_config(raw)
    settings = load_settings({k: v for k, v in values.items()})
    started = time.perf_counter()

    mocks = PlanMocks(settings.region, stack)
    monitor = RecordingMonitor(mocks)
    runtime_settings.ROOT.set(None)
    pulumi.runtime.set_all_config(values, secret_keys)
    pulumi.runtime.set_mocks(mocks, project=PROJECT, stack=stack, preview=False, monitor=monitor)

    outputs: dict[str, Any] = {}

    @pulumi.runtime.test
    def declare() -> Any:
        password = pulumi.Config(NAMESPACE).require_secret("grafanaAdminPassword")
        declared = program.build(settings, password)
        missing = set(contract.OUTPUT_KEYS) ^ set(declared)
        if missing:
            raise PlanError(f"program outputs differ from infra/contract.py: {sorted(missing)}")
        return pulumi.Output.all(**declared).apply(outputs.update)

    declare()
    for key in contract.SECRET_OUTPUTS:
        outputs[key] = SECRET
    return Plan(
        stack=stack,
        resources=list(monitor.recorded),
        outputs=outputs,
        seconds=time.perf_counter() - started,
        reads=list(monitor.reads),
    )


# --------------------------------------------------------------------------- write / diff


def _object_path(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    namespace = meta.get("namespace") or "_cluster"
    return f"kubernetes/{namespace}/{obj['kind']}-{meta.get('name', 'unnamed')}.yaml"


def _dump(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=True, default_flow_style=False, width=110, allow_unicode=True)


def render_plan(plan: Plan) -> dict[str, str]:
    """``{relative path: text}`` for the plan tree (deterministic)."""
    files: dict[str, str] = {}
    entries = []
    for res in sorted(plan.resources, key=lambda r: r.urn):
        entry: dict[str, Any] = {"type": res.type, "name": res.name}
        if res.parent:
            entry["parent"] = res.parent
        if res.timeouts:
            entry["timeouts"] = res.timeouts
        if res.is_kubernetes_object:
            obj = res.kubernetes_object()
            path = _object_path(obj)
            if path in files:
                raise PlanError(f"two Kubernetes objects render to {path}")
            files[path] = _dump(obj)
            entry["object"] = path
        elif res.custom:
            entry["inputs"] = res.inputs
        entries.append(entry)
    for read in sorted(plan.reads, key=lambda r: r.urn):
        entries.append({"type": read.type, "name": read.name, "parent": read.parent, "read": True})
    header = (
        f"# Offline plan of stack {plan.stack!r}: generated by `dualtrack plan --stack {plan.stack}`.\n"
        "# Do not edit; regenerate after changing infra/ or stacks/ and commit the diff.\n"
    )
    files["resources.yaml"] = header + _dump({"resources": entries})
    files["outputs.yaml"] = header + _dump(plan.outputs)
    return files


def write_plan(plan: Plan, plans_dir: Path | None = None) -> Path:
    """Replace ``plans/<stack>/`` with the rendered plan; returns that directory."""
    target = (plans_dir or PLANS_DIR) / plan.stack
    files = render_plan(plan)
    if target.exists():
        shutil.rmtree(target)
    for rel, text in files.items():
        path = target / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return target


def stale_files(plan: Plan, plans_dir: Path | None = None) -> list[str]:
    """Paths under ``plans/<stack>/`` that differ from a fresh render (added, changed or gone)."""
    target = (plans_dir or PLANS_DIR) / plan.stack
    fresh = render_plan(plan)
    on_disk = (
        {str(p.relative_to(target)): p.read_text(encoding="utf-8") for p in target.rglob("*.yaml")}
        if target.exists()
        else {}
    )
    return sorted(k for k in set(fresh) | set(on_disk) if fresh.get(k) != on_disk.get(k))


def diff_against(stacks: Iterable[str], rev: str) -> str:
    """Unified diff of each stack's fresh plan against ``plans/`` at git revision ``rev``."""
    import difflib

    chunks: list[str] = []
    for stack in stacks:
        fresh = render_plan(run_program(stack))
        listing = subprocess.run(
            ["git", "-C", str(ROOT), "ls-tree", "-r", "--name-only", rev, "--", f"plans/{stack}/"],
            capture_output=True,
            text=True,
            check=False,
        )
        if listing.returncode != 0:
            raise PlanError(f"git cannot read revision {rev!r}: {listing.stderr.strip()}")
        old: dict[str, str] = {}
        for path in listing.stdout.split():
            shown = subprocess.run(
                ["git", "-C", str(ROOT), "show", f"{rev}:{path}"], capture_output=True, text=True, check=True
            )
            old[path.removeprefix(f"plans/{stack}/")] = shown.stdout
        for rel in sorted(set(fresh) | set(old)):
            a, b = old.get(rel, ""), fresh.get(rel, "")
            if a != b:
                chunks.extend(
                    difflib.unified_diff(
                        a.splitlines(keepends=True),
                        b.splitlines(keepends=True),
                        fromfile=f"{rev}:plans/{stack}/{rel}",
                        tofile=f"plans/{stack}/{rel}",
                    )
                )
    return "".join(chunks)
