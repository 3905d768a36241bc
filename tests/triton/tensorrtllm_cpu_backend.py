"""TEST DOUBLE -- a CPU stand-in for Triton's TensorRT-LLM backend (never used outside tests).

Installed by the test fixtures as the Python-based backend ``tensorrtllm``
(``backends/tensorrtllm/model.py``), so the real rendered ``tensorrt_llm``
config, the real preprocessing/postprocessing models and the real ensemble run
unchanged on a machine without a GPU. It honours TensorRT-LLM's tensor contract
(input_ids, input_lengths, request_output_len, streaming, end_id... ->
output_ids [batch, beam, len], sequence_length [batch, beam]) and "generates"
deterministically: it echoes the last tokens of the prompt, one response per
token when streaming.

Test hooks, all through the environment of the tritonserver process:
- ``DUALTRACK_TEST_RECORD``: a JSON-lines file; every request is appended
  (what the model received, how many tokens it sent, whether it was cancelled);
- ``DUALTRACK_TEST_TOKEN_DELAY_S``: seconds per generated token (a slow model); a file
  named ``delay`` next to the record file overrides it while it exists;
- a file named ``fail`` next to the record file: every request gets an error;
- ``DUALTRACK_TEST_ANSWER_PREFIX_IDS``: comma-separated token ids sent before the echo (a
  test makes the "answer" cite a passage with them).

Like the real backend it refuses to load without engines: ``gpt_model_path`` must be a
directory holding the engine's ``config.json``. It exports the request gauges the real
backend does (``nv_trt_llm_request_metrics{request_type=...}``), waiting = received and not
yet generating, so the autoscaling rule can be checked against a served model.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

ECHO_TOKENS = 24


def _optional(request, name, default):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return tensor.as_numpy().reshape(-1)[0] if tensor is not None else default


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        self.model_name = args["model_name"]
        config = json.loads(args["model_config"])
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)
        engines = Path(config["parameters"]["gpt_model_path"]["string_value"])
        if not (engines / "config.json").is_file():
            raise pb_utils.TritonModelException(f"no TensorRT-LLM engine (config.json) in {engines}")
        # the family must outlive its metrics: keep it on the model
        self.family = family = pb_utils.MetricFamily(
            name="nv_trt_llm_request_metrics",
            description="TRT LLM request metrics",
            kind=pb_utils.MetricFamily.GAUGE,
        )
        labels = {"model": self.model_name, "version": args["model_version"]}
        self.gauges = {
            k: family.Metric(labels={**labels, "request_type": k}) for k in ("waiting", "active", "max")
        }
        record = os.environ.get("DUALTRACK_TEST_RECORD")
        self.record = Path(record) if record else None
        self.delay = float(os.environ.get("DUALTRACK_TEST_TOKEN_DELAY_S", "0"))
        prefix = os.environ.get("DUALTRACK_TEST_ANSWER_PREFIX_IDS", "")
        self.prefix = np.array([int(i) for i in prefix.split(",") if i.strip()], dtype=np.int32)

    def _delay(self) -> float:
        """Per-token delay: a file ``delay`` next to the record overrides the environment."""
        if self.record is not None:
            override = self.record.parent / "delay"
            if override.exists():
                return float(override.read_text() or 0)
        return self.delay

    def _pace(self, tokens: int) -> None:
        """Sleep the per-token delay, re-read for every token so a test can lift it mid-request."""
        for _ in range(tokens):
            delay = self._delay()
            if delay:
                time.sleep(delay)

    def _log(self, entry: dict) -> None:
        if self.record is not None:
            with self.record.open("a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")

    def execute(self, requests: list):
        responses = []
        self.gauges["waiting"].set(float(len(requests)))
        for waiting, request in enumerate(requests):
            self.gauges["waiting"].set(float(len(requests) - waiting - 1))
            self.gauges["active"].set(1.0)
            ids = pb_utils.get_input_tensor_by_name(request, "input_ids").as_numpy().reshape(-1)
            length = int(
                pb_utils.get_input_tensor_by_name(request, "input_lengths").as_numpy().reshape(-1)[0]
            )
            wanted = int(
                pb_utils.get_input_tensor_by_name(request, "request_output_len").as_numpy().reshape(-1)[0]
            )
            streaming = bool(_optional(request, "streaming", False))
            entry = {
                "model": self.model_name,
                "pid": os.getpid(),
                "input_ids": ids[:length].tolist(),
                "input_length": length,
                "request_output_len": wanted,
                "streaming": streaming,
                "end_id": int(_optional(request, "end_id", -1)),
                "cancelled": False,
                "tokens_sent": 0,
                "time": time.time(),
            }
            echo = ids[:length][-min(ECHO_TOKENS, wanted, length) :].astype(np.int32)
            generated = np.concatenate([self.prefix, echo])[: max(wanted, 1)]
            failing = self.record is not None and (self.record.parent / "fail").exists()
            if not self.decoupled:
                self._pace(len(generated))
                entry["tokens_sent"] = len(generated)
                self._log(entry)
                responses.append(self._error() if failing else self._response(generated))
                continue
            sender = request.get_response_sender()
            if failing:
                self._log(entry)  # before the final response: a client that got it finds the record
                sender.send(self._error(), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                continue
            chunks = [generated[i : i + 1] for i in range(len(generated))] if streaming else [generated]
            for chunk in chunks:
                if sender.is_cancelled():
                    entry["cancelled"] = True
                    break
                self._pace(len(chunk))
                sender.send(self._response(chunk))
                entry["tokens_sent"] += len(chunk)
            self._log(entry)  # before the final flag: a client that saw the end finds the record
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        self.gauges["active"].set(0.0)
        return None if self.decoupled else responses

    @staticmethod
    def _response(tokens: np.ndarray):
        return pb_utils.InferenceResponse(
            output_tensors=[
                pb_utils.Tensor("output_ids", tokens.reshape(1, 1, -1)),
                pb_utils.Tensor("sequence_length", np.array([[len(tokens)]], dtype=np.int32)),
            ]
        )

    @staticmethod
    def _error():
        return pb_utils.InferenceResponse(error=pb_utils.TritonError("injected backend failure (test)"))
