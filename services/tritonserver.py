"""Run the real ``tritonserver`` binary that ships in the ``nvidia-pytriton`` wheel.

On premises (and in tests) Triton runs on CPU without a container: the wheel
carries Triton (2.51), its Python backend and a backend stub per Python
version. The binary needs a backend directory holding the stub for *this*
Python, the wheel's vendored libraries plus libpython on ``LD_LIBRARY_PATH``,
and this environment's ``bin`` first on ``PATH``: the backend stub ignores
``PYTHONPATH`` and gives Python models the packages of the first Python environment on
``PATH`` (transformers, this repository's ``services``). A
"Python-based backend" is a directory ``backends/<name>/model.py``; any
``backend: "<name>"`` model then runs on it -- how a CPU stand-in can serve a
``tensorrtllm`` config (tests only; production uses the NGC image).

``python -m services.tritonserver --model-repository DIR`` runs one in the
foreground (the on-prem systemd unit does this).
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

SHM_GLOB = "/dev/shm/triton_python_backend_shm_region_*"  # noqa: S108 (Triton's own path)


class TritonError(RuntimeError):
    """Triton could not be prepared or did not become ready (the message says why, with its log)."""


def _pytriton_root() -> Path:
    try:
        import pytriton
    except ImportError as exc:  # pragma: no cover - a broken install
        raise TritonError("the nvidia-pytriton package (which ships tritonserver) is not installed") from exc
    return Path(pytriton.__file__).resolve().parent / "tritonserver"


def binary() -> Path:
    return _pytriton_root() / "bin" / "tritonserver"


def library_path() -> str:
    """libpython for the backend stub, then the wheel's vendored libraries."""
    import pytriton

    libs = Path(pytriton.__file__).resolve().parent.parent / "nvidia_pytriton.libs"
    parts = [sysconfig.get_config_var("LIBDIR") or "", str(libs), os.environ.get("LD_LIBRARY_PATH", "")]
    return ":".join(p for p in parts if p)


def prepare_backends(target: Path, extra: dict[str, Path] | None = None) -> Path:
    """A backend directory: the python backend with this Python's stub, plus Python-based backends.

    ``extra`` maps a backend name to a ``model.py`` implementing it.
    """
    root = _pytriton_root()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise TritonError(f"pytriton ships no Python backend stub for Python {version}")
    backends = target / "backends"
    if backends.exists():
        shutil.rmtree(backends)
    shutil.copytree(root / "backends", backends)
    shutil.copy2(stub, backends / "python" / "triton_python_backend_stub")
    for name, model_py in (extra or {}).items():
        (backends / name).mkdir()
        shutil.copy2(model_py, backends / name / "model.py")
    return backends


def clean_shared_memory() -> int:
    """Remove Python-backend shared-memory regions a killed server left behind; returns how many."""
    removed = 0
    for path in glob.glob(SHM_GLOB):
        try:
            os.unlink(path)
            removed += 1
        except OSError:
            pass
    return removed


@dataclass
class TritonServer:
    """One tritonserver process on loopback (or ``host``) with explicit ports."""

    model_repository: Path
    http_port: int
    grpc_port: int
    metrics_port: int
    host: str = "127.0.0.1"
    workdir: Path | None = None
    extra_backends: dict[str, Path] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    log_verbose: int = 0
    flags: dict[str, str] = field(default_factory=dict)
    """More tritonserver flags (``{"exit-timeout-secs": "90"}``); repository, backends and ports stay ours."""
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def log_path(self) -> Path:
        assert self.workdir is not None
        return self.workdir / f"tritonserver-{self.http_port}.log"

    def command(self, backend_dir: Path) -> list[str]:
        """The binary and its flags: this object's repository, ports and address, then ``flags``."""
        defaults = {
            "model-repository": str(self.model_repository),
            "backend-directory": str(backend_dir),
            "http-address": self.host,
            "grpc-address": self.host,
            "metrics-address": self.host,
            "http-port": str(self.http_port),
            "grpc-port": str(self.grpc_port),
            "metrics-port": str(self.metrics_port),
            "allow-gpu-metrics": "false",
            "exit-timeout-secs": "5",
            "log-verbose": str(self.log_verbose),
        }
        fixed = {"model-repository", "backend-directory", "http-port", "grpc-port", "metrics-port"}
        overrides = {k: v for k, v in self.flags.items() if k not in fixed}
        return [str(binary())] + [f"--{k}={v}" for k, v in {**defaults, **overrides}.items()]

    def environment(self) -> dict[str, str]:
        bin_dir = str(Path(sys.executable).parent)
        # Python models run with this environment: keep the gateway's own settings and secrets out
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("DUALTRACK_")}
        return {
            **inherited,
            "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
            "LD_LIBRARY_PATH": library_path(),
            **self.env,
        }

    def start(self, timeout_s: float = 60.0) -> TritonServer:
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="dualtrack-triton-"))
        backend_dir = prepare_backends(self.workdir, self.extra_backends)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.command(backend_dir),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.environment(),
            start_new_session=True,
        )
        log.close()
        self.wait_ready(timeout_s)
        return self

    def is_ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/v2/health/ready", timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise TritonError(f"tritonserver exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self.is_ready():
                return
            time.sleep(0.1)
        raise TritonError(f"tritonserver not ready after {timeout_s:.0f}s:\n{self.log_tail()}")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 20.0) -> None:
        """Stop (SIGTERM, then SIGKILL); ``sig=SIGKILL`` simulates a crash."""
        if self.proc is None or self.proc.poll() is not None:
            self.proc = None
            return
        os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None
        if sig == signal.SIGKILL:
            clean_shared_memory()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """Foreground server for a systemd unit: SIGTERM stops Triton cleanly."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m services.tritonserver", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--model-repository", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default: loopback)")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--workdir", type=Path, help="backend directory and log (default: a temp dir)")
    parser.add_argument("--ready-timeout", type=float, default=600.0)
    parser.add_argument(
        "--backend",
        action="append",
        default=[],
        metavar="NAME=MODEL_PY",
        help="a Python-based backend: serve `backend: NAME` models with MODEL_PY (repeatable)",
    )
    args = parser.parse_args(argv)
    if not args.model_repository.is_dir():
        parser.error(f"--model-repository {args.model_repository}: not a directory")
    extra: dict[str, Path] = {}
    for spec in args.backend:
        name, sep, path = spec.partition("=")
        if not sep or not name or not Path(path).is_file():
            parser.error(f"--backend {spec!r}: expected NAME=PATH to an existing model.py")
        extra[name] = Path(path)
    server = TritonServer(
        args.model_repository.resolve(),
        args.http_port,
        args.grpc_port,
        args.metrics_port,
        host=args.host,
        workdir=args.workdir,
        extra_backends=extra,
    )
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        server.start(timeout_s=args.ready_timeout)
    except TritonError as exc:
        print(f"error: {exc}", file=sys.stderr)
        server.stop()
        return 1
    print(f"tritonserver ready on {server.url} (log: {server.log_path})", flush=True)
    while not stopping and server.proc is not None and server.proc.poll() is None:
        time.sleep(0.5)
    code = 0 if stopping else (server.proc.returncode if server.proc else 1)
    server.stop()
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
