"""The engine build the Pulumi Job runs: commands per engine-path profile."""

from __future__ import annotations

import shlex

import pytest

from infra.catalog import model_profiles
from infra.engine_build import engine_build_commands, engine_build_script

DIRS = {"checkpoint_dir": "/work/checkpoint", "work_dir": "/work/trtllm", "engine_dir": "/work/engine"}
ENGINE_PROFILES = [p for p in model_profiles().values() if p.path == "engine"]


@pytest.mark.parametrize("profile", ENGINE_PROFILES, ids=lambda p: p.name)
def test_commands_follow_the_profile(profile) -> None:
    convert, build = engine_build_commands(profile, profile.tensor_parallel, **DIRS)
    family = {"qwen2": "/qwen/", "llama": "/llama/"}[profile.family]
    assert convert[0] == "python3" and family in convert[1] and convert[1].endswith("convert_checkpoint.py")
    args = dict(zip(convert[2::2], convert[3::2], strict=True))
    assert args["--tp_size"] == str(profile.tensor_parallel) and args["--dtype"] == "bfloat16"
    assert args["--model_dir"] == "/work/checkpoint" and args["--output_dir"] == "/work/trtllm"
    assert build[0] == "trtllm-build"
    opts = dict(zip(build[1::2], build[2::2], strict=True))
    assert opts["--checkpoint_dir"] == "/work/trtllm" and opts["--output_dir"] == "/work/engine"
    assert opts["--max_batch_size"] == str(profile.max_batch_size)
    assert int(opts["--max_seq_len"]) == profile.max_input_len + profile.max_output_len


def test_script_is_fail_fast_and_quoted() -> None:
    profile = ENGINE_PROFILES[0]
    script = engine_build_script(
        profile, 2, checkpoint_dir="/work/my checkpoint", work_dir="/w", engine_dir="/e"
    )
    lines = script.splitlines()
    assert lines[0] == "set -euo pipefail" and len(lines) == 3
    assert shlex.split(lines[1])[shlex.split(lines[1]).index("--model_dir") + 1] == "/work/my checkpoint"


def test_pytorch_profiles_have_no_engine() -> None:
    with pytest.raises(ValueError, match="pytorch path"):
        engine_build_commands(model_profiles()["deepseek-r1-671b-fp8"], 8, **DIRS)
