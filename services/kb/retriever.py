"""Query -> embedded query -> filtered top-k hits: dense and BM25 fused, or dense alone."""

from __future__ import annotations

from pymilvus import RRFRanker, WeightedRanker

from services.config import RetrievalSettings
from services.kb.access import Reader
from services.kb.embedder import Embedder
from services.kb.filters import SearchFilter
from services.kb.models import Hit
from services.kb.store import KnowledgeStore, Ranker


def ranker(settings: RetrievalSettings) -> Ranker:
    """The configured fusion of the dense and BM25 lists. RRF needs no tuning: it reads ranks
    only, so BM25's unbounded scores and cosine similarities need no common scale."""
    if settings.fusion == "weighted":
        return WeightedRanker(1.0 - settings.keyword_weight, settings.keyword_weight)
    return RRFRanker(settings.rrf_k)


class Retriever:
    """Top-k search with scores (cosine similarity) and an optional similarity threshold; hybrid
    where the collection keeps its BM25 index (``milvus.full_text``), else dense."""

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
        try:
            query.encode()
        except UnicodeEncodeError:
            raise ValueError("query is not valid Unicode (it holds a lone surrogate)") from None
        vector = self.embedder.embed_query(query)
        threshold = score_threshold if score_threshold is not None else self.settings.score_threshold
        limit = top_k or self.settings.top_k
        if self.store.keyword_ready():
            return self.store.hybrid_search(
                vector, query, limit, ranker(self.settings), flt, threshold, reader=reader
            )
        return self.store.search(vector, limit, flt, threshold, reader=reader)[0]
