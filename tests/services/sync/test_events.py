"""The event schema (one definition, published as JSON Schema) and the sync settings."""

from __future__ import annotations

import json

import numpy as np
import pytest

from services.config import ConfigError, load_settings
from services.sync import events
from services.sync.kafka import client_config, consumer_config, producer_config
from tests.services.sync.conftest import delete, unit_vectors, upsert
from tests.support import ROOT


def test_an_event_survives_the_wire_exactly() -> None:
    vectors = unit_vectors(3, 384, seed=1)
    e = upsert("handbook", 123, ["one.", "two.", "three."], vectors=vectors, model="m")
    back = events.decode(events.encode(e))
    assert back == e and events.key(back) == b"handbook"
    np.testing.assert_array_equal(back.vectors(), vectors)  # float32 bit for bit
    d = events.decode(events.encode(delete("handbook", 124)))
    assert isinstance(d, events.DocumentDelete) and d.order > e.order


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda b: b.update(schema_version=2), "schema_version 2 is not supported"),
        (lambda b: b.pop("schema_version"), "schema_version None is not supported"),
        (lambda b: b.update(type="document.rename"), "type"),
        (lambda b: b.update(doc_id="../etc/passwd"), "doc_id"),
        (lambda b: b.update(classification="secret"), "classification"),
        (lambda b: b["chunks"][1].update(chunk_no=5), "numbered 0..n-1"),
        (lambda b: b["chunks"][0].pop("vector"), "every chunk carries a vector or none"),
        (lambda b: b.pop("embedding"), "embedding (model, dimension) is missing"),
        (lambda b: b["embedding"].update(dimension=100), "384-d vector but embedding.dimension is 100"),
        (lambda b: b["chunks"][0].update(vector="not base64!"), "not valid base64"),
        (lambda b: b.update(unexpected=1), "unexpected"),
    ],
)
def test_invalid_events_say_why(mutate, reason: str) -> None:
    body = json.loads(
        events.encode(upsert("doc", 1, ["a.", "b."], vectors=unit_vectors(2, 384, 2), model="m"))
    )
    mutate(body)
    with pytest.raises(events.InvalidEvent, match=None) as info:
        events.decode(json.dumps(body).encode())
    assert reason in str(info.value)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [(b"{", "not JSON"), (b"[1]", "not a JSON object"), (None, "empty"), (b"\xff", "not JSON")],
)
def test_undecodable_messages_say_why(raw: bytes | None, reason: str) -> None:
    with pytest.raises(events.InvalidEvent, match=reason):
        events.decode(raw)


def test_the_published_json_schema_is_current() -> None:
    published = json.loads((ROOT / "docs" / "sync-event.schema.json").read_text())
    assert published == events.json_schema()
    assert set(published["discriminator"]["mapping"]) == {events.UPSERT, events.DELETE}


def test_sync_settings_refuse_what_would_leak_or_cannot_connect() -> None:
    with pytest.raises(ConfigError, match="sync.max_classification = 'confidential'.*never leaves"):
        load_settings(sync={"max_classification": "confidential"})
    with pytest.raises(ConfigError, match="AWS_MSK_IAM needs security_protocol SASL_SSL"):
        load_settings(sync={"sasl_mechanism": "AWS_MSK_IAM"})
    with pytest.raises(ConfigError, match="SASL_SSL needs sasl_mechanism"):
        load_settings(sync={"security_protocol": "SASL_SSL"})
    with pytest.raises(ConfigError, match="needs sasl_username and sasl_password"):
        load_settings(sync={"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512"})
    with pytest.raises(ConfigError, match="sync.topic = 'a b'"):
        load_settings(sync={"topic": "a b"})
    with pytest.raises(ConfigError, match="sync.cdc.topic"):
        load_settings(sync={"cdc": {"topic": "x/y", "table": "public.t"}})
    with pytest.raises(ConfigError) as info:
        load_settings(sync={"sasl_password": 12345})
    assert "sync.sasl_password = '***'" in str(info.value) and "12345" not in str(info.value)
    with pytest.raises(ConfigError, match="sync.bootstrap_servers is empty"):
        client_config(load_settings().sync)


def test_client_settings_for_msk_and_scram(monkeypatch: pytest.MonkeyPatch) -> None:
    base = {"bootstrap_servers": "b-1.msk:9098", "security_protocol": "SASL_SSL"}
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    iam = load_settings(sync={**base, "sasl_mechanism": "AWS_MSK_IAM"}).sync
    with pytest.raises(ConfigError, match="needs sync.aws_region"):
        client_config(iam)
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    conf = client_config(iam)
    assert conf["security.protocol"] == "SASL_SSL" and conf["sasl.mechanism"] == "OAUTHBEARER"
    assert callable(conf["oauth_cb"])
    scram = load_settings(
        sync={**base, "sasl_mechanism": "SCRAM-SHA-512", "sasl_username": "kb", "sasl_password": "s3cret"}
    ).sync
    assert client_config(scram)["sasl.password"] == "s3cret"
    assert "s3cret" not in repr(scram)
    producer = producer_config(scram)
    assert producer["enable.idempotence"] is True and producer["acks"] == "all"
    consumer = consumer_config(scram)
    assert consumer["enable.auto.commit"] is False and consumer["isolation.level"] == "read_committed"


def test_cli_refuses_to_run_without_brokers_and_checks_the_schema_file(tmp_path) -> None:
    from typer.testing import CliRunner

    from dualtrack.cli import app

    run = CliRunner().invoke(app, ["sync", "run"])
    assert run.exit_code == 2 and "sync.bootstrap_servers is empty" in " ".join(run.output.split())
    stale = tmp_path / "schema.json"
    stale.write_text("{}")
    check = CliRunner().invoke(app, ["sync", "schema", "--check", str(stale)])
    assert check.exit_code == 1 and "is not the current event schema" in " ".join(check.output.split())
    current = CliRunner().invoke(
        app, ["sync", "schema", "--check", str(ROOT / "docs" / "sync-event.schema.json")]
    )
    assert current.exit_code == 0, current.output
