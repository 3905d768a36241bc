"""Documents are parsed in child processes with CPU, memory and wall-clock limits.

A hostile or merely huge file (a PDF of 100,000 pages, a DOCX whose XML unpacks to hundreds of
megabytes, HTML nested thousands deep) can make a parser spin, eat memory or crash the
interpreter. Parsed in the gateway's own process, that takes the gateway down with it. Parsed
here, the child is what runs out: the upload is rejected naming the limit it crossed, and the
gateway, and everything stored, are untouched.

How: a *parser server* (``python -m services.kb.sandbox``, started on first use) imports the
parsers once and then, per document, forks a child that sets its limits (``RLIMIT_AS``,
``RLIMIT_CPU``), parses one document, answers and exits; the server kills a child that runs past
the wall-clock limit. A document thus costs one ``fork`` (milliseconds), and nothing one
document did is left over for the next. What crosses back is JSON, never a pickle: a parser
subverted by its input cannot hand the gateway code to run.

The protocol on the server's stdin/stdout: one JSON line per request (``name``, ``size``, the
limits) followed by ``size`` bytes of document; one JSON line per answer.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import IO, Any

from services.kb.access import Acl
from services.kb.classification import Classification
from services.kb.errors import DocumentRejected
from services.kb.models import Block, LoadedDocument

PRELOAD = ("services.kb.loaders", "pypdf", "docx", "bs4", "lxml.etree")
"""What the parser server imports once, so that no child pays for it."""

_START_S = 60.0
"""Longest wait for the parser server to start (it imports the parsers)."""


@dataclass(frozen=True)
class ParserLimits:
    """What one document's parse may use (``ingest.parser_*``)."""

    cpu_s: int
    memory_mb: int
    timeout_s: float


