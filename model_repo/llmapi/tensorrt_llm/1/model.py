"""Triton Python model: DeepSeek through TensorRT-LLM's LLM API (PyTorch backend).

One model, chat messages (or text) in and text out. ``messages`` (a JSON list of
``{"role", "content"}``) is rendered with the checkpoint tokenizer's chat template --
DeepSeek's role markers come from there, never from the caller -- after every special-token
string inside a message is broken with a word joiner (so a document cannot write a control
token); a tokenizer without a template gets plain ``Role: content`` lines; ``text_input`` is
a raw prompt. ``initialize`` builds ``tensorrt_llm.LLM`` from the
arguments in ``model.yaml`` beside this file (tensor/expert/pipeline parallel sizes, KV
cache, ``max_num_tokens``, chunked prefill, ...); that loads the checkpoint onto the GPUs,
which for 671B takes a long time, so Triton reports ready only once the engine runs. Every
request becomes one ``generate_async`` on an event loop this model owns: the executor
batches requests in flight, Triton only hands them over (``max_batch_size: 0``).

Decoupled (streaming profiles): one response per new piece of text, each carrying the whole
text so far (the LLM-API contract), the last one flagged final. Responses go out from a
thread of their own, so a slow client never holds up the event loop the other streams share.
A client that goes away cancels: the model polls ``is_cancelled`` and aborts the generation,
which frees its KV cache -- as does every other way a request can end early. Stop strings end
a generation early. Every problem -- an empty prompt, a prompt over ``max_input_len`` tokens,
a bad parameter (INVALID_ARG), an engine error (INTERNAL) -- reaches the client as a Triton
error that names it, never as a hang.

Metrics: the request gauges TensorRT-LLM's C++ backend exports
(``nv_trt_llm_request_metrics{request_type="waiting"|"active"|"max"}``), so one recording
rule scales both serving paths -- Triton's own queue metrics never see a decoupled model's
requests wait. Here ``max`` is the executor's batch (``max_batch_size``), ``active`` the
requests it holds (at most ``max``) and ``waiting`` those beyond it: requests the executor
cannot schedule yet. (Requests held back for want of KV-cache blocks, below ``max``, are not
counted: the gauge never overstates the wait.)
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils
import yaml

CANCEL_POLL_S = 0.1
WORD_JOINER = "\u2060"
ROLES = ("system", "user", "assistant")
LLM_CONFIG = "model.yaml"


def _values(request: Any, name: str) -> np.ndarray | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy().reshape(-1)


def _scalar(request: Any, name: str, cast: type, default: Any = None) -> Any:
    values = _values(request, name)
    if values is None:
        return default
    if values.size != 1:
        raise ValueError(f"{name} must hold one value, got {values.size}")
    return cast(values[0].item() if hasattr(values[0], "item") else values[0])


def _text(value: Any) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)
        path = Path(args["model_repository"]) / args["model_version"] / LLM_CONFIG
        try:
            llm_args = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise pb_utils.TritonModelException(f"{path}: cannot read the LLM API settings: {exc}") from exc
        if not isinstance(llm_args, dict) or "model" not in llm_args:
            raise pb_utils.TritonModelException(f"{path}: expected a mapping with at least 'model'")
        self.max_input_len = int(llm_args["max_input_len"])
        self.max_output_len = int(llm_args["max_seq_len"]) - self.max_input_len

        # the image's TensorRT-LLM, imported on load only
        from tensorrt_llm import LLM, SamplingParams
        from tensorrt_llm.llmapi.llm_utils import update_llm_args_with_extra_dict

        self._sampling_params = SamplingParams
        self.max_batch_size = int(llm_args.get("max_batch_size", 1))
        # nested settings (kv_cache_config...) become the API's own config objects
        self.llm = LLM(**update_llm_args_with_extra_dict({}, llm_args))
        self.tokenizer = self.llm.tokenizer
        added = getattr(self.tokenizer, "added_tokens_decoder", {}) or {}
        specials = set(getattr(self.tokenizer, "all_special_tokens", [])) | {
            t.content for t in added.values()
        }
        self.specials = sorted((t for t in specials if len(t) > 1 and not t.isspace()), key=len, reverse=True)

        # Triton drops a family's metrics with it: the family lives as long as the model
        self._family = family = pb_utils.MetricFamily(
            name="nv_trt_llm_request_metrics",
            description="TRT LLM request metrics",
            kind=pb_utils.MetricFamily.GAUGE,
        )
        labels = {"model": args["model_name"], "version": args["model_version"]}
        self._gauges = {
            kind: family.Metric(labels={**labels, "request_type": kind})
            for kind in ("waiting", "active", "max")
        }
        self._gauges["max"].set(float(self.max_batch_size))
        self._in_flight = 0
        self._lock = threading.Lock()

        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="llmapi-loop", daemon=True)
        self._thread.start()
        self._outbox: queue.Queue = queue.Queue()
        self._sender = threading.Thread(target=self._send_loop, name="llmapi-responses", daemon=True)
        self._sender.start()

    # -- requests ---------------------------------------------------------------------------

    def _count(self, delta: int) -> None:
        with self._lock:
            self._in_flight += delta
            self._gauges["active"].set(float(min(self._in_flight, self.max_batch_size)))
            self._gauges["waiting"].set(float(max(0, self._in_flight - self.max_batch_size)))

    def _send_loop(self) -> None:
        """Deliver responses in order, off the event loop (a send waits for Triton's frontend)."""
        while (item := self._outbox.get()) is not None:
            sender, response, flags = item
            try:
                sender.send(response, flags=flags)
            except Exception as exc:  # the client is gone: nothing left to tell it
                pb_utils.Logger.log_warn(f"response not delivered: {exc!r}")

    def _neutralise(self, text: str) -> str:
        for token in self.specials:
            if token in text:
                text = text.replace(token, token[0] + WORD_JOINER + token[1:])
        return text

    def _prompt_ids(self, request: Any) -> list[int]:
        prompts = _values(request, "text_input")
        conversations = _values(request, "messages")
        if (prompts is None) == (conversations is None):
            raise ValueError("send exactly one of text_input and messages")
        if prompts is not None:
            if prompts.size != 1:
                raise ValueError("text_input must hold exactly one prompt")
            prompt = _text(prompts[0])
            if not prompt.strip():
                raise ValueError("the prompt is empty")
            return list(self.tokenizer.encode(prompt))
        if conversations.size != 1:
            raise ValueError("messages must hold exactly one conversation")
        try:
            messages = json.loads(_text(conversations[0]))
        except ValueError as exc:
            raise ValueError(f"messages is not JSON: {exc}") from None
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty JSON list")
        clean = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{i}] must be {{'role': system|user|assistant, 'content': text}}")
            content = m["content"]
            if m["role"] == "assistant":  # an earlier answer: its reasoning is not fed back
                content = content.rsplit("</think>", 1)[-1].lstrip()
            clean.append({"role": m["role"], "content": self._neutralise(content)})
        if not getattr(self.tokenizer, "chat_template", None):  # a base model: plain turns
            plain = "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in clean) + "Assistant:"
            return list(self.tokenizer.encode(plain))
        try:
            text = self.tokenizer.apply_chat_template(clean, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # the template refuses this conversation
            raise ValueError(f"the chat template failed: {exc}") from None
        return list(self.tokenizer.encode(text, add_special_tokens=False))  # the template wrote BOS

    def _parse(self, request: Any) -> tuple[list[int], Any, bool]:
        """Prompt ids, sampling parameters and the streaming flag, or ValueError naming the input."""
        ids = self._prompt_ids(request)
        if len(ids) > self.max_input_len:
            raise ValueError(
                f"the prompt has {len(ids)} tokens; this model accepts at most {self.max_input_len}"
            )
        wanted = _scalar(request, "sampling_param_max_tokens", int, self.max_output_len)
        if wanted < 1:
            raise ValueError("sampling_param_max_tokens must be >= 1")
        params: dict[str, Any] = {"max_tokens": min(wanted, self.max_output_len)}
        for name, key, cast in (
            ("sampling_param_temperature", "temperature", float),
            ("sampling_param_top_k", "top_k", int),
            ("sampling_param_top_p", "top_p", float),
        ):
            value = _scalar(request, name, cast)
            if value is not None:
                params[key] = value
        stop = _values(request, "sampling_param_stop")
        if stop is not None:
            params["stop"] = [_text(s) for s in stop if _text(s)]
        streaming = _scalar(request, "streaming", bool, False)
        if streaming and not self.decoupled:
            raise ValueError("streaming needs the decoupled (streaming) configuration of this model")
        return ids, self._sampling_params(**params), streaming

    @staticmethod
    def _response(result: Any) -> Any:
        output = result.outputs[0]
        tensors = [pb_utils.Tensor("text_output", np.array([output.text.encode("utf-8")], dtype=np.object_))]
        if result.finished and output.finish_reason:
            tensors.append(
                pb_utils.Tensor(
                    "finish_reason", np.array([str(output.finish_reason).encode()], dtype=np.object_)
                )
            )
        return pb_utils.InferenceResponse(output_tensors=tensors)

    @staticmethod
    def _error(message: str, code: Any) -> Any:
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))

    async def _watch(self, request: Any, generation: Any) -> bool:
        """Abort ``generation`` once the client cancels; True when that happened."""
        while True:
            if request.is_cancelled():
                generation.abort()
                return True
            await asyncio.sleep(CANCEL_POLL_S)

    async def _generate(self, request: Any, sender: Any | None) -> Any:
        """Run one request; streams through ``sender`` when given, returns the final response."""
        self._count(1)
        generation = watcher = None
        finished = False
        try:
            try:
                ids, params, streaming = self._parse(request)
            except ValueError as exc:  # the request's own fault
                return self._error(str(exc), pb_utils.TritonError.INVALID_ARG)
            generation = self.llm.generate_async(ids, sampling_params=params, streaming=streaming)
            watcher = asyncio.ensure_future(self._watch(request, generation))
            last = None
            async for result in generation:
                last, finished = result, result.finished
                if sender is not None and streaming and not finished and not watcher.done():
                    self._outbox.put((sender, self._response(result), 0))
            if watcher.done() and watcher.result():
                return self._error("the request was cancelled", pb_utils.TritonError.CANCELLED)
            if last is None:
                return self._error(
                    "the engine ended the request without output", pb_utils.TritonError.INTERNAL
                )
            return self._response(last)
        except Exception as exc:  # an engine failure: the client gets it, the model keeps serving
            pb_utils.Logger.log_error(f"generation failed: {exc!r}")
            return self._error(f"generation failed: {exc}", pb_utils.TritonError.INTERNAL)
        finally:
            if watcher is not None:
                watcher.cancel()
            if generation is not None and not finished:
                generation.abort()  # whatever ended the request early, free its slot and KV cache
            self._count(-1)

    async def _serve(self, request: Any) -> None:
        sender = request.get_response_sender()
        response = await self._generate(request, sender)
        self._outbox.put((sender, response, pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL))

    def execute(self, requests: list) -> list | None:
        if self.decoupled:
            for request in requests:
                asyncio.run_coroutine_threadsafe(self._serve(request), self.loop)
            return None
        futures = [asyncio.run_coroutine_threadsafe(self._generate(r, None), self.loop) for r in requests]
        return [f.result() for f in futures]

    def finalize(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self._outbox.put(None)
        self._sender.join(timeout=10)
        self.llm.shutdown()
