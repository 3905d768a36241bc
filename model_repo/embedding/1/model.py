"""Triton Python model: texts -> normalised embeddings with the knowledge base's own embedder.

Imports ``services.kb.embedder`` (the tritonserver launcher puts the repository and its
virtualenv on PYTHONPATH), so vectors are identical to the ones ingestion stores.
Queries get the model's query instruction when ``is_query`` is true.
"""

from __future__ import annotations

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from services.config import EmbeddingSettings
from services.kb.embedder import Embedder


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        params = {k: v["string_value"] for k, v in json.loads(args["model_config"])["parameters"].items()}
        self.embedder = Embedder(EmbeddingSettings(model=params["model"]))

    def execute(self, requests: list) -> list:
        texts, flags, sizes = [], [], []
        for request in requests:
            batch = pb_utils.get_input_tensor_by_name(request, "text").as_numpy().reshape(-1)
            query = pb_utils.get_input_tensor_by_name(request, "is_query")
            q = query.as_numpy().reshape(-1) if query is not None else np.zeros(len(batch), dtype=bool)
            texts += [t.decode("utf-8", errors="replace") if isinstance(t, bytes) else str(t) for t in batch]
            flags += [bool(f) for f in q]
            sizes.append(len(batch))
        vectors = np.zeros((len(texts), self.embedder.dimension), dtype=np.float32)
        docs = [i for i, f in enumerate(flags) if not f]
        queries = [i for i, f in enumerate(flags) if f]
        if docs:
            vectors[docs] = self.embedder.embed_passages([texts[i] for i in docs])
        for i in queries:
            vectors[i] = self.embedder.embed_query(texts[i])
        responses, start = [], 0
        for size in sizes:
            out = pb_utils.Tensor("embedding", vectors[start : start + size])
            responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
            start += size
        return responses
