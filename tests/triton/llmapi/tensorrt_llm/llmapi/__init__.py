"""TEST DOUBLE -- ``tensorrt_llm.llmapi``: the config objects the LLM API takes (tests only)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KvCacheConfig:
    dtype: str = "auto"
    free_gpu_memory_fraction: float | None = None
    enable_block_reuse: bool = True
    max_tokens: int | None = None
