"""Facts the stack settings are checked against: GPU instance types and model profiles.

Instances are AWS facts, so they are code; model profiles are data in
``model_repo/profiles.yaml`` (one table, shared with the model-repository tooling).
Both are read-only: validation in :mod:`infra.config` refuses a combination that
cannot run (a profile on a GPU it does not support, more GPUs than a node has,
weights that do not fit) before any resource is declared.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

GpuType = Literal["A10G", "L4", "L40S", "A100", "H100", "H200"]

PROFILES_FILE = Path(__file__).resolve().parent.parent / "model_repo" / "profiles.yaml"


class GpuInstance(BaseModel):
    """One EC2 instance type with GPUs: what the serving pod may ask of a node."""

    model_config = ConfigDict(frozen=True)

    gpu: GpuType
    gpus: int
    gpu_memory_gb: int
    """Per GPU, as the vendor states it: decimal gigabytes (H200: 141 GB = 131 GiB)."""
    vcpus: int
    memory_gib: int

    @property
    def gpu_memory_gib(self) -> float:
        return self.gpu_memory_gb * 1e9 / 2**30


def _family(gpu: GpuType, mem: int, sizes: dict[str, tuple[int, int, int]]) -> dict[str, GpuInstance]:
    return {
        name: GpuInstance(gpu=gpu, gpus=g, gpu_memory_gb=mem, vcpus=c, memory_gib=m)
        for name, (g, c, m) in sizes.items()
    }


_G_SIZES = {  # size: (gpus, vcpus, memory GiB) -- g5 and g6; g6e has twice the memory
    "xlarge": (1, 4, 16),
    "2xlarge": (1, 8, 32),
    "4xlarge": (1, 16, 64),
    "8xlarge": (1, 32, 128),
    "16xlarge": (1, 64, 256),
    "12xlarge": (4, 48, 192),
    "24xlarge": (4, 96, 384),
    "48xlarge": (8, 192, 768),
}

GPU_INSTANCES: dict[str, GpuInstance] = {
    **_family("A10G", 24, {f"g5.{s}": v for s, v in _G_SIZES.items()}),
    **_family("L4", 24, {f"g6.{s}": v for s, v in _G_SIZES.items()}),
    **_family("L40S", 48, {f"g6e.{s}": (g, c, m * 2) for s, (g, c, m) in _G_SIZES.items()}),
    "p4d.24xlarge": GpuInstance(gpu="A100", gpus=8, gpu_memory_gb=40, vcpus=96, memory_gib=1152),
    "p4de.24xlarge": GpuInstance(gpu="A100", gpus=8, gpu_memory_gb=80, vcpus=96, memory_gib=1152),
    "p5.48xlarge": GpuInstance(gpu="H100", gpus=8, gpu_memory_gb=80, vcpus=192, memory_gib=2048),
    "p5e.48xlarge": GpuInstance(gpu="H200", gpus=8, gpu_memory_gb=141, vcpus=192, memory_gib=2048),
    "p5en.48xlarge": GpuInstance(gpu="H200", gpus=8, gpu_memory_gb=141, vcpus=192, memory_gib=2048),
}
"""GPU node types the stack knows (AWS instance facts). Anything else is refused by name."""

BYTES_PER_PARAMETER = {"fp8": 1, "fp16": 2, "bf16": 2}
WEIGHT_OVERHEAD = 1.1
"""Weights plus runtime buffers; KV cache comes out of what is left."""
USABLE_GPU_MEMORY = 0.9


class ModelProfile(BaseModel):
    """One row of ``model_repo/profiles.yaml`` (field meanings are documented there)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    model_id: str
    served_name: str = Field(pattern=r"^[a-z0-9][a-z0-9.\-]{0,62}$")
    family: Literal["deepseek_v3", "qwen2", "llama"]
    path: Literal["engine", "pytorch"]
    precision: Literal["fp8", "fp16", "bf16"]
    parameters_b: float = Field(gt=0)
    tensor_parallel: int = Field(ge=1)
    tensor_parallel_by_gpu: dict[GpuType, int] = {}
    pipeline_parallel: int = Field(1, ge=1)
    expert_parallel: int = Field(1, ge=1)
    gpu_types: tuple[GpuType, ...]
    max_batch_size: int = Field(ge=1)
    max_input_len: int = Field(ge=1)
    max_output_len: int = Field(ge=1)
    kv_cache_free_gpu_mem_fraction: float = Field(gt=0, lt=1)
    kv_cache_dtype: Literal["auto", "fp8"]
    decoupled: bool
    startup_timeout_s: int = Field(ge=60)
    reasoning: bool = Field(
        False,
        description="writes <think>...</think> before its answer (R1, distills); the gateway splits it",
    )
    # Triton/TRT-LLM serving knobs (model_repo templates); defaults suit every profile so far.
    tokenizer_dir: str = Field(
        "tokenizer", description="beside the model repository in the version's layout (or absolute)"
    )
    max_num_tokens: int = Field(
        8192, ge=1, description="tokens one executor iteration schedules; longer prompts prefill in chunks"
    )
    batching_strategy: Literal["inflight_fused_batching", "v1"] = "inflight_fused_batching"
    max_queue_delay_microseconds: int = Field(1000, ge=0)
    logits_datatype: Literal["TYPE_FP32", "TYPE_FP16", "TYPE_BF16"] = "TYPE_FP32"
    preprocessing_instances: int = Field(2, ge=1)
    postprocessing_instances: int = Field(
        1, ge=1, description="1 when streaming: parallel detokenizers would reorder streamed tokens"
    )

    @model_validator(mode="after")
    def _ordered_stream(self) -> ModelProfile:
        if self.decoupled and self.postprocessing_instances > 1:
            raise ValueError(
                "postprocessing_instances must be 1 for a streaming (decoupled) profile: several "
                "postprocessing instances finish streamed responses out of order"
            )
        return self

    @model_validator(mode="after")
    def _overrides_are_allowed_gpus(self) -> ModelProfile:
        stray = set(self.tensor_parallel_by_gpu) - set(self.gpu_types)
        if stray:
            raise ValueError(f"tensor_parallel_by_gpu names GPUs not in gpu_types: {sorted(stray)}")
        return self

    def tensor_parallel_on(self, gpu: GpuType) -> int:
        return self.tensor_parallel_by_gpu.get(gpu, self.tensor_parallel)

    def artifact_gib(self) -> float:
        """Bytes one served version moves (checkpoint or engines): parameters x bytes, in GiB."""
        return self.parameters_b * 1e9 * BYTES_PER_PARAMETER[self.precision] / 2**30

    def weights_gib(self) -> float:
        """GPU memory the weights take with runtime buffers, in GiB (KV cache comes from the rest)."""
        return self.artifact_gib() * WEIGHT_OVERHEAD


@cache
def model_profiles(path: Path = PROFILES_FILE) -> dict[str, ModelProfile]:
    """The profile table, validated once per process."""
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    return {name: ModelProfile(name=name, **row) for name, row in raw["profiles"].items()}
