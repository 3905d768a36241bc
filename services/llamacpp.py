"""Run a GGUF model with llama.cpp's OpenAI-compatible server (``llama-cpp-python[server]``).

The on-premises CPU model: where a site has no GPUs on its premises, confidential questions
and cloud outages are answered by a GGUF model (DeepSeek-R1-Distill-Qwen 1.5B/7B/14B
Q4_K_M) on the host's cores. The server runs in an environment of its own (its pins differ
from the gateway's): ``python`` names that environment's interpreter. It listens on
loopback only; the gateway reaches it as its ``llm.local`` endpoint (``kind = "openai"``),
counts prompt tokens with the same GGUF's tokenizer and derives its deadlines from the
measured speed.

``python -m services.llamacpp --model M.gguf --port P`` checks the file and runs the server
in the foreground with the flags the systemd unit uses.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIAS = "local-model"


class LlamaServerError(RuntimeError):
    """The model file or the server is not usable; the message says why."""


def check_gguf(path: Path) -> Path:
    """``path`` if it is a readable GGUF file, else :class:`LlamaServerError` naming the problem."""
    if not path.exists():
        raise LlamaServerError(f"{path}: no such file (the site's GGUF model, e.g. a Q4_K_M .gguf)")
    if not path.is_file():
        raise LlamaServerError(f"{path}: not a file")
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise LlamaServerError(f"{path}: cannot read it: {exc}") from None
    if magic != GGUF_MAGIC:
        raise LlamaServerError(f"{path}: not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r})")
    return path


@dataclass
class LlamaServer:
    """One ``llama_cpp.server`` process on loopback."""

    model: Path
    port: int
    python: str = sys.executable
    alias: str = DEFAULT_ALIAS
    threads: int = 2
    ctx: int = 4096
    host: str = "127.0.0.1"
    workdir: Path | None = None
    extra: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        assert self.workdir is not None
        return self.workdir / f"llama-server-{self.port}.log"

    def command(self) -> list[str]:
        """The server and its flags: ``logits_all`` off (on, it doubles the time to first token),
        ``interrupt_requests`` off (on, every new request cuts off the answer being generated:
        with several users, requests must queue instead)."""
        flags = {
            "model": str(self.model),
            "model_alias": self.alias,
            "n_ctx": str(self.ctx),
            "n_threads": str(self.threads),
            "n_threads_batch": str(self.threads),
            "logits_all": "false",
            "interrupt_requests": "false",
            "host": self.host,
            "port": str(self.port),
            **self.extra,
        }
        return [self.python, "-m", "llama_cpp.server"] + [x for k, v in flags.items() for x in (f"--{k}", v)]

    def start(self, timeout_s: float = 120.0) -> LlamaServer:
        check_gguf(self.model)
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="dualtrack-llama-"))
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.command(),
            stdout=log,
            stderr=subprocess.STDOUT,
            env={k: v for k, v in os.environ.items() if not k.startswith("DUALTRACK_")},
            start_new_session=True,
        )
        log.close()
        self.wait_ready(timeout_s)
        return self

    def is_ready(self) -> bool:
        return ready(self.url)

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise LlamaServerError(
                    f"the llama.cpp server exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            if self.is_ready():
                return
            time.sleep(0.2)
        raise LlamaServerError(
            f"the llama.cpp server is not ready after {timeout_s:.0f}s:\n{self.log_tail()}"
        )

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 20.0) -> None:
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

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def ready(url: str) -> bool:
    """Whether the server at ``url`` has its model loaded (``/v1/models`` answers)."""
    try:
        return httpx.get(f"{url.rstrip('/')}/v1/models", timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--check", action="store_true", help="only check that --model is a GGUF file")
    parser.add_argument("--python", default=sys.executable, help="the server environment's interpreter")
    parser.add_argument("--port", type=int, default=8092)
    parser.add_argument("--alias", default=DEFAULT_ALIAS)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: every core)")
    parser.add_argument("--ctx", type=int, default=4096)
    args = parser.parse_args(argv)
    try:
        check_gguf(args.model)
    except LlamaServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        return 0
    threads = args.threads or os.cpu_count() or 2
    server = LlamaServer(
        args.model, args.port, python=args.python, alias=args.alias, threads=threads, ctx=args.ctx
    )
    os.execv(server.python, server.command())  # noqa: S606 (the foreground process is the server)
    return 0  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
