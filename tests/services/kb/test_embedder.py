"""The embedder on the real offline model, and its errors when a model is missing."""

from __future__ import annotations

import numpy as np
import pytest

from services.config import DEPLOYMENT_MODEL, EmbeddingSettings
from services.kb.embedder import (
    BGE_QUERY_INSTRUCTION,
    Embedder,
    EmbedderError,
    default_query_instruction,
    resolve_model,
)


def test_vectors_are_384_d_normalised_and_semantic(embedder: Embedder) -> None:
    vecs = embedder.embed_passages(
        [
            "The robot battery lasts ten hours.",
            "Battery life of the robot is about 10 hours.",
            "Lunch is at noon.",
        ]
    )
    assert vecs.shape == (3, 384) and vecs.dtype == np.float32
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert vecs[0] @ vecs[1] > vecs[0] @ vecs[2] + 0.2
    assert embedder.embed_passages([]).shape == (0, 384)


def test_batches_give_the_same_vectors(embedder: Embedder) -> None:
    texts = [f"sentence number {i} about conveyor belts" for i in range(70)]
    whole = embedder.embed_passages(texts)
    parts = np.vstack([embedder.embed_passages(texts[:33]), embedder.embed_passages(texts[33:])])
    assert np.allclose(whole, parts, atol=1e-5)


def test_query_instruction_follows_the_model_family() -> None:
    assert default_query_instruction(DEPLOYMENT_MODEL) == BGE_QUERY_INSTRUCTION
    assert default_query_instruction("/models/bge-small-en-v1.5") == BGE_QUERY_INSTRUCTION
    assert default_query_instruction("packaged:all-MiniLM-L6-v2") == ""


def test_packaged_model_resolves_to_a_directory_inside_its_wheel() -> None:
    from pathlib import Path

    path = Path(resolve_model("packaged:all-MiniLM-L6-v2"))
    assert (path / "config.json").is_file() and "site-packages" in str(path)
    with pytest.raises(EmbedderError, match="unknown packaged model"):
        resolve_model("packaged:nope")


def test_hub_id_not_in_cache_is_a_named_offline_error(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache: the hub is unreachable here
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EmbedderError) as info:
        Embedder(EmbeddingSettings(model=DEPLOYMENT_MODEL))
    assert f"embedding.model = '{DEPLOYMENT_MODEL}'" in str(info.value)
    assert "offline" in str(info.value)


def test_missing_directory_is_a_named_error(tmp_path) -> None:
    with pytest.raises(EmbedderError, match="embedding.model = .*cannot load"):
        Embedder(EmbeddingSettings(model=str(tmp_path / "no-such-model")))


def test_query_vectors_are_kept_for_one_request_only(embedder: Embedder, monkeypatch) -> None:
    """Within a request each text is encoded once; another request (another context) starts
    empty, so the time a search takes says nothing about what someone else asked."""
    import contextvars

    from services.kb.embedder import keep_query_vectors

    encoded: list[str] = []
    real = embedder._encode
    monkeypatch.setattr(embedder, "_encode", lambda texts: (encoded.extend(texts), real(texts))[1])

    def request(texts: list[str]) -> np.ndarray:
        keep_query_vectors()
        first = embedder.embed_query(texts[0])
        both = embedder.embed_queries(texts)
        assert np.array_equal(both[0], first)
        return both

    contextvars.copy_context().run(request, ["where are the keys?", "who has them?"])
    assert len(encoded) == 2  # the question once, the other turn once
    contextvars.copy_context().run(request, ["where are the keys?", "who has them?"])
    assert len(encoded) == 4  # a new request encodes again
    embedder.embed_query("where are the keys?")
    embedder.embed_query("where are the keys?")
    assert len(encoded) == 6  # outside a request nothing is kept
