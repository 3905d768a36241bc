"""``dualtrack audit``: check the gateway's hash-chained audit log."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from dualtrack.commands.common import console, fail, settings_or_fail
from services.audit.chain import AuditError, verify

audit_app = typer.Typer(no_args_is_help=True, help="The audit trail: verify its hash chain.")


@audit_app.command("verify")
def audit_verify(
    directory: Annotated[
        Path | None, typer.Option("--dir", help="The log directory (default: audit.dir)")
    ] = None,
    head: Annotated[
        str | None, typer.Option(help="The head hash noted earlier (or shipped off the host) to compare with")
    ] = None,
) -> None:
    """Check every record's hash and link, across rotated files. Exit code 1 at the first
    altered, removed, reordered or inserted record, naming its file and line."""
    where = directory or settings_or_fail().audit.directory()
    try:
        result = verify(where)
    except AuditError as exc:
        raise fail(f"audit log does not verify: {exc}", code=1) from None
    start = (
        "the first record"
        if result.starts_at_genesis
        else f"seq {result.first_seq} (older files rotated away)"
    )
    console.print(
        f"{escape(str(where))}: {result.records} records intact, from {start} to seq {result.last_seq}; "
        f"head {result.head}"
    )
    if head is not None and head != result.head:
        raise fail(
            f"the head is {result.head}, not {head}: records up to that point were changed or removed", code=1
        )
