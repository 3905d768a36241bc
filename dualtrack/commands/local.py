"""``dualtrack local``: the local stack (Milvus Lite, the gateway, a local llama.cpp model)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from dualtrack.commands.common import console, fail, settings_or_fail
from dualtrack.local import MODEL_PORT, LocalStack, LocalStackError, describe
from services.config import ConfigError
from services.llamacpp import LlamaServerError

local_app = typer.Typer(
    no_args_is_help=True, help="Run the local stack (Milvus Lite + gateway, optionally a GGUF model)."
)

# -- local stack --------------------------------------------------------------------------------


def _stack() -> LocalStack:
    try:
        return LocalStack(settings_or_fail())
    except ConfigError as exc:
        raise fail(str(exc)) from None


@local_app.command("up")
def local_up(
    show_key: Annotated[bool, typer.Option(help="Print the generated API key")] = True,
    model: Annotated[
        Path | None,
        typer.Option(
            help="A GGUF model to answer with (llama.cpp on this machine's cores); "
            "without one, answers are extractive"
        ),
    ] = None,
    threads: Annotated[int | None, typer.Option(min=1, help="CPU threads for the model")] = None,
    model_port: Annotated[
        int, typer.Option(min=1, max=65535, help="The model's port on 127.0.0.1")
    ] = MODEL_PORT,
) -> None:
    """Start Milvus Lite (server mode), the gateway and, with --model, a local llama.cpp model."""
    stack = _stack()
    with console.status("starting the local stack (models load in a few seconds)..."):
        try:
            stack.up(model=model, threads=threads, model_port=model_port)
        except (LocalStackError, LlamaServerError) as exc:
            raise fail(str(exc)) from None
    _print_status(stack)
    if show_key:
        console.print(f"API key ({stack.key_file}, mode 0600): [bold]{stack.api_key()}[/]")
        console.print(f"OpenAPI docs: {stack.gateway_url}/docs")


@local_app.command("down")
def local_down() -> None:
    """Stop the gateway and Milvus Lite."""
    stopped = _stack().down()
    console.print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))


@local_app.command("status")
def local_status(json_out: Annotated[bool, typer.Option("--json", help="Machine-readable")] = False) -> None:
    """What runs, where its logs are, and its health."""
    stack = _stack()
    if json_out:
        console.print_json(describe(stack.status()))
        return
    _print_status(stack)


def _print_status(stack: LocalStack) -> None:
    table = Table(title=f"local stack ({stack.home})")
    for col in ("component", "pid", "address", "health", "log"):
        table.add_column(col)
    for c in stack.status():
        style = "green" if c.health in ("ready", "listening") else "red"
        table.add_row(c.name, str(c.pid or "-"), c.address, Text(c.health, style=style), Text(str(c.log)))
    console.print(table)
