"""``dualtrack keys``: service API keys (hashed, scoped, expiring, revocable)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from dualtrack.commands.common import console, fail, settings_or_fail
from services.auth.keys import KeyStore, KeyStoreError
from services.auth.principal import Role
from services.kb.classification import Classification

keys_app = typer.Typer(no_args_is_help=True, help="Service API keys: create (shown once), list, revoke.")
_DURATION = re.compile(r"^(\d+)([dh])$")

FileOpt = Annotated[
    Path | None, typer.Option("--keys-file", help="The key file (default: gateway.keys_file)")
]


def _store(path: Path | None) -> KeyStore:
    path = path or settings_or_fail().gateway.keys_file
    if path is None:
        raise fail(
            "no key file: set gateway.keys_file (env DUALTRACK_GATEWAY__KEYS_FILE) or pass --keys-file"
        )
    return KeyStore(path)


def _duration(value: str) -> timedelta | None:
    if value == "never":
        return None
    match = _DURATION.match(value)
    if match is None or int(match.group(1)) == 0:
        raise fail(f"--expires-in {value!r}: give days or hours (90d, 12h) or 'never'")
    n, unit = int(match.group(1)), match.group(2)
    return timedelta(days=n) if unit == "d" else timedelta(hours=n)


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Argument(help="What uses the key (lower-case, e.g. ingest-bot)")],
    role: Annotated[
        list[Role], typer.Option("--role", help="monitor, reader, contributor, admin (repeatable)")
    ],
    group: Annotated[
        list[str] | None, typer.Option("--group", help="A group it acts for (repeatable)")
    ] = None,
    clearance: Annotated[
        Classification, typer.Option(help="The clearance its principal carries (docs/security.md)")
    ] = Classification.INTERNAL,
    expires_in: Annotated[str, typer.Option(help="90d, 12h, or 'never'")] = "90d",
    keys_file: FileOpt = None,
) -> None:
    """Create a key; it is printed once, here, and stored only as a hash."""
    store = _store(keys_file)
    try:
        key, record = store.create(name, role, group or [], clearance, _duration(expires_in))
    except KeyStoreError as exc:
        raise fail(str(exc)) from None
    expiry = record.expires.isoformat(timespec="seconds") if record.expires else "never"
    console.print(f"[green]created[/] {record.name} (id {record.id}, expires {expiry})", highlight=False)
    console.print("the key (shown only now):", highlight=False)
    print(key)


@keys_app.command("list")
def keys_list(keys_file: FileOpt = None) -> None:
    """Every key and its state; never the secrets (only their hashes are stored)."""
    now = datetime.now(UTC)
    table = Table()
    for column in ("id", "name", "roles", "groups", "clearance", "expires", "state"):
        table.add_column(column, overflow="fold")  # ids and names are copied from here: never cut
    for r in _store(keys_file).records():
        table.add_row(
            r.id,
            r.name,
            ",".join(sorted(x.value for x in r.roles)),
            ",".join(sorted(r.groups)) or "-",
            r.clearance.value,
            r.expires.isoformat(timespec="seconds") if r.expires else "never",
            r.state(now),
        )
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(
    key: Annotated[str, typer.Argument(help="The key's id or name")], keys_file: FileOpt = None
) -> None:
    """Revoke a key: the gateway refuses it from the next request on."""
    try:
        record = _store(keys_file).revoke(key)
    except KeyStoreError as exc:
        raise fail(str(exc)) from None
    console.print(f"[yellow]revoked[/] {record.name} (id {record.id})", highlight=False)
