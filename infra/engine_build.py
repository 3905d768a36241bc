"""The TensorRT-LLM engine build for engine-path profiles, as data the build Job runs.

``convert_checkpoint`` turns the Hugging Face checkpoint into a TRT-LLM checkpoint
sharded for the profile's tensor/pipeline parallel sizes, ``trtllm-build``
compiles engines sized by the profile (batch, input, output). It needs the GPU
type it will serve on, so it runs in the cluster as a Kubernetes Job (see
``infra/components/serving.py``); nothing here can run on a machine without one.
"""

from __future__ import annotations

import shlex

from infra.catalog import ModelProfile

TRTLLM_EXAMPLES = "/app/tensorrt_llm/examples/models/core"
"""Where the Triton TRT-LLM NGC image keeps TensorRT-LLM's model examples."""

CONVERTERS = {"qwen2": "qwen", "llama": "llama"}
DTYPES = {"bf16": "bfloat16", "fp16": "float16"}


def engine_build_commands(
    profile: ModelProfile, tensor_parallel: int, *, checkpoint_dir: str, work_dir: str, engine_dir: str
) -> list[list[str]]:
    """argv lists, in order; raises for profiles served by the PyTorch path (no engine)."""
    if profile.path != "engine":
        raise ValueError(
            f"profile {profile.name!r} uses the {profile.path} path: there is no engine to build"
        )
    converter = f"{TRTLLM_EXAMPLES}/{CONVERTERS[profile.family]}/convert_checkpoint.py"
    return [
        [
            "python3",
            converter,
            "--model_dir",
            checkpoint_dir,
            "--output_dir",
            work_dir,
            "--dtype",
            DTYPES[profile.precision],
            "--tp_size",
            str(tensor_parallel),
            "--pp_size",
            str(profile.pipeline_parallel),
        ],
        [
            "trtllm-build",
            "--checkpoint_dir",
            work_dir,
            "--output_dir",
            engine_dir,
            "--gemm_plugin",
            "auto",
            "--max_batch_size",
            str(profile.max_batch_size),
            "--max_input_len",
            str(profile.max_input_len),
            "--max_seq_len",
            str(profile.max_input_len + profile.max_output_len),
            "--use_paged_context_fmha",
            "enable",
        ],
    ]


def engine_build_script(profile: ModelProfile, tensor_parallel: int, **dirs: str) -> str:
    """The commands as a fail-fast shell script (what the Job's container runs)."""
    lines = ["set -euo pipefail"]
    lines += [shlex.join(argv) for argv in engine_build_commands(profile, tensor_parallel, **dirs)]
    return "\n".join(lines) + "\n"
