"""Stack settings: the committed stacks load; every kind of bad config fails with a message
that names the key, the value and what is allowed."""

from __future__ import annotations

import pytest

from dualtrack.plan import STACKS, load_stack_config, run_program, runtime_config
from infra.catalog import GPU_INSTANCES, model_profiles
from infra.config import ConfigError, load_settings


def _error(config: dict) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(runtime_config(config)[0])
    return str(info.value)


@pytest.mark.parametrize("stack", STACKS)
def test_committed_stacks_are_valid(stack: str) -> None:
    settings = load_settings(runtime_config(load_stack_config(stack))[0])
    assert settings.environment == stack
    assert settings.gpus_per_replica <= GPU_INSTANCES[settings.gpu_nodes.instance_type].gpus


def test_environments_match_the_issue() -> None:
    dev, prod = (load_settings(runtime_config(load_stack_config(s))[0]) for s in ("dev", "prod"))
    assert dev.gpu_nodes.capacity == "spot" and dev.gpu_nodes.on_demand_fallback
    assert dev.serving.profile.startswith("deepseek-r1-distill") and dev.gpu_nodes.desired_size == 1
    assert not dev.nat_per_az
    assert prod.serving.profile == "deepseek-r1-671b-fp8"
    assert GPU_INSTANCES[prod.gpu_nodes.instance_type].gpu == "H200"
    assert prod.gpu_nodes.capacity == "on-demand" and prod.nat_per_az
    assert prod.tensor_parallel == 8 and prod.serving.model.expert_parallel == 8


def test_unknown_instance_type(stack_config) -> None:
    config = stack_config("dev")
    config["dualtrack:gpuNodes"]["instanceType"] = "p9.mega"
    message = _error(config)
    assert "dualtrack:gpuNodes.instanceType: 'p9.mega'" in message
    assert "unknown GPU instance type" in message and "p5en.48xlarge" in message and "g6e.xlarge" in message


def test_671b_on_a100_is_refused(stack_config) -> None:
    config = stack_config("prod")
    config["dualtrack:gpuNodes"]["instanceType"] = "p4d.24xlarge"
    message = _error(config)
    assert "dualtrack:gpuNodes.instanceType: 'p4d.24xlarge'" in message
    assert "A100" in message and "does not support" in message
    assert "allowed instance types: p5e.48xlarge, p5en.48xlarge" in message


def test_671b_on_h100_needs_two_nodes(stack_config) -> None:
    config = stack_config("prod")
    config["dualtrack:gpuNodes"]["instanceType"] = "p5.48xlarge"
    message = _error(config)
    assert "needs 16 GPUs per replica" in message and "has 8" in message
    assert "allowed instance types: p5e.48xlarge, p5en.48xlarge" in message


def test_tensor_parallel_larger_than_node(stack_config) -> None:
    config = stack_config("dev")
    config["dualtrack:serving"]["tensorParallel"] = 4
    message = _error(config)
    assert "dualtrack:serving.tensorParallel: 4" in message
    assert "g6e.xlarge has 1" in message and "allowed: 1 to 1" in message


def test_weights_that_do_not_fit(stack_config) -> None:
    config = stack_config("dev")
    config["dualtrack:serving"]["profile"] = "deepseek-r1-distill-qwen-32b"
    config["dualtrack:gpuNodes"]["instanceType"] = "g6e.xlarge"
    message = _error(config)
    # the 32B profile wants tp 4: refused for the node size before memory is even considered
    assert "dualtrack:gpuNodes.instanceType: 'g6e.xlarge'" in message and "needs 4 GPUs" in message


def test_negative_node_count(stack_config) -> None:
    config = stack_config("dev")
    config["dualtrack:gpuNodes"]["minSize"] = -1
    assert "dualtrack:gpuNodes.minSize: -1 -- Input should be greater than or equal to 0" in _error(config)


