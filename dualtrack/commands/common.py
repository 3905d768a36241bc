"""What every command shares: the consoles, the gateway client, the one-line error."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from dualtrack.client import GatewayClient
from dualtrack.local import state_dir
from services.config import ConfigError, Settings, load_settings

console = Console()
err = Console(stderr=True)

UrlOpt = Annotated[str | None, typer.Option("--url", help="Gateway URL (default: local stack)")]
KeyOpt = Annotated[
    str | None,
    typer.Option(
        "--api-key", envvar="DUALTRACK_API_KEY", help="API key (default: local stack's)", show_envvar=True
    ),
]


def fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def settings_or_fail() -> Settings:
    try:
        return load_settings()
    except ConfigError as exc:
        raise fail(str(exc)) from None


def gateway_client(url: str | None, api_key: str | None) -> GatewayClient:
    settings = settings_or_fail()
    base = url or settings.gateway.base_url()
    key = api_key
    if key is None and settings.gateway.api_key is not None:
        key = settings.gateway.api_key.get_secret_value()
    for path in (settings.gateway.api_key_file, state_dir() / "api-key"):
        if key is None and path is not None and Path(path).is_file():
            try:
                key = Path(path).read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise fail(f"cannot read the API key from {path}: {exc.strerror}") from None
    return GatewayClient(base, key)