class ParserServer:
    """The parent's side: one server process, one request at a time, restarted if it dies."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None

    def parse(self, data: bytes, name: str, limits: ParserLimits) -> LoadedDocument:
        request = {"name": name, "size": len(data), **limits.__dict__}
        with self._lock:
            for attempt in (1, 2):  # a server that died between documents is started again, once
                proc = self._server()
                try:
                    assert proc.stdin is not None and proc.stdout is not None
                    proc.stdin.write(json.dumps(request).encode() + b"\n" + data)
                    proc.stdin.flush()
                    line = _readline(proc.stdout, limits.timeout_s + _START_S)
                except (BrokenPipeError, EOFError, TimeoutError) as exc:
                    self._stop()
                    if attempt == 2 or isinstance(exc, TimeoutError):
                        raise DocumentRejected(name, "the parser server did not answer") from None
                    continue
                try:
                    answer = json.loads(line)
                    if "rejected" in answer:
                        reason = answer["rejected"]
                        raise DocumentRejected(name, reason if isinstance(reason, str) else "rejected")
                    return _document(answer["document"])
                except DocumentRejected:
                    raise
                except Exception:
                    # not an answer this protocol gives: whatever wrote it, that server is not used again
                    self._stop()
                    raise DocumentRejected(name, "the parser's answer could not be read") from None
        raise AssertionError("unreachable")

    def close(self) -> None:
        with self._lock:
            self._stop()

    def _server(self) -> subprocess.Popen[bytes]:
        if self._proc is None or self._proc.poll() is not None:
            # only what an interpreter needs: the gateway's settings and secrets stay out of reach
            env = {
                "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                "LANG": "C.UTF-8",
                "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
            }
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "services.kb.sandbox"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env=env,
                close_fds=True,
            )
        return self._proc

    def _stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(5)
            self._proc = None


_server = ParserServer()


def parse_isolated(data: bytes, name: str, limits: ParserLimits) -> LoadedDocument:
    """``load_document`` in a child process; a limit crossed raises ``DocumentRejected``."""
    return _server.parse(data, name, limits)


def _wait_readable(fd: int, timeout_s: float) -> bool:
    """``poll``, not ``select``: a gateway with many open files has descriptors past 1024."""
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
    return bool(poller.poll(max(timeout_s, 0) * 1000))


def _readline(stream: IO[bytes], timeout_s: float) -> bytes:
    if not _wait_readable(stream.fileno(), timeout_s):
        raise TimeoutError
    line = stream.readline()
    if not line:
        raise EOFError
    return line


def _document(d: dict[str, Any]) -> LoadedDocument:
    return LoadedDocument(
        name=d["name"],
        blocks=[Block(text=b["text"], page=b["page"], section=b["section"]) for b in d["blocks"]],
        title=d["title"],
        declared=Classification(d["declared"]) if d["declared"] is not None else None,
        declared_acl=Acl.parse_stored(d["declared_acl"]) if d["declared_acl"] is not None else None,
        metadata=d["metadata"],
    )


def _plain(doc: LoadedDocument) -> dict[str, Any]:
    return {
        "name": doc.name,
        "blocks": [{"text": b.text, "page": b.page, "section": b.section} for b in doc.blocks],
        "title": doc.title,
        "declared": doc.declared.value if doc.declared is not None else None,
        "declared_acl": doc.declared_acl.stored() if doc.declared_acl is not None else None,
        "metadata": doc.metadata,
    }


# -- the server's side ----------------------------------------------------------------------------


def serve(inp: IO[bytes], out: IO[bytes]) -> None:
    """Answer requests until stdin closes: each in a fresh child."""
    for name in PRELOAD:
        __import__(name)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    while line := inp.readline():
        request = json.loads(line)
        data = inp.read(request["size"])
        limits = ParserLimits(request["cpu_s"], request["memory_mb"], request["timeout_s"])
        out.write(json.dumps(_one(data, request["name"], limits)).encode() + b"\n")
        out.flush()


def _one(data: bytes, name: str, limits: ParserLimits) -> dict[str, Any]:
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: limits, one parse, one answer, gone -- whatever happens
        try:
            os.setsid()  # its own process group: a timeout kills whatever it started, too
            os.dup2(writer, 3)
            os.closerange(4, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)  # the next documents arrive on the server's stdin: not for it
            os.close(null)
            _child(3, data, name, limits)
        finally:
            os._exit(0)
    os.close(writer)
    chunks: list[bytes] = []
    deadline = time.monotonic() + limits.timeout_s
    # an honest child builds its answer in memory, so it cannot be larger than its memory limit;
    # one that streams more is not parsing, and must not fill this process instead
    cap, size = limits.memory_mb * 1024 * 1024, 0
    timed_out = oversized = False
    with os.fdopen(reader, "rb") as answer:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not _wait_readable(answer.fileno(), left):
                timed_out = True
                break
            chunk = answer.read1(1 << 20)
            if not chunk:
                break
            size += len(chunk)
            if size > cap:
                oversized = True
                break
            chunks.append(chunk)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)  # on a timeout, and anything it left running
    _, status = os.waitpid(pid, 0)
    if timed_out:
        return {"rejected": f"parsing took longer than {limits.timeout_s:g} s (ingest.parser_timeout_s)"}
    if oversized:
        return {"rejected": f"the parser's answer is over {limits.memory_mb} MB (ingest.parser_memory_mb)"}
    if chunks:
        try:
            return json.loads(b"".join(chunks))
        except ValueError:
            pass  # cut short: the exit status says why
    return {"rejected": _death(status, limits)}


def _child(writer: int, data: bytes, name: str, limits: ParserLimits) -> None:
    from services.kb.loaders import load_document

    _limit(resource.RLIMIT_AS, limits.memory_mb * 1024 * 1024, 0)
    _limit(resource.RLIMIT_CPU, limits.cpu_s, 1)  # SIGXCPU, then SIGKILL a second later
    try:
        answer: dict[str, Any] = {"document": _plain(load_document(data, name))}
    except DocumentRejected as exc:
        answer = {"rejected": exc.reason}
    except MemoryError:
        answer = {"rejected": _memory(limits)}
    except RecursionError:
        answer = {"rejected": "nested too deeply to parse"}
    except Exception as exc:  # a parser's own bug must be a rejection, not a 500
        answer = {"rejected": f"cannot be parsed ({type(exc).__name__}): {exc}"}
    try:
        payload = json.dumps(answer).encode()
    except MemoryError:
        payload = json.dumps({"rejected": _memory(limits)}).encode()
    with os.fdopen(writer, "wb") as out:
        out.write(payload)


def _limit(which: int, soft: int, grace: int) -> None:
    """Lower a limit to ``soft`` (hard: ``soft + grace``), never above a hard limit already set
    (a unit's LimitAS=, say): the stricter one stands."""
    _, hard = resource.getrlimit(which)
    if hard != resource.RLIM_INFINITY:
        soft, grace = min(soft, hard), min(grace, max(hard - soft, 0))
    resource.setrlimit(which, (soft, soft + grace))


def _death(status: int, limits: ParserLimits) -> str:
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGXCPU:
        return f"parsing used more than {limits.cpu_s} s of CPU (ingest.parser_cpu_s)"
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
        # the hard CPU limit (SIGXCPU ignored), or the kernel's OOM killer
        return (
            f"the parser was killed: more than {limits.cpu_s} s of CPU (ingest.parser_cpu_s) or out "
            f"of memory (ingest.parser_memory_mb, {limits.memory_mb} MB)"
        )
    code = os.waitstatus_to_exitcode(status)
    return f"the parser stopped without an answer (exit status {code}); the file cannot be read"


def _memory(limits: ParserLimits) -> str:
    return f"parsing needs more than {limits.memory_mb} MB (ingest.parser_memory_mb)"


if __name__ == "__main__":
    # answers go out on a descriptor of their own; anything a parser prints goes to stderr
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    serve(sys.stdin.buffer, answers)
