"""What the checks read from each converged host: the settings the roles wrote there.

The checks compare what runs with what was configured, so they need no copy of the
inventory's variables: the units and the (root-only) env files on the host are the truth.
"""

from __future__ import annotations

import itertools
import re
import shlex
from dataclasses import dataclass

import pytest

CONFIG_DIR = "/etc/dualtrack"
VENV = "/opt/dualtrack/venv"


@dataclass(frozen=True)
class Listener:
    address: str
    port: int


def _flags(argv: list[str]) -> dict[str, str]:
    return {a[2:]: b for a, b in itertools.pairwise(argv) if a.startswith("--")}


def _exec_start(host, unit: str) -> list[str]:
    text = host.file(f"/etc/systemd/system/{unit}.service").content_string
    line = re.search(r"^ExecStart=(.+)$", text, re.MULTILINE)
    assert line, f"{unit} has no ExecStart"
    return shlex.split(line.group(1))


def _unquote(value: str) -> str:
    """A value as systemd reads it from an env file (the roles write them double-quoted)."""
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return re.sub(r"\\(.)", r"\1", value[1:-1])
    return value


def env_file(host, name: str) -> dict[str, str]:
    text = host.run(f"cat {CONFIG_DIR}/{name}").stdout
    pairs = (line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#"))
    return {key: _unquote(value) for key, value in pairs}


@pytest.fixture(scope="module")
def gateway_env(host) -> dict[str, str]:
    return env_file(host, "gateway.env")


@pytest.fixture(scope="module")
def listeners(host, gateway_env) -> dict[str, list[Listener]]:
    milvus = _flags(_exec_start(host, "dualtrack-milvus"))
    triton = _flags(_exec_start(host, "dualtrack-triton"))
    return {
        "dualtrack-milvus": [Listener(milvus["host"], int(milvus["port"]))],
        "dualtrack-triton": [
            Listener(triton["host"], int(triton[key])) for key in ("http-port", "grpc-port", "metrics-port")
        ],
        "dualtrack-gateway": [
            Listener(gateway_env["DUALTRACK_GATEWAY__HOST"], int(gateway_env["DUALTRACK_GATEWAY__PORT"]))
        ],
    }