def test_unordered_node_counts(stack_config) -> None:
    config = stack_config("dev")
    config["dualtrack:gpuNodes"]["desiredSize"] = 5
    assert "minSize <= desiredSize <= maxSize" in _error(config)


def test_missing_required_key(stack_config) -> None:
    config = stack_config("dev")
    del config["dualtrack:mesh"]
    assert "dualtrack:mesh: required setting is missing" in _error(config)
    config = stack_config("dev")
    del config["dualtrack:serving"]["profile"]
    assert "dualtrack:serving.profile: required setting is missing" in _error(config)


def test_image_tag_latest(stack_config) -> None:
    config = stack_config("dev")
    config["dualtrack:serving"]["tritonVersion"] = "latest"
    message = _error(config)
    assert "dualtrack:serving.tritonVersion: 'latest'" in message and "never latest" in message
    config = stack_config("dev")
    config["dualtrack:serving"]["syncImage"] = "amazon/aws-cli:latest"
    assert "dualtrack:serving.syncImage" in _error(config)


def test_unknown_profile_lists_profiles(stack_config) -> None:
    config = stack_config("dev")
    config["dualtrack:serving"]["profile"] = "gpt-5"
    message = _error(config)
    assert "dualtrack:serving.profile: 'gpt-5'" in message
    assert all(name in message for name in model_profiles())


def test_misspelt_keys_are_errors(stack_config) -> None:
    config = stack_config("dev")
    config["dualtrack:gpuNodes"]["instanceTyp"] = "g6e.xlarge"
    message = _error(config)
    assert "dualtrack:gpuNodes.instanceTyp: unknown setting" in message and "instanceType" in message
    config = stack_config("dev")
    config["dualtrack:netwrk"] = {}
    assert "dualtrack:netwrk: unknown setting; allowed:" in _error(config)


def test_open_cidrs_are_refused(stack_config) -> None:
    config = stack_config("dev")
    config["dualtrack:cluster"]["publicAccessCidrs"] = ["0.0.0.0/0"]
    assert "dualtrack:cluster.publicAccessCidrs" in _error(config)
    config = stack_config("dev")
    config["dualtrack:onpremEgressCidrs"] = ["10.0.0.300/24"]
    assert "dualtrack:onpremEgressCidrs[0]" in _error(config)


def test_several_problems_are_reported_together(stack_config) -> None:
    config = stack_config("dev")
    config["dualtrack:gpuNodes"]["minSize"] = -1
    config["dualtrack:serving"]["tritonVersion"] = "latest"
    message = _error(config)
    assert "minSize" in message and "tritonVersion" in message


def test_bad_config_stops_the_plan_before_any_resource(stack_config) -> None:
    config = stack_config("dev")
    config["dualtrack:gpuNodes"]["instanceType"] = "p9.mega"
    with pytest.raises(ConfigError):
        run_program("dev", config)


def test_profile_table_is_consistent() -> None:
    profiles = model_profiles()
    assert {"deepseek-r1-671b-fp8", "deepseek-v3-671b-fp8"} <= set(profiles)
    for name in ("deepseek-r1-671b-fp8", "deepseek-v3-671b-fp8"):
        p = profiles[name]
        assert p.path == "pytorch" and p.precision == "fp8" and p.expert_parallel == 8
        assert p.tensor_parallel_on("H200") == 8 and p.tensor_parallel_on("H100") == 16
        assert "A100" not in p.gpu_types and p.startup_timeout_s >= 3600
    distills = [p for p in profiles.values() if "distill" in p.name]
    assert len(distills) == 6 and {p.family for p in distills} == {"qwen2", "llama"}


def test_vpc_too_small_for_its_zones(stack_config) -> None:
    config = stack_config("prod")  # three AZs: four /20s
    config["dualtrack:network"]["cidr"] = "10.42.0.0/19"
    message = _error(config)
    assert "dualtrack:network.cidr: '10.42.0.0/19'" in message and "needs 4 x /20" in message
    assert "/18 or larger" in message


