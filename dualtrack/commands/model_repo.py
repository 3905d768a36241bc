"""``dualtrack model-repo``: render and check Triton model repositories."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dualtrack.commands.common import console, fail
from infra.model_layout import POD_ROOT

model_repo_app = typer.Typer(no_args_is_help=True, help="Render and check Triton model repositories.")

# -- Triton model repository -------------------------------------------------------------------


@model_repo_app.command("render")
def model_repo_render(
    out: Annotated[Path, typer.Option("--out", "-o", help="New directory to write")],
    profile: Annotated[
        str | None,
        typer.Option(
            "--profile", "-p", help="A profile of model_repo/profiles.yaml (onprem: omit for embedding only)"
        ),
    ] = None,
    role: Annotated[
        str, typer.Option(help="cloud (ensemble) or onprem (local_fallback + embedding)")
    ] = "cloud",
    runtime_root: Annotated[
        str,
        typer.Option(
            help="Where the version's layout is when Triton runs (<root>/repository, <root>/tokenizer)"
        ),
    ] = POD_ROOT,
    tokenizer_dir: Annotated[str | None, typer.Option(help="Override the profile's tokenizer dir")] = None,
    engine_dir: Annotated[str | None, typer.Option(help="Override <root>/engines")] = None,
    archive: Annotated[
        Path | None, typer.Option(help="Also write the result as one reproducible tar (what a role copies)")
    ] = None,
) -> None:
    """Fill the templates for a profile; then `model-repo check` runs on the result."""
    from dualtrack.model_repo import ModelRepoError, RenderOptions, check, render

    if role not in ("cloud", "onprem"):
        raise fail(f"--role {role!r}: allowed: cloud, onprem")
    try:
        target = render(
            profile,
            out,
            RenderOptions(
                role=role,
                runtime_root=runtime_root,  # type: ignore[arg-type]
                tokenizer_dir=tokenizer_dir,
                engine_dir=engine_dir,
            ),
        )
        problems = check(target)
    except ModelRepoError as exc:
        raise fail(str(exc)) from None
    if problems:
        raise fail("rendered repository does not check:\n  " + "\n  ".join(problems), code=1)
    models = sorted(p.name for p in target.iterdir() if p.is_dir())
    if archive is not None:
        from dualtrack.archive import reproducible_tar

        reproducible_tar(target, archive)
    console.print(f"{profile or 'embedding only'} ({role}) -> {target}: {', '.join(models)}")


@model_repo_app.command("entry")
def model_repo_entry(
    profile: Annotated[str, typer.Option("--profile", "-p", help="A profile of model_repo/profiles.yaml")],
    role: Annotated[str, typer.Option(help="cloud or onprem")] = "cloud",
) -> None:
    """Print the model a client calls, its input style and whether it reasons (the gateway's
    model / triton_inputs / reasoning)."""
    from dualtrack.model_repo import ModelRepoError, client_call

    if role not in ("cloud", "onprem"):
        raise fail(f"--role {role!r}: allowed: cloud, onprem")
    try:
        call = client_call(profile, role)  # type: ignore[arg-type]
    except ModelRepoError as exc:
        raise fail(str(exc)) from None
    typer.echo(f"{call.model} {call.inputs} {str(call.reasoning).lower()}")


@model_repo_app.command("check")
def model_repo_check(repo: Annotated[Path, typer.Argument(help="A Triton model repository")]) -> None:
    """Parse every config.pbtxt with Triton's ModelConfig, check ensemble wiring and profile coherence."""
    from dualtrack.model_repo import ModelRepoError, check

    try:
        problems = check(repo)
    except ModelRepoError as exc:
        raise fail(str(exc)) from None
    if problems:
        raise fail(f"{len(problems)} problem(s) in {repo}:\n  " + "\n  ".join(problems), code=1)
    console.print(f"{repo}: ok")
