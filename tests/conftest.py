"""Shared fixtures: the real offline embedding model (loaded once), Milvus Lite
embedded per test, a Milvus Lite server and a Kafka-protocol broker per session."""

from __future__ import annotations

import itertools
import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from services.config import Settings, load_settings
from services.kb.embedder import Embedder
from services.kb.service import KnowledgeBase
from tests.support import KafkaBroker, MilvusServer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TEST_MILVUS_URI = os.environ.get("DUALTRACK_TEST_MILVUS_URI")
TEST_MILVUS_FULL_TEXT = os.environ.get("DUALTRACK_TEST_MILVUS_FULL_TEXT", "true") == "true"
"""False where that server has no BM25 (Milvus before 2.5): the tests then run dense-only."""

# keep tests independent of a developer's dualtrack.toml / environment
for _key in [k for k in os.environ if k.startswith("DUALTRACK_")]:
    del os.environ[_key]
# settings made without make_settings keep their default audit log out of the home directory
os.environ["XDG_STATE_HOME"] = tempfile.mkdtemp(prefix="dualtrack-test-state-")


@pytest.fixture(autouse=True)
def _own_state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test's gateways keep their default audit log in the test's own directory (one writer
    per log: two gateways of one test name theirs, as make_settings does)."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))


@pytest.fixture(scope="session")
def embedder() -> Embedder:
    return Embedder(load_settings().embedding)


@pytest.fixture
def make_settings(tmp_path: Path) -> Any:
    """Settings with an embedded Milvus Lite database under tmp_path, plus overrides."""

    made = itertools.count()
    # DUALTRACK_TEST_MILVUS_URI (read before the DUALTRACK_ variables are cleared) points the
    # tests that use this fixture at a Milvus server instead, one new collection per test:
    # how benchmarks/with-standalone.sh runs them against Milvus standalone
    place = {"uri": str(tmp_path / "kb.db")}
    if TEST_MILVUS_URI:
        place = {
            "uri": TEST_MILVUS_URI,
            "collection": f"t_{uuid.uuid4().hex[:12]}",
            "full_text": TEST_MILVUS_FULL_TEXT,
        }

    def make(**overrides: Any) -> Settings:
        milvus = {**place, **overrides.pop("milvus", {})}
        # each gateway its own audit log (one writer per log directory)
        audit = {"dir": str(tmp_path / f"audit{next(made) or ''}"), **overrides.pop("audit", {})}
        return load_settings(milvus=milvus, audit=audit, **overrides)

    return make


@pytest.fixture
def kb(make_settings: Any, embedder: Embedder) -> Iterator[KnowledgeBase]:
    knowledge = KnowledgeBase(make_settings(), embedder=embedder)
    knowledge.start()
    yield knowledge
    knowledge.close()


@pytest.fixture(scope="session")
def milvus_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MilvusServer]:
    server = MilvusServer(tmp_path_factory.mktemp("milvus") / "data").start()
    yield server
    server.stop()


@pytest.fixture
def own_milvus_server(tmp_path: Path) -> Iterator[MilvusServer]:
    """A Milvus Lite server for one test: for tests that leave it busy (a write given up on
    keeps running there), so the next test's server answers at once."""
    (tmp_path / "own-milvus").mkdir()
    server = MilvusServer(tmp_path / "own-milvus" / "data").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    broker = KafkaBroker(tmp_path_factory.mktemp("kafka")).start()
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def site_kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    """A second broker: the site's own Kafka, where Debezium writes (the other is the cloud's)."""
    broker = KafkaBroker(tmp_path_factory.mktemp("site-kafka")).start()
    yield broker
    broker.stop()