def test_g6e_memory_is_its_own() -> None:
    assert GPU_INSTANCES["g6e.xlarge"].memory_gib == 32 and GPU_INSTANCES["g6.xlarge"].memory_gib == 16
    assert GPU_INSTANCES["g6e.12xlarge"].memory_gib == 384


def test_pipeline_roles_must_be_role_arns(stack_config) -> None:
    config = stack_config("dev")
    config["dualtrack:cluster"]["adminRoleArns"] = ["arn:aws:iam::123:user/bob"]
    assert "dualtrack:cluster.adminRoleArns" in _error(config)


def test_streaming_profiles_detokenize_in_order() -> None:
    from pydantic import ValidationError

    from infra.catalog import ModelProfile

    row = model_profiles()["deepseek-r1-distill-qwen-7b"].model_dump()
    with pytest.raises(ValidationError, match="postprocessing_instances must be 1 for a streaming"):
        ModelProfile(**{**row, "postprocessing_instances": 2})
    assert (
        ModelProfile(**{**row, "postprocessing_instances": 2, "decoupled": False}).postprocessing_instances
        == 2
    )


PUBLIC_JWK = {"kty": "EC", "crv": "P-256", "kid": "gw-1", "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
              "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}  # fmt: skip


def test_jwt_keys_inline_or_by_uri(stack_config) -> None:
    """A private issuer on premises: Istio cannot fetch its JWKS, so the public keys go inline."""
    import json

    config = stack_config("dev")
    config["dualtrack:mesh"]["jwt"] = {
        "issuer": "https://gateway.onprem.example.com",
        "jwks": json.dumps({"keys": [PUBLIC_JWK]}),
    }
    plan = run_program("dev", config)
    (rule,) = next(
        o
        for o in plan.kubernetes_objects()
        if o["kind"] == "RequestAuthentication" and o["metadata"]["namespace"] == "istio-ingress"
    )["spec"]["jwtRules"]
    assert json.loads(rule["jwks"]) == {"keys": [PUBLIC_JWK]} and "jwksUri" not in rule
    with_private = {**PUBLIC_JWK, "d": "jpsQnnGQmL-YBIffH1136cspYG6-0iY7X1fCE9-E9LI"}
    config["dualtrack:mesh"]["jwt"]["jwks"] = json.dumps({"keys": [with_private]})
    message = _error(config)
    assert "dualtrack:mesh.jwt.jwks" in message and "private or symmetric key material (d)" in message
    assert "jpsQnn" not in message  # the secret is not repeated in the error
    config["dualtrack:mesh"]["jwt"]["jwks"] = "not json"
    assert "not a JWK set" in _error(config)
    config["dualtrack:mesh"]["jwt"]["jwksUri"] = "https://gateway.onprem.example.com/jwks.json"
    config["dualtrack:mesh"]["jwt"]["jwks"] = json.dumps({"keys": [PUBLIC_JWK]})
    assert "set exactly one of jwks (inline public keys) and jwksUri" in _error(config)


def test_kubernetes_version_must_suit_istio(stack_config) -> None:
    config = stack_config("dev")
    config["dualtrack:cluster"]["version"] = "1.34"
    message = _error(config)
    assert "dualtrack:cluster.version: '1.34'" in message
    assert "Istio 1.27.3 supports Kubernetes 1.29 to 1.33" in message
    config["dualtrack:mesh"]["istioVersion"] = "1.28.1"
    load_settings(runtime_config(config)[0])  # a newer Istio admits 1.34
    config["dualtrack:mesh"]["istioVersion"] = "1.19.0"
    assert "dualtrack:mesh.istioVersion: '1.19.0'" in _error(config)


def test_gpu_memory_is_counted_in_the_vendors_gigabytes() -> None:
    h200 = GPU_INSTANCES["p5en.48xlarge"]
    assert h200.gpu_memory_gb == 141 and round(h200.gpu_memory_gib, 1) == 131.3
