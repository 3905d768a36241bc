"""TEST DOUBLE -- a CPU stand-in for TensorRT-LLM's LLM API (``tensorrt_llm.LLM``), tests only.

Put first on the import path of a real tritonserver's Python models (the replay's stand-in for
the serving image's environment, ``tests/infra/replay.py:image_python``), it lets the project's own LLM-API
Triton model (``model_repo/llmapi/tensorrt_llm/1/model.py``) run for real on a machine
without a GPU: only the GPU step is replaced. It is strict where the real library is:

- ``LLM(**kwargs)`` accepts only arguments TensorRT-LLM's LLM API has (unknown ones fail, as
  the real pydantic arguments do), needs a Hugging Face checkpoint directory (``config.json``)
  as ``model`` and loads ``tokenizer`` with transformers;
- a prompt longer than ``max_num_tokens`` is refused unless ``enable_chunked_prefill`` is on,
  and one longer than ``max_input_len`` always is (what the executor does);
- ``generate_async`` "generates" deterministically: it echoes the prompt's last tokens, one
  per step when streaming, and stops early at a stop string; ``abort()`` ends it as cancelled.

Hooks (environment of the tritonserver process): ``DUALTRACK_TEST_RECORD`` (JSON lines: every
request with what the model received -- its prompt's token ids -- and how it ended),
``DUALTRACK_TEST_TOKEN_DELAY_S`` (seconds a token; a file ``delay`` next to the record
overrides it while it exists).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

ECHO_TOKENS = 24
LLM_ARGS = {
    "model",
    "tokenizer",
    "backend",
    "tensor_parallel_size",
    "pipeline_parallel_size",
    "moe_expert_parallel_size",
    "max_batch_size",
    "max_num_tokens",
    "max_seq_len",
    "max_input_len",
    "enable_chunked_prefill",
    "kv_cache_config",
    "trust_remote_code",
    "dtype",
}


@dataclass
class SamplingParams:
    max_tokens: int = 32
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    stop: list[str] = field(default_factory=list)


@dataclass
class CompletionOutput:
    index: int = 0
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False


class _Generation:
    """What ``generate_async`` returns: an async iterator of RequestOutput, with ``abort``."""

    def __init__(self, llm: LLM, ids: list[int], params: SamplingParams, streaming: bool) -> None:
        self.llm, self.ids, self.params, self.streaming = llm, ids, params, streaming
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True

    def __aiter__(self):
        return self._run()

    async def _run(self):
        llm, params = self.llm, self.params
        if len(self.ids) > llm.max_input_len:
            raise ValueError(f"prompt length {len(self.ids)} exceeds max_input_len {llm.max_input_len}")
        if len(self.ids) > llm.max_num_tokens and not llm.chunked_prefill:
            raise ValueError(
                f"prompt length {len(self.ids)} exceeds max_num_tokens {llm.max_num_tokens} "
                "and chunked prefill is disabled"
            )
        tail = self.ids[-min(ECHO_TOKENS, params.max_tokens, len(self.ids)) :]
        entry = {
            "prompt_tokens": len(self.ids),
            "prompt_ids": self.ids,
            "max_tokens": params.max_tokens,
            "streaming": self.streaming,
            "stop": params.stop,
            "cancelled": False,
            "tokens_sent": 0,
            "time": time.time(),
        }
        out = CompletionOutput()
        delay = llm.delay()
        try:
            for i, token in enumerate(tail):
                if self.aborted:
                    out.finish_reason, entry["cancelled"] = "cancelled", True
                    break
                if delay:
                    await asyncio.sleep(delay)
                else:
                    await asyncio.sleep(0)
                out.token_ids.append(int(token))
                out.text = llm.tokenizer.decode(out.token_ids, skip_special_tokens=True)
                entry["tokens_sent"] = i + 1
                hit = next((s for s in params.stop if s in out.text), None)
                if hit is not None:
                    out.text, out.finish_reason = out.text[: out.text.index(hit)], "stop"
                    break
                if self.streaming and i < len(tail) - 1:
                    yield RequestOutput(self.ids, [CompletionOutput(0, out.text, list(out.token_ids))])
            out.finish_reason = out.finish_reason or "length"
            yield RequestOutput(self.ids, [out], finished=True)
        finally:
            llm.record(entry)


class LLM:
    def __init__(self, **kwargs: Any) -> None:
        unknown = sorted(set(kwargs) - LLM_ARGS)
        if unknown:
            raise ValueError(f"unknown LLM arguments: {unknown}")
        from tensorrt_llm.llmapi import KvCacheConfig

        if not isinstance(kwargs.get("kv_cache_config", KvCacheConfig()), KvCacheConfig):
            raise TypeError(
                "kv_cache_config must be a KvCacheConfig (update_llm_args_with_extra_dict makes one)"
            )
        if kwargs.get("backend") != "pytorch":
            raise ValueError("this stand-in serves the PyTorch backend only")
        checkpoint = Path(kwargs["model"])
        if not (checkpoint / "config.json").is_file():
            raise FileNotFoundError(f"no Hugging Face checkpoint (config.json) in {checkpoint}")
        self.tokenizer = AutoTokenizer.from_pretrained(kwargs.get("tokenizer") or str(checkpoint))
        self.max_input_len = int(kwargs.get("max_input_len", 1024))
        self.max_num_tokens = int(kwargs.get("max_num_tokens", 8192))
        self.chunked_prefill = bool(kwargs.get("enable_chunked_prefill", False))
        self.args = kwargs
        record = os.environ.get("DUALTRACK_TEST_RECORD")
        self._record = Path(record) if record else None
        self.record(
            {"loaded": {k: getattr(v, "__dict__", v) for k, v in kwargs.items()}, "time": time.time()}
        )

    def delay(self) -> float:
        override = self._record.parent / "delay" if self._record is not None else None
        if override is not None and override.exists():
            return float(override.read_text() or 0)
        return float(os.environ.get("DUALTRACK_TEST_TOKEN_DELAY_S", "0"))

    def record(self, entry: dict) -> None:
        if self._record is not None:
            with self._record.open("a", encoding="utf-8") as f:
                f.write(json.dumps(entry, default=str) + "\n")

    def generate_async(self, inputs: list[int], sampling_params: SamplingParams, streaming: bool = False):
        return _Generation(self, list(inputs), sampling_params, streaming)

    def shutdown(self) -> None:
        self.record({"shutdown": True})
