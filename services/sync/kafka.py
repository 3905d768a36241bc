"""librdkafka client settings and topic creation, from ``SyncSettings``.

MSK (production) is reached over TLS with IAM (``AWS_MSK_IAM``: a SigV4 token
from the host's standard AWS credential chain, sent as SASL/OAUTHBEARER) or
SCRAM; local brokers over PLAINTEXT. MSK has automatic topic creation off, so
the consumer creates the topics it needs (``topic_configs``).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource, NewTopic

from services.config import ConfigError, SyncSettings

log = logging.getLogger(__name__)


def client_config(sync: SyncSettings) -> dict[str, Any]:
    """Connection settings shared by producers, consumers and the admin client."""
    if not sync.bootstrap_servers.strip():
        raise ConfigError(
            "sync.bootstrap_servers is empty: set it to the brokers (stack output kafkaBootstrapBrokers, "
            "env DUALTRACK_SYNC__BOOTSTRAP_SERVERS)"
        )
    conf: dict[str, Any] = {
        "bootstrap.servers": sync.bootstrap_servers,
        "security.protocol": sync.security_protocol,
        "client.id": f"dualtrack-{sync.origin}",
        "logger": logging.getLogger("services.sync.librdkafka"),  # not raw stderr
    }
    if sync.ca_file is not None:
        conf["ssl.ca.location"] = str(sync.ca_file)
    if sync.sasl_mechanism == "AWS_MSK_IAM":
        region = sync.aws_region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if not region:
            raise ConfigError("sync.sasl_mechanism AWS_MSK_IAM needs sync.aws_region (or AWS_REGION)")
        conf["sasl.mechanism"] = "OAUTHBEARER"
        conf["oauth_cb"] = _msk_iam_token(region)
    elif sync.sasl_mechanism:
        assert sync.sasl_password is not None
        conf["sasl.mechanism"] = sync.sasl_mechanism
        conf["sasl.username"] = sync.sasl_username
        conf["sasl.password"] = sync.sasl_password.get_secret_value()
    return conf


def _msk_iam_token(region: str) -> Any:
    """An OAUTHBEARER callback that signs an MSK IAM token with the host's AWS credentials."""

    def refresh(_config: str) -> tuple[str, float]:
        from aws_msk_iam_sasl_signer import MSKAuthTokenProvider

        token, expiry_ms = MSKAuthTokenProvider.generate_auth_token(region)
        return token, expiry_ms / 1000.0

    return refresh


def site_client_config(sync: SyncSettings) -> dict[str, Any]:
    """Connection settings for the site's own broker, the one Debezium writes to (``sync.cdc``)."""
    assert sync.cdc is not None
    conf: dict[str, Any] = {
        "bootstrap.servers": sync.cdc.bootstrap_servers,
        "security.protocol": sync.cdc.security_protocol,
        "client.id": f"dualtrack-{sync.origin}-cdc",
        "logger": logging.getLogger("services.sync.librdkafka"),
    }
    if sync.cdc.ca_file is not None:
        conf["ssl.ca.location"] = str(sync.cdc.ca_file)
    return conf


def serve_token(client: Any, sync: SyncSettings) -> None:
    """librdkafka asks for an OAUTHBEARER token through ``poll``: serve it before the first
    request of a client that is not polled otherwise (admin, rewind)."""
    if sync.sasl_mechanism == "AWS_MSK_IAM":
        client.poll(1.0)


def producer_config(sync: SyncSettings, client: dict[str, Any] | None = None) -> dict[str, Any]:
    """Idempotent, acks=all: a retried send is never duplicated nor reordered. ``client``: the
    connection (default: the updates brokers)."""
    return {
        **(client or client_config(sync)),
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 20,
        "compression.type": "zstd",
        "message.timeout.ms": 60_000,
        "message.max.bytes": sync.max_message_bytes + 64 * 1024,  # room for the batch framing
    }


