"""Event signatures without a broker: keys that cannot be used are refused with the setting
named, and every way a message can fail to be trusted says which one it is."""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from typer.testing import CliRunner

from dualtrack.cli import app
from services.config import ConfigError, load_settings
from services.sync import signing

WEEK_S = 7 * 24 * 3600.0


def verifier_for(*keys: tuple[str, signing.Signer]) -> signing.Verifier:
    trusted: dict[str, list[str]] = {}
    for origin, signer in keys:
        trusted.setdefault(origin, []).append(signing.public_text(signer.public))
    return signing.Verifier(trusted, window_s=WEEK_S + 300, skew_s=300)


@pytest.fixture
def signer(tmp_path: Path) -> signing.Signer:
    signing.generate(tmp_path / "site-a.pem")
    return signing.Signer(tmp_path / "site-a.pem")


def test_a_signed_message_verifies_and_names_its_site(signer: signing.Signer) -> None:
    headers = signer.headers("t", b"doc", b'{"x": 1}')
    verified = verifier_for(("site-a", signer)).verify("t", headers, b"doc", b'{"x": 1}')
    assert verified.origin == "site-a" and abs(verified.sent_at - time.time()) < 5


def test_each_part_of_the_message_is_covered(signer: signing.Signer) -> None:
    verifier = verifier_for(("site-a", signer))
    headers = signer.headers("t", b"doc", b"value")
    for key, value in ((b"other", b"value"), (b"doc", b"value!"), (None, b"value"), (b"doc", None)):
        with pytest.raises(signing.Rejected, match="wrongly signed: the signature does not match 'site-a'"):
            verifier.verify("t", headers, key, value)
    with pytest.raises(signing.Rejected, match="wrongly signed"):
        verifier.verify("staging", headers, b"doc", b"value")  # copied to another topic
    later = [(n, str(int(v) + 1).encode() if n == signing.SENT_AT_HEADER else v) for n, v in headers]
    with pytest.raises(signing.Rejected, match="wrongly signed"):
        verifier.verify("t", later, b"doc", b"value")


def test_untrusted_unsigned_malformed_and_duplicated_headers_are_refused(
    signer: signing.Signer, tmp_path: Path
) -> None:
    signing.generate(tmp_path / "stranger.pem")
    stranger = signing.Signer(tmp_path / "stranger.pem")
    verifier = verifier_for(("site-a", signer))
    with pytest.raises(signing.Rejected, match="not in sync.trusted_keys"):
        verifier.verify("t", stranger.headers("t", b"k", b"v"), b"k", b"v")
    with pytest.raises(signing.Rejected, match="^unsigned: no dualtrack.key_id"):
        verifier.verify("t", None, b"k", b"v")
    headers = signer.headers("t", b"k", b"v")
    with pytest.raises(signing.Rejected, match="^unsigned: no dualtrack.signature header"):
        verifier.verify("t", [h for h in headers if h[0] != signing.SIGNATURE_HEADER], b"k", b"v")
    with pytest.raises(signing.Rejected, match="appears more than once"):
        verifier.verify("t", [*headers, headers[2]], b"k", b"v")
    garbled = [(n, b"not base64!" if n == signing.SIGNATURE_HEADER else v) for n, v in headers]
    with pytest.raises(signing.Rejected, match="malformed sent_at or signature"):
        verifier.verify("t", garbled, b"k", b"v")


def test_old_and_future_messages_are_refused(signer: signing.Signer) -> None:
    verifier = verifier_for(("site-a", signer))
    now = time.time_ns() // 1000
    week_and_a_day = now - int((WEEK_S + 86400) * 1e6)
    with pytest.raises(signing.Rejected, match=r"^replayed: sent 192\.0 h ago"):
        verifier.verify("t", signer.headers("t", b"k", b"v", sent_at=week_and_a_day), b"k", b"v")
    assert verifier.verify("t", signer.headers("t", b"k", b"v", sent_at=now - int(WEEK_S * 1e6)), b"k", b"v")
    with pytest.raises(signing.Rejected, match="in the future, more than sync.max_clock_skew_s"):
        verifier.verify("t", signer.headers("t", b"k", b"v", sent_at=now + 3_600_000_000), b"k", b"v")


