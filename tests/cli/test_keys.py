"""``dualtrack keys``: the key is shown once and works; list never shows it; revoke holds."""

from __future__ import annotations

import re
from pathlib import Path

from typer.testing import CliRunner

from dualtrack.cli import app
from services.auth.keys import KeyStore


def _run(*args: str):
    return CliRunner().invoke(app, list(args), catch_exceptions=False, env={"COLUMNS": "200"})


def test_create_list_revoke(tmp_path: Path) -> None:
    keys = str(tmp_path / "keys.db")
    created = _run("keys", "create", "ingest-bot", "--role", "contributor", "--group", "finance",
                   "--clearance", "confidential", "--expires-in", "30d", "--keys-file", keys)  # fmt: skip
    assert created.exit_code == 0, created.output
    (key,) = re.findall(r"^dtk_\S+$", created.output, re.M)
    principal = KeyStore(Path(keys)).authenticate(key)
    assert principal is not None and principal.groups == {"finance"}

    listed = _run("keys", "list", "--keys-file", keys)
    assert "ingest-bot" in listed.output and "active" in listed.output
    assert key.rsplit("_", 1)[1] not in listed.output

    assert _run("keys", "revoke", "ingest-bot", "--keys-file", keys).exit_code == 0
    assert KeyStore(Path(keys)).authenticate(key) is None
    again = _run("keys", "revoke", "ingest-bot", "--keys-file", keys)
    assert again.exit_code == 2 and "was revoked at" in again.output


def test_bad_options_name_what_is_wrong(tmp_path: Path) -> None:
    keys = str(tmp_path / "keys.db")
    r = _run("keys", "create", "bot", "--role", "reader", "--expires-in", "5w", "--keys-file", keys)
    assert r.exit_code == 2 and "--expires-in '5w'" in r.output
    r = _run("keys", "create", "bot", "--role", "root", "--keys-file", keys)
    assert r.exit_code == 2 and "'root' is not one of" in r.output
    assert not Path(keys).exists() or KeyStore(Path(keys)).records() == []