def consumer_config(sync: SyncSettings, client: dict[str, Any] | None = None) -> dict[str, Any]:
    """Offsets are committed by hand, after the knowledge-base write."""
    return {
        **(client or client_config(sync)),
        "group.id": sync.group_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "session.timeout.ms": sync.session_timeout_ms,
        "heartbeat.interval.ms": max(sync.session_timeout_ms // 4, 500),
        "max.poll.interval.ms": 600_000,  # re-embedding a large batch can take minutes
        "isolation.level": "read_committed",
    }


def ensure_topics(
    sync: SyncSettings,
    topics: dict[str, dict[str, str]],
    timeout: float = 30.0,
    client: dict[str, Any] | None = None,
) -> list[str]:
    """Create the missing ``topics`` (name -> topic config) and bring the retention of the
    existing ones to what is configured; returns those created. The replication factor
    is capped at the broker count (a one-broker dev cluster). ``client``: the connection
    (default: the updates brokers)."""
    conf = client or client_config(sync)
    admin = AdminClient(conf)
    serve_token(admin, sync)
    where = conf["bootstrap.servers"]
    try:
        meta = admin.list_topics(timeout=timeout)
    except KafkaException as exc:
        raise ConnectionError(f"Kafka at {where} is unreachable: {exc}") from None
    _enforce_retention(admin, {n: c for n, c in topics.items() if n in meta.topics}, timeout)
    missing = [name for name in topics if name not in meta.topics]
    if not missing:
        return []
    replicas = min(sync.replication_factor, max(len(meta.brokers), 1))
    if replicas < sync.replication_factor:
        log.warning(
            "only %d broker(s): creating topics with replication factor %d", len(meta.brokers), replicas
        )
    futures = admin.create_topics(
        [
            NewTopic(name, num_partitions=sync.partitions, replication_factor=replicas, config=topics[name])
            for name in missing
        ],
        request_timeout=timeout,
    )
    created = []
    for name, future in futures.items():
        try:
            future.result()
            created.append(name)
        except KafkaException as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise ConnectionError(f"cannot create topic {name!r}: {exc}") from None
    return created


ENFORCED: tuple[str, ...] = ("retention.ms", "segment.ms")
"""Topic settings held to the configuration on existing topics, not only at creation."""


def _enforce_retention(admin: AdminClient, existing: dict[str, dict[str, str]], timeout: float) -> None:
    """A topic created before the retention was set (or with another) is given the configured
    ``retention.ms`` and ``segment.ms``: how long an erased document's events stay on the
    brokers is the setting, not the topic's history. A client the cluster does not allow to
    read or change topic settings (MSK's IAM policy grants only the read) logs what differs
    and carries on: the cluster's administrator sets it."""
    wanted = {n: {k: c[k] for k in ENFORCED if k in c} for n, c in existing.items()}
    wanted = {n: w for n, w in wanted.items() if w}
    if not wanted:
        return
    try:
        described = admin.describe_configs(
            [ConfigResource("topic", n) for n in wanted], request_timeout=timeout
        )
        current = {
            r.name: {k: (e.value if (e := f.result().get(k)) is not None else None) for k in ENFORCED}
            for r, f in described.items()
        }
    except KafkaException as exc:
        log.warning("cannot read the settings of topics %s (%s): not checked", sorted(wanted), exc)
        return
    changes = {n: {k: v for k, v in w.items() if current.get(n, {}).get(k) != v} for n, w in wanted.items()}
    changes = {n: c for n, c in changes.items() if c}
    if not changes:
        return
    resources = [
        ConfigResource(
            "topic",
            n,
            incremental_configs=[
                ConfigEntry(k, v, incremental_operation=AlterConfigOpType.SET) for k, v in c.items()
            ],
        )
        for n, c in changes.items()
    ]
    for resource, future in admin.incremental_alter_configs(resources, request_timeout=timeout).items():
        was = {k: current.get(resource.name, {}).get(k) for k in changes[resource.name]}
        try:
            future.result()
        except KafkaException as exc:
            log.error(
                "topic %s has %s, the configuration says %s, and this client may not change it (%s): "
                "ask the cluster's administrator to set it",
                resource.name,
                was,
                changes[resource.name],
                exc,
            )
            continue
        log.info("topic %s: %s -> %s", resource.name, was, changes[resource.name])


def topic_configs(sync: SyncSettings) -> dict[str, dict[str, str]]:
    """The sync topics and their settings.

    The updates topic uses ``delete`` retention (``sync.retention_ms``), not compaction:
    compaction keeps the *last* event per key, which after concurrent edits at two sites
    can be an older revision, so a site replaying a compacted topic could settle on the
    wrong version. Kafka deletes whole segments once their newest record is past the
    retention, so segments roll at an eighth of it: an event stays at most
    ``retention_ms + segment_ms``. Dead letters are kept as long (they may hold copies)."""
    common = {
        "max.message.bytes": str(sync.max_message_bytes),
        "cleanup.policy": "delete",
        "retention.ms": str(sync.retention_ms),
        "segment.ms": str(sync.segment_ms),
    }
    if sync.replication_factor >= 3:
        common["min.insync.replicas"] = "2"
    return {sync.topic: common, sync.dlq_topic: dict(common)}
