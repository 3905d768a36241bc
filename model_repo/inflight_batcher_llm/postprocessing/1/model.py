"""Triton Python model: generated token ids -> text, one string per beam.

The TensorRT-LLM step excludes the prompt from its output, so ids are decoded
as they are; when streaming, each response carries only its new tokens.
"""

from __future__ import annotations

import json

import numpy as np
import triton_python_backend_utils as pb_utils
from transformers import AutoTokenizer


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        params = {k: v["string_value"] for k, v in json.loads(args["model_config"])["parameters"].items()}
        self.tokenizer = AutoTokenizer.from_pretrained(params["tokenizer_dir"])

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            tokens = pb_utils.get_input_tensor_by_name(request, "TOKENS_BATCH").as_numpy()
            lengths = pb_utils.get_input_tensor_by_name(request, "SEQUENCE_LENGTH").as_numpy()
            tokens = tokens.reshape(tokens.shape[-2:]) if tokens.ndim > 2 else tokens  # [beam, len]
            lengths = lengths.reshape(-1)
            texts = [
                self.tokenizer.decode(beam[: int(n)].tolist(), skip_special_tokens=True)
                for beam, n in zip(tokens, lengths, strict=False)
            ]
            output = np.array([[t.encode("utf-8") for t in texts]], dtype=object)
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("OUTPUT", output)]))
        return responses
