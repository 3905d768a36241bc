"""The knowledge base as one object: what the gateway, the CLI benchmark and
tests hold. It loads the model and connects to Milvus lazily and reports why it
is not ready instead of failing, so a gateway whose Milvus is down still
starts, answers ``/healthz`` and says what is wrong on ``/readyz``."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from services.config import Settings
from services.kb.access import EVERYTHING, Reader
from services.kb.answer import Answerer, ExtractiveAnswerer
from services.kb.embedder import Embedder
from services.kb.errors import EngineUnsupported, KBError, SchemaMismatch, StoreUnavailable
from services.kb.filters import SearchFilter
from services.kb.ingest import ChangeListener, Ingestor
from services.kb.models import Answer, Hit
from services.kb.retriever import Retriever
from services.kb.store import KnowledgeStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Readiness:
    model: bool
    milvus: bool
    reasons: list[str]
    notes: list[str] = field(default_factory=list)
    """What is served less well than configured (dense search while the BM25 index is pending)."""

    @property
    def ready(self) -> bool:
        return self.model and self.milvus


class KnowledgeBase:
    """Embedder + store + ingest + retrieval + answering for one collection."""

    def __init__(self, settings: Settings, embedder: Embedder | None = None) -> None:
        self.settings = settings
        self._embedder = embedder
        self._store: KnowledgeStore | None = None
        self._ingestor: Ingestor | None = None
        self._model_error: str | None = None
        self._lock = threading.RLock()
        self.answerer: Answerer | None = None
        self.listener: ChangeListener | None = None
        """Told about every successful local write (the sync publisher, when publishing)."""

    # -- lifecycle ---------------------------------------------------------------------------

    def load_model(self) -> None:
        """Load the embedding model (seconds); errors are kept for ``readiness``."""
        try:
            embedder = self._embedder or Embedder(self.settings.embedding)
        except KBError as exc:
            self._model_error = str(exc)
            log.error("embedding model not loaded: %s", exc)
            return
        with self._lock:
            self._embedder = embedder
            self._model_error = None

    def start(self) -> None:
        """Load the model and try Milvus once; never raises for either."""
        self.load_model()
        if self._embedder is not None:
            try:
                self.store.connect()
            except (EngineUnsupported, SchemaMismatch) as exc:  # waiting will not fix these
                log.error("the knowledge base cannot be served: %s", exc)
            except KBError as exc:
                log.warning("Milvus not ready yet: %s", exc)

    def close(self) -> None:
        if self._store is not None:
            self._store.close()

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            raise StoreUnavailable(self._model_error or "the embedding model is still loading")
        return self._embedder

    @property
    def store(self) -> KnowledgeStore:
        with self._lock:
            if self._store is None:
                self._store = KnowledgeStore(self.settings.milvus, self.embedder.dimension)
            return self._store

    @property
    def ingestor(self) -> Ingestor:
        with self._lock:
            if self._ingestor is None:
                self._ingestor = Ingestor(self.settings, self.embedder, self.store, self.listener)
            return self._ingestor

    def readiness(self) -> Readiness:
        reasons = []
        model = self._embedder is not None
        if not model:
            reasons.append(self._model_error or "embedding model loading")
        milvus = False
        if model:
            problem = self.store.ping()
            if problem is None:
                milvus = True
            else:
                reasons.append(problem)
        notes = [self.store.pending] if milvus and self.store.pending else []
        return Readiness(model=model, milvus=milvus, reasons=reasons, notes=notes)

    # -- operations --------------------------------------------------------------------------

    def search(
        self,
        query: str,
        top_k: int | None = None,
        score_threshold: float | None = None,
        flt: SearchFilter | None = None,
        *,
        reader: Reader = EVERYTHING,
    ) -> list[Hit]:
        """Hits ``reader`` may read. The default is the host operator's view (the CLI, benchmarks);
        the gateway always passes the signed-in principal's."""
        return Retriever(self.embedder, self.store, self.settings.retrieval).search(
            query, top_k, score_threshold, flt, reader=reader
        )

    def answer(self, question: str, hits: Sequence[Hit]) -> Answer:
        answerer = self.answerer or ExtractiveAnswerer(
            self.embedder, sentences=self.settings.retrieval.answer_sentences
        )
        return answerer.answer(question, hits)
