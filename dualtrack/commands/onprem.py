"""``dualtrack onprem``: configure on-prem hosts with Ansible (the cloud stack's outputs in)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from dualtrack.commands.common import console, err, fail
from dualtrack.local import state_dir

onprem_app = typer.Typer(
    no_args_is_help=True, help="Configure on-prem hosts with Ansible (cloud outputs in)."
)

# -- on-prem track ---------------------------------------------------------------------------


@onprem_app.command("apply")
def onprem_apply(
    inventory: Annotated[
        Path | None, typer.Option("-i", "--inventory", help="Ansible inventory of the site")
    ] = None,
    stack: Annotated[
        str | None, typer.Option(help="Read outputs with `pulumi stack output -s STACK`")
    ] = None,
    outputs: Annotated[Path | None, typer.Option(help="Stack outputs exported by CI (JSON or YAML)")] = None,
    standalone: Annotated[
        bool, typer.Option("--standalone", help="No cloud stack: answers stay on-prem")
    ] = False,
    playbook: Annotated[str, typer.Option(help="Playbook under ansible/playbooks")] = "site.yml",
    check: Annotated[bool, typer.Option("--check", help="Dry run: report what would change")] = False,
    diff: Annotated[bool, typer.Option("--diff", help="Show file changes (never of secrets)")] = False,
    limit: Annotated[str | None, typer.Option(help="Only these hosts (Ansible pattern)")] = None,
    tags: Annotated[str | None, typer.Option(help="Only tasks with these tags")] = None,
    extra_vars: Annotated[
        list[str] | None, typer.Option("-e", "--extra-vars", help="KEY=VALUE or @FILE (repeatable)")
    ] = None,
    vault_password_file: Annotated[
        Path | None, typer.Option(help="Decrypts the site's ansible-vault files")
    ] = None,
    wheelhouse: Annotated[
        Path | None,
        typer.Option(help="Use this wheelhouse as is (default: build/refresh one under .dualtrack/)"),
    ] = None,
) -> None:
    """Validate the cloud outputs, run the playbook with live progress, summarise per host."""
    from dualtrack.onprem import OnPremError, apply, extravars, load_outputs
    from dualtrack.wheelhouse import WheelhouseError, build

    if inventory is None:
        raise fail("choose an inventory with -i (start from ansible/inventories/example/hosts.yml)")
    if standalone and (stack or outputs):
        raise fail("--standalone takes no --stack/--outputs")
    if vault_password_file is not None and not vault_password_file.is_file():
        raise fail(f"--vault-password-file {vault_password_file}: no such file")
    try:
        if standalone:
            variables: dict[str, Any] = {"dualtrack_standalone": True, "dualtrack_stack": "standalone"}
        else:
            variables = extravars(load_outputs(stack=stack, outputs_file=outputs))
        if wheelhouse is None:
            wheelhouse = state_dir() / "wheelhouse"
            console.print(f"[dim]wheelhouse: {wheelhouse} (refreshing)[/]")
            build(wheelhouse)
        elif not (wheelhouse / "requirements.lock").is_file():
            raise OnPremError(f"--wheelhouse {wheelhouse}: not a wheelhouse (`dualtrack onprem wheelhouse`)")
        variables["dualtrack_wheelhouse"] = str(wheelhouse.resolve())
        extra_args = [arg for value in extra_vars or [] for arg in ("-e", value)]
        if vault_password_file is not None:
            extra_args += ["--vault-password-file", str(vault_password_file.resolve())]
        mode = " (check mode: nothing changes)" if check else ""
        console.print(f"applying {playbook} to {inventory} for stack {variables['dualtrack_stack']}{mode}")
        result = apply(
            inventory=inventory,
            variables=variables,
            playbook=playbook,
            check=check,
            diff=diff,
            limit=limit,
            tags=tags,
            extra_args=extra_args,
            runs_dir=state_dir() / "onprem-runs",
            on_event=_ansible_progress,
        )
    except (OnPremError, WheelhouseError) as exc:
        raise fail(str(exc)) from None
    table = Table(title=f"{playbook}: {result.status}")
    for col in ("host", "ok", "changed", "failed", "unreachable", "skipped"):
        table.add_column(col, justify="left" if col == "host" else "right")
    for host, s in sorted(result.hosts.items()):
        table.add_row(
            escape(host), str(s.ok), str(s.changed), str(s.failed), str(s.unreachable), str(s.skipped)
        )
    console.print(table)
    for failure in result.failures:
        err.print(f"[red]failed:[/] {escape(failure)}", highlight=False)
    console.print(f"[dim]artifacts: {result.artifacts}[/]")
    if not result.succeeded:
        raise typer.Exit(1)


@onprem_app.command("verify")
def onprem_verify(
    inventory: Annotated[Path, typer.Option("-i", "--inventory", help="Ansible inventory of the site")],
    limit: Annotated[str | None, typer.Option(help="Only these hosts (group or host name)")] = None,
    junit: Annotated[Path | None, typer.Option(help="Also write a JUnit XML report")] = None,
    vault_password_file: Annotated[
        Path | None, typer.Option(help="Decrypts the site's ansible-vault files")
    ] = None,
    cert_days: Annotated[
        int,
        typer.Option(
            min=0, help="Fail a certificate that expires within this many days (0 for short-lived ones)"
        ),
    ] = 14,
) -> None:
    """Check the converged hosts with testinfra (units, ports, firewall, secrets, readiness)."""
    from dualtrack.onprem import OnPremError, verify

    try:
        code = verify(inventory, limit, junit, vault_password_file, cert_days)
    except OnPremError as exc:
        raise fail(str(exc)) from None
    if code != 0:
        raise typer.Exit(1)


def _ansible_progress(event: dict[str, Any]) -> None:
    """One line per task result: status, host, task."""
    kinds = {
        "runner_on_ok": "ok",
        "runner_on_failed": "failed",
        "runner_on_unreachable": "unreachable",
        "runner_on_skipped": "skipped",
    }
    kind = kinds.get(event.get("event", ""))
    if kind is None:
        return
    data = event.get("event_data", {})
    res = data.get("res") or {}
    if kind == "ok" and res.get("changed"):
        kind = "changed"
    elif kind == "ok" and "censored" in res:
        kind = "done"  # a no_log task: Ansible hides whether it changed (the summary counts it)
    colour = {
        "ok": "green",
        "changed": "yellow",
        "done": "cyan",
        "failed": "red",
        "unreachable": "red",
        "skipped": "dim",
    }[kind]
    console.print(
        f"[{colour}]{kind:>11}[/] {escape(str(data.get('host')))}  {escape(str(data.get('task')))}",
        highlight=False,
    )
