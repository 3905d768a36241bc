"""``dualtrack onprem wheelhouse|lock|audit``: what an on-prem host installs, pinned and scanned.

Registered into the ``onprem`` group (:mod:`dualtrack.cli`); the supply chain is its own job,
apart from converging and verifying hosts.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from dualtrack.commands.common import console, err, fail

wheelhouse_app = typer.Typer()


@wheelhouse_app.command("wheelhouse")
def onprem_wheelhouse(
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory to fill (incremental)")] = Path(
        ".dualtrack/wheelhouse"
    ),
) -> None:
    """Gather exactly the locked wheels a host installs, the project wheel and the SBOM."""
    from dualtrack.wheelhouse import WheelhouseError, build

    try:
        target = build(out)
    except WheelhouseError as exc:
        raise fail(str(exc)) from None
    wheels = list((target / "wheels").glob("*.whl"))
    size = sum(p.stat().st_size for p in wheels) / 1e6
    console.print(f"{target}: {len(wheels)} wheels ({size:.0f} MB) + the project wheel; SBOM sbom.cdx.json")


@wheelhouse_app.command("lock")
def onprem_lock() -> None:
    """Resolve the hosts' packages afresh and pin each file by sha256 (services/requirements.lock).

    Run after changing services/requirements.txt or a pin in requirements.txt, review the
    diff, commit it; the wheelhouse build refuses a lock that no longer matches.
    """
    from dualtrack.wheelhouse import LOCK, WheelhouseError, lock, read_lock

    try:
        lock(LOCK)
        count = len(read_lock(LOCK))
    except WheelhouseError as exc:
        raise fail(str(exc)) from None
    console.print(f"{LOCK}: {count} packages pinned by hash")


@wheelhouse_app.command("audit")
def onprem_audit(
    wheelhouse: Annotated[
        Path | None, typer.Option(help="Audit this wheelhouse's locks (default: services/requirements.lock)")
    ] = None,
    service: Annotated[str, typer.Option(help="Vulnerability database pip-audit asks: pypi or osv")] = "pypi",
) -> None:
    """Scan the locked packages for known vulnerabilities with pip-audit (a release step).

    Fails closed: a package the database cannot be asked about fails the audit (``--strict``),
    so an unreachable database is never a clean report. A local build such as torch's
    ``2.13.0+cpu`` is asked about as its public release (``2.13.0``): the advisories are the same.
    """
    from dualtrack.wheelhouse import LOCK, audit_input

    if service not in ("pypi", "osv"):
        raise fail(f"--service {service!r}: choose pypi or osv")
    if wheelhouse is None:
        locks = [LOCK]
    else:  # the third-party locks; the project's own wheel is in no vulnerability database
        locks = [
            p
            for p in (wheelhouse / "requirements.lock", wheelhouse / "llama" / "requirements.lock")
            if p.is_file()
        ]
    if not locks:
        raise fail(f"--wheelhouse {wheelhouse}: no requirements.lock in it (`dualtrack onprem wheelhouse`)")
    if _missing_pip_audit():
        raise fail("pip-audit is not installed here: pip install -r requirements-dev.txt")
    failed = False
    for path in locks:
        console.print(f"[bold]{path}[/]")
        with tempfile.TemporaryDirectory(prefix="dualtrack-audit-") as tmp:
            asked = Path(tmp) / "requirements.txt"
            asked.write_text(audit_input(path), encoding="utf-8")
            argv = [sys.executable, "-m", "pip_audit", "--strict", "--progress-spinner=off"]
            argv += ["--vulnerability-service", service, "--disable-pip", "--no-deps", "-r", str(asked)]
            done = subprocess.run(argv, env=os.environ.copy(), check=False)
        failed |= done.returncode != 0
    if failed:
        err.print("[red]audit failed:[/] a known vulnerability, or a package that could not be checked")
        raise typer.Exit(1)
    console.print("no known vulnerabilities in the locked packages")


def _missing_pip_audit() -> bool:
    import importlib.util

    return importlib.util.find_spec("pip_audit") is None
