"""TEST DOUBLE -- ``tensorrt_llm.llmapi.llm_utils.update_llm_args_with_extra_dict`` (tests only).

Like the real helper it merges extra settings into LLM arguments and turns the nested ones
it knows into their config objects; unknown fields of a nested config are errors.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from tensorrt_llm.llmapi import KvCacheConfig

NESTED = {"kv_cache_config": KvCacheConfig}


def update_llm_args_with_extra_dict(llm_args: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = {**llm_args, **extra}
    for key, cls in NESTED.items():
        if isinstance(merged.get(key), dict):
            unknown = set(merged[key]) - {f.name for f in fields(cls)}
            if unknown:
                raise ValueError(f"unknown {key} fields: {sorted(unknown)}")
            merged[key] = cls(**merged[key])
    return merged
