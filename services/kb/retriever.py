"""Query -> embedded query -> filtered top-k hits."""

from __future__ import annotations

from services.config import RetrievalSettings
from services.kb.access import Reader
from services.kb.embedder import Embedder
from services.kb.filters import SearchFilter
from services.kb.models import Hit
from services.kb.store import KnowledgeStore


class Retriever:
    """Top-k search with scores and an optional similarity threshold."""

    def __init__(self, embedder: Embedder, store: KnowledgeStore, settings: RetrievalSettings) -> None:
        self.embedder = embedder
        self.store = store
        self.settings = settings

    def search(
        self,
        query: str,
        top_k: int | None = None,
        score_threshold: float | None = None,
        flt: SearchFilter | None = None,
        *,
        reader: Reader,
    ) -> list[Hit]:
        if not query.strip():
            raise ValueError("query is empty")
        vector = self.embedder.embed_query(query)
        threshold = score_threshold if score_threshold is not None else self.settings.score_threshold
        return self.store.search(vector, top_k or self.settings.top_k, flt, threshold, reader=reader)[0]
