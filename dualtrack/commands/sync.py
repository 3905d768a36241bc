"""``dualtrack sync``: knowledge sync over Kafka, the consumer and the event schema."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from dualtrack.commands.common import console, fail, settings_or_fail
from services.config import ConfigError
from services.kb.classification import Classification

sync_app = typer.Typer(
    no_args_is_help=True, help="Knowledge sync over Kafka: the consumer and the event schema."
)


@sync_app.command("run")
def sync_run() -> None:
    """Apply knowledge-update (and configured Debezium) events to this knowledge base until
    SIGTERM/Ctrl-C. Settings: the ``sync`` section (``DUALTRACK_SYNC__*``); the on-prem
    kb_sync role runs the same consumer as a systemd unit."""
    import logging

    from services.kb.errors import KBError
    from services.sync import runner

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        runner.run(settings_or_fail())
    except (ConfigError, KBError, ConnectionError) as exc:
        raise fail(str(exc)) from None


@sync_app.command("publish-existing")
def sync_publish_existing(
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the broker's acknowledgements")] = 120.0,
) -> None:
    """Publish every document already in this knowledge base (public/internal only), e.g. when
    a site starts publishing. Uses the ``sync`` settings and this site's outbox."""
    from services.kb.errors import KBError
    from services.kb.service import KnowledgeBase
    from services.sync.publisher import Publisher

    settings = settings_or_fail()
    kb = KnowledgeBase(settings)
    try:
        publisher = Publisher(settings, lambda: kb.store, lambda: kb.embedder.model_id)
    except ConfigError as exc:
        raise fail(str(exc)) from None
    kb.load_model()
    try:
        with Progress(TextColumn("{task.description}"), MofNCompleteColumn(), TimeElapsedColumn()) as bar:
            task = bar.add_task("queueing documents", total=None)
            seen = publisher.publish_existing(lambda _record: bar.advance(task))
        withheld = sum(
            publisher.metrics.registry.get_sample_value(
                "dualtrack_sync_withheld_total", {"classification": c.value}
            )
            or 0
            for c in Classification
        )
        console.print(f"{seen} documents queued; {int(withheld)} withheld by sync.max_classification")
        if not publisher.drain(timeout):
            raise fail(
                f"{publisher.outbox.count()} event(s) still wait for the broker (kept in the outbox)", 1
            )
        console.print("every event acknowledged by the broker")
    except KBError as exc:
        raise fail(str(exc)) from None
    finally:
        publisher.close(timeout=5)
        kb.close()


@sync_app.command("keygen")
def sync_keygen(
    path: Annotated[Path, typer.Argument(help="Where to write the new private key (never over a file)")],
    origin: Annotated[
        str | None, typer.Option(help="The site the key signs for (default: sync.site_id or the host name)")
    ] = None,
) -> None:
    """Make a site's Ed25519 signing key (``sync.signing_key_file``) and print its public key
    for the other sites' ``sync.trusted_keys``. Store the private key in the vault
    (``dualtrack_sync_signing_key``); for a rotation, trust the new public key everywhere
    before the site switches, and drop the old one after the topic's retention."""
    import json

    from services.sync import signing

    site = origin or settings_or_fail().sync.origin
    try:
        public = signing.generate(path)
    except FileExistsError:
        raise fail(f"{path} exists: a signing key is never overwritten (rotate to a new file)") from None
    except OSError as exc:
        raise fail(f"cannot write {path}: {exc.strerror}") from None
    text = signing.public_text(public)
    console.print(f"private key written to {path} (mode 0600): keep it in the vault, never in git")
    console.print(f"key id {signing.key_id(public)}; on every consuming site, trust it for {site!r}:")
    sys.stdout.write(
        f"  TOML:     [sync.trusted_keys]\n            {json.dumps(site)} = [{json.dumps(text)}]\n"
        f"  Ansible:  dualtrack_sync_trusted_keys: {{{json.dumps(site)}: [{json.dumps(text)}]}}\n"
    )


@sync_app.command("rewind")
def sync_rewind() -> None:
    """Move the consumer group back to the start of the topic (stop the consumer first).
    After a backup restore: the restored ledger lets exactly the newer events apply."""
    from services.sync.consumer import rewind

    settings = settings_or_fail()
    try:
        pending = rewind(settings)
    except ConnectionError as exc:
        raise fail(str(exc)) from None
    for topic, n in pending.items():
        console.print(f"{topic}: {n} events to re-read")


@sync_app.command("schema")
def sync_schema(
    check: Annotated[
        Path | None, typer.Option("--check", help="Exit 1 if this file differs from the schema (CI).")
    ] = None,
) -> None:
    """Print the JSON Schema of a knowledge-update event (docs/sync-event.schema.json)."""
    import json

    from services.sync.events import json_schema

    text = json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"
    if check is None:
        sys.stdout.write(text)
        return
    if not check.is_file() or check.read_text(encoding="utf-8") != text:
        raise fail(f"{check} is not the current event schema: dualtrack sync schema > {check}", code=1)
    console.print(f"{check}: current")