def test_rotation_trusts_both_keys_of_a_site(signer: signing.Signer, tmp_path: Path) -> None:
    signing.generate(tmp_path / "site-a-2.pem")
    rotated = signing.Signer(tmp_path / "site-a-2.pem")
    verifier = verifier_for(("site-a", signer), ("site-a", rotated))
    for s in (signer, rotated):
        assert verifier.verify("t", s.headers("t", b"k", b"v"), b"k", b"v").origin == "site-a"


def test_one_key_for_two_sites_is_refused(signer: signing.Signer) -> None:
    with pytest.raises(signing.SigningError, match="listed for both 'site-a' and 'site-b'"):
        verifier_for(("site-a", signer), ("site-b", signer))


def test_unusable_signing_keys_name_the_setting(tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    with pytest.raises(ConfigError, match="sync.signing_key_file .*missing.pem.*cannot be read"):
        signing.Signer(missing)
    signing.generate(tmp_path / "open.pem")
    os.chmod(tmp_path / "open.pem", 0o644)
    with pytest.raises(ConfigError, match=r"readable by every user \(mode 644\)"):
        signing.Signer(tmp_path / "open.pem")
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (tmp_path / "rsa.pem").write_bytes(
        rsa_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    os.chmod(tmp_path / "rsa.pem", 0o600)
    with pytest.raises(ConfigError, match="RSAPrivateKey, but events are signed with Ed25519"):
        signing.Signer(tmp_path / "rsa.pem")
    (tmp_path / "junk.pem").write_text("not a key")
    os.chmod(tmp_path / "junk.pem", 0o600)
    with pytest.raises(ConfigError, match="not an unencrypted PEM private key"):
        signing.Signer(tmp_path / "junk.pem")


def test_settings_refuse_bad_keys_retention_and_a_cloud_cdc_broker(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"sync.trusted_keys.*'site-a'.*not base64"):
        load_settings(sync={"trusted_keys": {"site-a": ["not base64!"]}})
    throwaway = tmp_path / "pasted.pem"
    signing.generate(throwaway)
    pasted = throwaway.read_text()  # a private key pasted where a public one belongs
    with pytest.raises(ConfigError, match="this is a private key") as refused:
        load_settings(sync={"trusted_keys": {"site-a": [pasted]}})
    assert pasted.splitlines()[1][:12] not in str(refused.value)
    for origin in (" site-a ", "*", ""):
        with pytest.raises(ConfigError, match="is not a site name"):
            load_settings(sync={"trusted_keys": {origin: []}})
    with pytest.raises(ConfigError, match="neither '\\*' nor a site name"):
        load_settings(sync={"shared_writers": ["site a"]})
    short = base64.b64encode(b"x" * 16).decode()
    with pytest.raises(ConfigError, match="an Ed25519 public key is 32 bytes, this one is 16"):
        load_settings(sync={"trusted_keys": {"site-a": [short]}})
    with pytest.raises(ConfigError, match="sync.retention_ms"):
        load_settings(sync={"retention_ms": -1})  # forever is no longer a choice
    cdc = {"topic": "kb.public.t", "table": "public.t"}
    cloud = "b-1.kb.abc123.c2.kafka.eu-west-1.amazonaws.com:9098"
    with pytest.raises(ConfigError, match="an AWS \\(MSK\\) broker: a site's database rows are read"):
        load_settings(sync={"cdc": {**cdc, "bootstrap_servers": cloud}})
    for disguised in (
        "B-1.kb.abc123.c2.kafka.eu-west-1.amazonaws.com.:9098",
        "b-1.kafka.cn-north-1.amazonaws.com.cn",
    ):
        with pytest.raises(ConfigError, match="an AWS \\(MSK\\) broker"):
            load_settings(sync={"cdc": {**cdc, "bootstrap_servers": disguised}})
    with pytest.raises(ConfigError, match="also in sync.bootstrap_servers"):
        load_settings(
            sync={"bootstrap_servers": "kafka.cloud:9092", "cdc": {**cdc, "bootstrap_servers": "Kafka.Cloud"}}
        )
    with pytest.raises(ConfigError, match="also in sync.bootstrap_servers"):
        load_settings(
            sync={"bootstrap_servers": "10.0.0.5:9092", "cdc": {**cdc, "bootstrap_servers": "10.0.0.5:9092"}}
        )
    with pytest.raises(ConfigError, match="sync.cdc.bootstrap_servers"):
        load_settings(sync={"cdc": cdc})  # the site's broker must be named
    ok = load_settings(
        sync={"bootstrap_servers": cloud, "cdc": {**cdc, "bootstrap_servers": "kafka.lan:9092"}}
    )
    assert ok.sync.cdc is not None and ok.sync.cdc.dlq_topic == "kb.public.t.dlq"


def test_publishing_and_consuming_need_keys_unless_signatures_are_off(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="sync.signing_key_file is unset"):
        signing.signer_for(load_settings().sync)
    with pytest.raises(ConfigError, match="sync.trusted_keys is empty"):
        signing.verifier_for(load_settings().sync)
    lab = load_settings(sync={"require_signatures": False}).sync
    assert signing.signer_for(lab) is None and signing.verifier_for(lab) is None


def test_keygen_writes_a_private_key_once_and_prints_what_to_trust(tmp_path: Path) -> None:
    path = tmp_path / "hq.pem"
    result = CliRunner().invoke(app, ["sync", "keygen", str(path), "--origin", "site-hq"])
    assert result.exit_code == 0, result.output
    assert (path.stat().st_mode & 0o777) == 0o600
    line = next(x for x in result.output.splitlines() if "dualtrack_sync_trusted_keys" in x)
    trusted = json.loads(line.split("dualtrack_sync_trusted_keys:", 1)[1])
    signer = signing.Signer(path)
    assert trusted == {"site-hq": [signing.public_text(signer.public)]}
    settings = load_settings(sync={"trusted_keys": trusted})  # what it printed is a valid setting
    verifier = signing.verifier_for(settings.sync)
    assert (
        verifier is not None
        and verifier.verify("t", signer.headers("t", b"k", b"v"), b"k", b"v").origin == "site-hq"
    )
    before = path.read_bytes()
    again = CliRunner().invoke(app, ["sync", "keygen", str(path), "--origin", "site-hq"])
    assert again.exit_code != 0 and "never overwritten" in again.output
    assert path.read_bytes() == before


def test_a_gateway_that_would_publish_unsigned_does_not_start(tmp_path: Path) -> None:
    from services.gateway.app import create_app

    outbox = tmp_path / "outbox.db"
    settings = load_settings(
        milvus={"uri": str(tmp_path / "kb.db")},
        audit={"dir": str(tmp_path / "audit")},
        gateway={"api_key": "test-key-0123456789"},
        sync={"publish": True, "bootstrap_servers": "127.0.0.1:9", "outbox_path": str(outbox)},
    )
    with pytest.raises(ConfigError, match="sync.publish is on but sync.signing_key_file is unset"):
        create_app(settings)
    assert not outbox.exists()


def test_a_list_setting_in_the_environment_that_is_not_json_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DUALTRACK_SYNC__SHARED_WRITERS", "*")
    with pytest.raises(ConfigError, match="takes JSON .*DUALTRACK_SYNC__SHARED_WRITERS"):
        load_settings()
    monkeypatch.setenv("DUALTRACK_SYNC__SHARED_WRITERS", '["*"]')
    assert load_settings().sync.shared_writers == ["*"]
