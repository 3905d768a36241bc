"""The stack-output contract: what the cloud stack exports and the on-prem run reads.

One place for the output names and types. The Pulumi program exports exactly
these keys (:func:`export` refuses anything else), the offline plan checks the
values against :class:`StackOutputs`, and the on-prem driver validates
``pulumi stack output --json --show-secrets`` (or a CI export) with
:func:`parse_outputs` before Ansible runs, so a missing or mistyped output is a
clear error instead of a half-configured host.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError
from pydantic.alias_generators import to_camel


class ContractError(ValueError):
    """Stack outputs do not match the contract; the message names each key."""


class StackOutputs(BaseModel):
    """Exported by ``infra/__main__.py``; field aliases are the Pulumi output names."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, frozen=True, extra="forbid")

    environment: Literal["dev", "staging", "prod"]
    region: str = Field(pattern=r"^[a-z]{2}(-gov)?-[a-z]+-\d$")
    cluster_name: str = Field(min_length=1)
    service_hostname: str = Field(min_length=1, description="DNS name clients (the on-prem gateway) use")
    ingress_hostname: str = Field(min_length=1, description="Load balancer name to point that DNS name at")
    triton_http_endpoint: str = Field(pattern=r"^https://")
    triton_grpc_endpoint: str = Field(pattern=r"^[^/]+:\d+$")
    model_name: str = Field(min_length=1)
    model_profile: str = Field(min_length=1)
    model_bucket: str = Field(min_length=1)
    jwt_issuer: str = Field(pattern=r"^https://")
    jwt_audience: str = Field(min_length=1)
    kafka_bootstrap_brokers: str = Field(min_length=1, description="host:port,... (TLS + IAM)")
    kafka_topic: str = Field(min_length=1)
    kafka_security_protocol: Literal["SASL_SSL"]
    kafka_sasl_mechanism: Literal["AWS_MSK_IAM"]
    kafka_client_policy_arn: str = Field(pattern=r"^arn:")
    kubeconfig: SecretStr


OUTPUT_KEYS: tuple[str, ...] = tuple(f.alias or n for n, f in StackOutputs.model_fields.items())
SECRET_OUTPUTS: frozenset[str] = frozenset({"kubeconfig"})


def parse_outputs(raw: Mapping[str, Any] | str) -> StackOutputs:
    """Validate outputs (a mapping or the JSON text ``pulumi stack output --json`` prints)."""
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ContractError(f"stack outputs are not JSON: {exc.msg} at line {exc.lineno}") from None
    if not isinstance(raw, Mapping):
        raise ContractError("stack outputs must be a JSON object of output name -> value")
    try:
        return StackOutputs.model_validate(dict(raw))
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"])
            if err["type"] == "missing":
                lines.append(f"stack output {key!r} is missing (the cloud stack must export it)")
            elif err["type"] == "extra_forbidden":
                lines.append(
                    f"stack output {key!r} is not part of the contract (known: {', '.join(OUTPUT_KEYS)})"
                )
            else:
                shown = "[secret]" if key in SECRET_OUTPUTS else repr(err.get("input"))
                lines.append(f"stack output {key!r}: {shown} -- {err['msg']}")
        raise ContractError("\n".join(lines)) from None


def export(values: Mapping[str, Any]) -> None:
    """``pulumi.export`` every contract output, refusing a missing or unknown key."""
    import pulumi

    missing = [k for k in OUTPUT_KEYS if k not in values]
    extra = [k for k in values if k not in OUTPUT_KEYS]
    if missing or extra:
        raise ContractError(
            f"program outputs differ from infra/contract.py: missing {missing}, unknown {extra}"
        )
    for key in OUTPUT_KEYS:
        value = values[key]
        pulumi.export(key, pulumi.Output.secret(value) if key in SECRET_OUTPUTS else value)
