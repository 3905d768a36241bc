"""``dualtrack``: the operator CLI.

Sub-commands are grouped by what they act on: ``local`` (the local stack),
``kb`` (the knowledge base, through the gateway), ``ask``, ``plan`` (the cloud
stack's offline plan), ``model-repo``, ``onprem``, ``sync``, ``bench``; each group is a
module of :mod:`dualtrack.commands`. User mistakes end with a one-line error and exit
code 2, never a traceback.
"""

from __future__ import annotations

import os
import sys

import typer
from rich.markup import escape

from dualtrack.commands.audit import audit_app
from dualtrack.commands.bench import bench_app
from dualtrack.commands.common import err
from dualtrack.commands.kb import ask_app, kb_app
from dualtrack.commands.keys import keys_app
from dualtrack.commands.local import local_app
from dualtrack.commands.model_repo import model_repo_app
from dualtrack.commands.onprem import onprem_app
from dualtrack.commands.plan import plan_app
from dualtrack.commands.sync import sync_app
from dualtrack.commands.wheelhouse import wheelhouse_app
from services.config import ConfigError

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__.split("\n\n")[0])
app.add_typer(local_app, name="local")
app.add_typer(kb_app, name="kb")
app.add_typer(bench_app, name="bench")
app.add_typer(model_repo_app, name="model-repo")
app.add_typer(onprem_app, name="onprem")
app.add_typer(sync_app, name="sync")
app.add_typer(keys_app, name="keys")
app.add_typer(audit_app, name="audit")
onprem_app.registered_commands += wheelhouse_app.registered_commands
app.registered_commands += ask_app.registered_commands + plan_app.registered_commands


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app()
    except ConfigError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        sys.exit(2)
