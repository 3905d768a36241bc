"""``dualtrack plan``: the offline plan of every Pulumi stack."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from dualtrack.commands.common import console, fail

plan_app = typer.Typer()

# -- offline plan --------------------------------------------------------------------------------


@plan_app.command("plan")
def plan(
    stack: Annotated[
        list[str] | None, typer.Option("--stack", "-s", help="Stack(s) to plan (default: every stack file)")
    ] = None,
    check: Annotated[bool, typer.Option("--check", help="Only report whether plans/ is up to date")] = False,
    diff: Annotated[
        str | None,
        typer.Option("--diff", metavar="REV", help="Print the change against plans/ at a git revision"),
    ] = None,
) -> None:
    """Run the Pulumi program under mocks and write plans/<stack>/ (no CLI, no credentials)."""
    from dualtrack.plan import PlanError, diff_against, run_program, stack_names, stale_files, write_plan
    from infra.config import ConfigError as StackConfigError

    stacks = stack or list(stack_names())
    try:
        if diff is not None:
            text = diff_against(stacks, diff)
            console.print(
                escape(text) if text else f"no change against {diff}", highlight=False, soft_wrap=True
            )
            return
        stale: list[str] = []
        for name in stacks:
            result = run_program(name)
            if check:
                stale += [f"plans/{name}/{path}" for path in stale_files(result)]
                continue
            target = write_plan(result)
            console.print(
                f"{name}: {len(result.resources)} resources -> {_relative(target)} ({result.seconds:.2f} s)"
            )
    except (PlanError, StackConfigError) as exc:
        raise fail(str(exc)) from None
    if check and stale:
        raise fail("plans are stale (run `dualtrack plan` and commit):\n  " + "\n  ".join(stale), code=1)
    if check:
        console.print(f"plans up to date: {', '.join(stacks)}")


def _relative(path: Path) -> Path:
    return path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path
