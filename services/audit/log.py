"""The audit log writer: one sealed JSON line per request, appended under a lock.

One process writes a log directory at a time (an exclusive ``flock`` on ``audit.lock``), so two
gateways pointed at one directory fail at start-up instead of forking the chain. The file is
created 0600 in a 0700 directory. When it grows past ``audit.max_bytes`` it is renamed to a
segment named after its first sequence number and a new file continues the chain; the oldest
segments beyond ``audit.keep`` are deleted. With ``audit.journald`` each line also goes to
standard error, which systemd's journal collects (and ships, where the site ships its journal).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from services.audit.chain import CURRENT, GENESIS, AuditError, files, records, seal, segment_name
from services.config import AuditSettings

log = logging.getLogger(__name__)


class AuditLog:
    def __init__(self, settings: AuditSettings) -> None:
        self.settings = settings
        self.directory = settings.directory()
        self._lock = threading.Lock()
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._lock_file = (self.directory / "audit.lock").open("a")
        except OSError as exc:
            raise AuditError(f"audit log {self.directory}: cannot be created: {exc.strerror}") from None
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock_file.close()
            raise AuditError(
                f"audit log {self.directory} is in use by another process; give each gateway its own "
                "audit.dir"
            ) from None
        self.seq, self.prev, self._first = self._resume()
        self._file = self._open()
        self._stderr = settings.journald

    @property
    def path(self) -> Path:
        return self.directory / CURRENT

    def _resume(self) -> tuple[int, str, int]:
        """Sequence number and hash of the last record, and the current file's first seq."""
        paths = files(self.directory)
        if not paths:
            return 0, GENESIS, 1
        last_path = paths[-1]
        raw = last_path.read_bytes()
        if raw and not raw.endswith(b"\n"):
            raise AuditError(
                f"{last_path} ends in an incomplete record (a crash while writing?): inspect it, cut the "
                "file after its last complete line, then start again (`dualtrack audit verify` checks it)"
            )
        last: dict[str, Any] | None = None
        first: dict[str, Any] | None = None
        for _, record in records(last_path):
            first = first or record
            last = record
        if last is None:
            return 0, GENESIS, 1
        seq, prev = int(last["seq"]), str(last["hash"])
        if last_path.name != CURRENT:
            return seq, prev, seq + 1
        return seq, prev, int(first["seq"]) if first else seq + 1

    def _open(self) -> Any:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.fchmod(fd, 0o600)
        return os.fdopen(fd, "ab", buffering=0)

    def write(self, record: dict[str, Any]) -> dict[str, Any]:
        """Seal and append one record; returns it as written. Raises :class:`AuditError`."""
        with self._lock:
            sealed = seal({"seq": self.seq + 1, **record}, self.prev)
            line = json.dumps(sealed, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
            fd = self._file.fileno()
            size = os.fstat(fd).st_size
            try:
                written = 0
                while written < len(line):
                    written += os.write(fd, line[written:])
                if self.settings.fsync:
                    os.fsync(fd)
            except OSError as exc:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, size)  # no torn record: the next one starts on a clean line
                raise AuditError(f"audit log {self.path}: write failed: {exc.strerror}") from None
            self.seq, self.prev = sealed["seq"], sealed["hash"]
            if self._stderr:
                sys.stderr.buffer.write(b"dualtrack-audit " + line)
                sys.stderr.flush()
            if size + len(line) >= self.settings.max_bytes:
                self._rotate()
            return sealed

    def _rotate(self) -> None:
        self._file.close()
        os.replace(self.path, self.directory / segment_name(self._first))
        self._first = self.seq + 1
        self._file = self._open()
        segments = [p for p in files(self.directory) if p.name != CURRENT]
        for old in segments[: max(0, len(segments) - self.settings.keep)]:
            with contextlib.suppress(OSError):
                old.unlink()
                log.info("audit log: removed %s (audit.keep = %d)", old.name, self.settings.keep)

    def close(self) -> None:
        with self._lock:
            with contextlib.suppress(OSError):
                self._file.close()
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock_file, fcntl.LOCK_UN)
                self._lock_file.close()


def utc_now() -> str:
    """An RFC 3339 timestamp with microseconds, UTC."""
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}Z"
