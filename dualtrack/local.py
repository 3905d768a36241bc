"""The local stack: Milvus Lite in server mode, the gateway and -- given a GGUF model -- a
llama.cpp server as the gateway's local model, as background processes of the current user.
Without a model the gateway answers extractively (quoting passages), and says so.

Everything lives under one state directory (``.dualtrack/`` in the working
directory, or ``DUALTRACK_HOME``): data, logs, pid files and the generated API
key (mode 0600). Nothing is installed system-wide and nothing runs as root; both
servers listen on 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import httpx

from services.config import ConfigError, Settings, config_file
from services.llamacpp import DEFAULT_ALIAS, LlamaServer, LlamaServerError, check_gguf, ready

LOOPBACK = "127.0.0.1"
MODEL_PORT = 8092
LLAMA_ENV = ".venv-llama"
"""Where ``make up MODEL=...`` installs the llama.cpp server (its own environment)."""


class LocalStackError(RuntimeError):
    """The local stack cannot start or stop; the message says what to do."""


@dataclass(frozen=True)
class Component:
    name: str
    pid: int | None
    running: bool
    address: str
    health: str
    log: Path


def state_dir() -> Path:
    return Path(os.environ.get("DUALTRACK_HOME", ".dualtrack")).resolve()


class LocalStack:
    """Start, stop and inspect the local Milvus Lite server and gateway."""

    def __init__(self, settings: Settings, home: Path | None = None, manage_milvus: bool = True) -> None:
        """``manage_milvus=False`` runs only the gateway against ``milvus.uri``
        (an existing Milvus, e.g. standalone for benchmarks)."""
        self.settings = settings
        self.home = home or state_dir()
        self.manage_milvus = manage_milvus
        self.milvus_port = _milvus_port(settings) if manage_milvus else 0
        self.gateway_port = settings.gateway.port
        if settings.gateway.host != LOOPBACK:
            raise ConfigError(
                f"gateway.host = {settings.gateway.host!r}: the local stack only listens on {LOOPBACK}"
            )

    # -- paths -------------------------------------------------------------------------------

    @property
    def key_file(self) -> Path:
        return self.home / "api-key"

    def log_file(self, name: str) -> Path:
        return self.home / "logs" / f"{name}.log"

    def _pid_file(self, name: str) -> Path:
        return self.home / "run" / f"{name}.pid"

    @property
    def _model_port_file(self) -> Path:
        return self.home / "run" / "model.port"

    @property
    def model_port(self) -> int:
        """The port the running local model listens on (as started)."""
        try:
            return int(self._model_port_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return MODEL_PORT

    @property
    def gateway_url(self) -> str:
        return f"http://{LOOPBACK}:{self.gateway_port}"

    # -- lifecycle ---------------------------------------------------------------------------

    def api_key(self) -> str:
        """The local API key, generated on first use and stored with mode 0600."""
        if self.key_file.is_file():
            return self.key_file.read_text(encoding="utf-8").strip()
        self.home.mkdir(parents=True, exist_ok=True)
        key = secrets.token_urlsafe(32)
        fd = os.open(self.key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(key + "\n")
        return key

    def up(
        self,
        timeout_s: float = 180.0,
        gateway_env: dict[str, str] | None = None,
        model: Path | None = None,
        threads: int | None = None,
        model_port: int = MODEL_PORT,
    ) -> None:
        """Start what is not running and wait until the gateway is ready.
        ``gateway_env`` adds settings (``DUALTRACK_*``) for the gateway process; ``model`` (a
        GGUF file) runs a llama.cpp server that the gateway answers with."""
        env = dict(gateway_env or {})
        if model is not None:
            env.update(self.start_model(model, threads, timeout_s, model_port))
        self.start_milvus(timeout_s)
        self.start_gateway(timeout_s, env)

    def start_model(
        self, model: Path, threads: int | None = None, timeout_s: float = 180.0, port: int = MODEL_PORT
    ) -> dict[str, str]:
        """Start the llama.cpp server on ``model``; returns the gateway settings that use it."""
        self._prepare()
        model = check_gguf(model.expanduser()).resolve()
        if self._pid("model") is None:
            self._require_free(port, "--model-port")
            server = LlamaServer(model, port, python=llama_python(), threads=threads or os.cpu_count() or 2)
            self._spawn("model", server.command(), {})
            self._model_port_file.write_text(f"{port}\n", encoding="utf-8")
            self._wait(lambda: ready(server.url), "model", timeout_s)
        return {
            "DUALTRACK_LLM__LOCAL__KIND": "openai",
            "DUALTRACK_LLM__LOCAL__URL": f"http://{LOOPBACK}:{self.model_port}",
            "DUALTRACK_LLM__LOCAL__MODEL": DEFAULT_ALIAS,
            "DUALTRACK_LLM__LOCAL__TOKENIZER": str(model),
            "DUALTRACK_LLM__LOCAL__TIMEOUTS": "measured",
        }

    def _prepare(self) -> None:
        for sub in ("logs", "run", "milvus"):
            (self.home / sub).mkdir(parents=True, exist_ok=True)
        self.api_key()

    def start_milvus(self, timeout_s: float = 180.0) -> None:
        """Start Milvus Lite (server mode) unless it runs or is not ours to manage."""
        self._prepare()
        if self.manage_milvus and self._pid("milvus") is None:
            self._require_free(self.milvus_port, "milvus.uri")
            self._spawn(
                "milvus",
                [
                    _milvus_lite(),
                    "server",
                    "--data-dir",
                    str(self.home / "milvus"),
                    "--host",
                    LOOPBACK,
                    "--port",
                    str(self.milvus_port),
                ],
                {},
            )
            self._wait(lambda: _port_open(self.milvus_port), "milvus", timeout_s)

    def start_gateway(self, timeout_s: float = 180.0, gateway_env: dict[str, str] | None = None) -> None:
        """Start the gateway unless it runs; wait until it is ready."""
        self._prepare()
        if self._pid("gateway") is None:
            self._require_free(self.gateway_port, "gateway.port")
            env = {
                "DUALTRACK_MILVUS__URI": self.settings.milvus.uri,
                "DUALTRACK_GATEWAY__HOST": LOOPBACK,
                "DUALTRACK_GATEWAY__PORT": str(self.gateway_port),
                "DUALTRACK_GATEWAY__API_KEY_FILE": str(self.key_file),
                "DUALTRACK_GATEWAY__AUTH_ENABLED": "true",
                **(gateway_env or {}),
            }
            toml = config_file()
            if toml is not None:  # the gateway reads the same settings file as this CLI
                env["DUALTRACK_CONFIG"] = str(toml.resolve())
            self._spawn("gateway", [sys.executable, "-m", "services.gateway"], env)
        self._wait(self._gateway_ready, "gateway", timeout_s)

    def down(self, timeout_s: float = 20.0) -> list[str]:
        """Stop the gateway, then Milvus (SIGTERM, then SIGKILL after ``timeout_s``)."""
        stopped = []
        for name in ("gateway", "model", "milvus"):
            pid = self._pid(name)
            if pid is None:
                continue
            _terminate(pid, timeout_s)
            self._pid_file(name).unlink(missing_ok=True)
            stopped.append(name)
        return stopped

    def status(self) -> list[Component]:
        milvus_pid = self._pid("milvus")
        gateway_pid = self._pid("gateway")
        model_pid = self._pid("model")
        milvus_health = "listening" if _port_open(self.milvus_port) else "down"
        model_url = f"http://{LOOPBACK}:{self.model_port}"
        model = [
            Component(
                "model",
                model_pid,
                True,
                model_url,
                "ready" if ready(model_url) else "down",
                self.log_file("model"),
            )
        ]
        return [
            Component(
                "milvus",
                milvus_pid,
                milvus_pid is not None,
                f"http://{LOOPBACK}:{self.milvus_port}",
                milvus_health,
                self.log_file("milvus"),
            ),
            Component(
                "gateway",
                gateway_pid,
                gateway_pid is not None,
                self.gateway_url,
                self._gateway_health(),
                self.log_file("gateway"),
            ),
        ] + (model if model_pid is not None else [])

    # -- internals ---------------------------------------------------------------------------

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        log = self.log_file(name).open("ab")
        proc = subprocess.Popen(  # a long-lived child of no one: own session, own log
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **env},
            start_new_session=True,
            cwd=Path.cwd(),
        )
        log.close()
        self._pid_file(name).write_text(f"{proc.pid} {_start_time(proc.pid)}\n", encoding="utf-8")

    def _pid(self, name: str) -> int | None:
        """The pid of a running component started by us, else None (stale files removed)."""
        path = self._pid_file(name)
        try:
            pid_text, _, started = path.read_text(encoding="utf-8").strip().partition(" ")
            pid = int(pid_text)
        except (OSError, ValueError):
            return None
        if _alive(pid) and _start_time(pid) == started:  # a reused pid is someone else's process
            return pid
        path.unlink(missing_ok=True)
        return None

    def _require_free(self, port: int, setting: str) -> None:
        if _port_open(port):
            raise LocalStackError(
                f"port {port} on {LOOPBACK} is already in use by another process; stop it or "
                f"choose another port ({setting})"
            )

    def _wait(self, check: Callable[[], bool], name: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._pid(name) is None:
                raise LocalStackError(
                    f"{name} exited during start-up; see {self.log_file(name)}:\n{_tail(self.log_file(name))}"
                )
            if check():
                return
            time.sleep(0.25)
        raise LocalStackError(f"{name} not ready after {timeout_s:.0f}s; see {self.log_file(name)}")

    def _gateway_ready(self) -> bool:
        return self._gateway_health() == "ready"

    def _gateway_health(self) -> str:
        try:
            # with the stack's key: the reasons are shown to a principal with the monitor role
            headers = {"Authorization": f"Bearer {self.api_key()}"}
            r = httpx.get(f"{self.gateway_url}/readyz", headers=headers, timeout=2.0)
        except httpx.HTTPError:
            return "down"
        if r.status_code == 200:
            return "ready"
        try:
            reasons = r.json().get("reasons", [])
        except ValueError:
            reasons = []
        return "not ready: " + "; ".join(reasons) if reasons else f"HTTP {r.status_code}"


def llama_python() -> str:
    """The interpreter of the llama.cpp server's environment (``DUALTRACK_LLAMA_PYTHON``, or the
    one ``make up MODEL=...`` installs)."""
    explicit = os.environ.get("DUALTRACK_LLAMA_PYTHON")
    candidate = (
        Path(explicit) if explicit else Path(__file__).resolve().parent.parent / LLAMA_ENV / "bin" / "python"
    )
    if not candidate.is_file():
        raise LlamaServerError(
            f"no llama.cpp server environment at {candidate}: run `make up MODEL=path.gguf` (it builds "
            "and installs llama-cpp-python[server]) or set DUALTRACK_LLAMA_PYTHON"
        )
    return str(candidate)


def _milvus_port(settings: Settings) -> int:
    uri = urlparse(settings.milvus.uri)
    if uri.scheme not in ("http", "https") or uri.hostname not in (LOOPBACK, "localhost"):
        raise ConfigError(
            f"milvus.uri = {settings.milvus.uri!r}: the local stack runs Milvus Lite in server "
            f"mode and needs http://{LOOPBACK}:PORT"
        )
    return uri.port or 19530


def _milvus_lite() -> str:
    beside = Path(sys.executable).with_name("milvus-lite")
    found = str(beside) if beside.exists() else shutil.which("milvus-lite")
    if not found:
        raise LocalStackError("milvus-lite is not installed in this environment (pip install milvus-lite)")
    return found


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((LOOPBACK, port)) == 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child is not alive
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _start_time(pid: int) -> str:
    """Kernel start time of ``pid`` (field 22 of /proc/PID/stat); '' when unknown."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _terminate(pid: int, timeout_s: float) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _alive(pid):
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def describe(components: list[Component]) -> str:
    """JSON for scripts (``dualtrack local status --json``)."""
    return json.dumps([{**c.__dict__, "log": str(c.log)} for c in components], indent=2)
