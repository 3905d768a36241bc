"""The stack-output contract the on-prem run relies on."""

from __future__ import annotations

import json

import pytest

from dualtrack.plan import Plan
from infra.contract import OUTPUT_KEYS, SECRET_OUTPUTS, ContractError, StackOutputs, parse_outputs


def _good(plans: dict[str, Plan]) -> dict:
    return {**plans["dev"].outputs, "kubeconfig": json.dumps({"apiVersion": "v1", "kind": "Config"})}


def test_keys_are_the_models_aliases() -> None:
    assert tuple(f.alias for f in StackOutputs.model_fields.values()) == OUTPUT_KEYS
    assert "kubeconfig" in SECRET_OUTPUTS and len(OUTPUT_KEYS) == len(set(OUTPUT_KEYS)) == 18


def test_parses_pulumi_stack_output_json(plans: dict[str, Plan]) -> None:
    parsed = parse_outputs(json.dumps(_good(plans)))
    assert parsed.kafka_security_protocol == "SASL_SSL" and parsed.model_name == "deepseek-r1-distill-qwen-7b"
    assert "Config" in parsed.kubeconfig.get_secret_value() and "Config" not in repr(parsed)


def test_missing_output_is_named(plans: dict[str, Plan]) -> None:
    outputs = _good(plans)
    del outputs["kafkaBootstrapBrokers"]
    with pytest.raises(ContractError, match="stack output 'kafkaBootstrapBrokers' is missing"):
        parse_outputs(outputs)


def test_mistyped_output_is_named(plans: dict[str, Plan]) -> None:
    outputs = {**_good(plans), "tritonHttpEndpoint": "http://plain", "kafkaSaslMechanism": "PLAIN"}
    with pytest.raises(ContractError) as info:
        parse_outputs(outputs)
    message = str(info.value)
    assert "'tritonHttpEndpoint': 'http://plain'" in message and "'kafkaSaslMechanism': 'PLAIN'" in message


def test_secret_value_is_not_echoed(plans: dict[str, Plan]) -> None:
    with pytest.raises(ContractError) as info:
        parse_outputs({**_good(plans), "kubeconfig": {"not": "a string"}})
    assert "[secret]" in str(info.value) and "not" not in str(info.value).split("kubeconfig")[1][:40]


def test_unknown_output_and_bad_json(plans: dict[str, Plan]) -> None:
    with pytest.raises(ContractError, match="'surprise' is not part of the contract"):
        parse_outputs({**_good(plans), "surprise": 1})
    with pytest.raises(ContractError, match="not JSON"):
        parse_outputs("{oops")
    with pytest.raises(ContractError, match="JSON object"):
        parse_outputs("[1, 2]")
