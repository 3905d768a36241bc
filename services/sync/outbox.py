"""A durable outbox between a local write and the broker's acknowledgement.

Publishing straight from the request would lose the event when the broker is
unreachable or the process dies before librdkafka delivers it. Instead the
event is committed to a local SQLite file right after the knowledge-base write,
and a relay sends what is pending and removes only what the broker
acknowledged (acks=all). Pending events survive restarts and outages and go out
in the order they were written; one the broker can never take (too large, refused
for good) is moved to the ``rejected`` table with the reason instead of blocking
the rest.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path


class Outbox:
    """``(seq, key, value)`` rows, oldest first; safe to share between threads."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # an acknowledged ingest survives power loss
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, "
            "key BLOB NOT NULL, value BLOB NOT NULL, created REAL NOT NULL)"
        )
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS rejected (seq INTEGER PRIMARY KEY, key BLOB NOT NULL, "
            "value BLOB NOT NULL, created REAL NOT NULL, reason TEXT NOT NULL, rejected REAL NOT NULL)"
        )
        path.chmod(0o600)  # events carry document text

    def add(self, key: bytes, value: bytes) -> int:
        with self._lock:
            cur = self._db.execute(
                "INSERT INTO outbox (key, value, created) VALUES (?, ?, ?)", (key, value, time.time())
            )
            return int(cur.lastrowid or 0)

    def pending(self, limit: int = 500) -> list[tuple[int, bytes, bytes]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, key, value FROM outbox ORDER BY seq LIMIT ?", (limit,)
            ).fetchall()
        return [(int(s), bytes(k), bytes(v)) for s, k, v in rows]

    def remove(self, seqs: list[int]) -> None:
        if not seqs:
            return
        with self._lock:
            self._db.executemany("DELETE FROM outbox WHERE seq = ?", [(s,) for s in seqs])

    def reject(self, seq: int, reason: str) -> None:
        """Set aside an event the broker will never take (kept for the operator, not retried)."""
        with self._lock:
            self._db.execute("BEGIN")
            self._db.execute(
                "INSERT OR REPLACE INTO rejected "
                "SELECT seq, key, value, created, ?, ? FROM outbox WHERE seq = ?",
                (reason, time.time(), seq),
            )
            self._db.execute("DELETE FROM outbox WHERE seq = ?", (seq,))
            self._db.execute("COMMIT")

    def rejected(self) -> list[tuple[bytes, str]]:
        """``(key, reason)`` of every set-aside event."""
        with self._lock:
            rows = self._db.execute("SELECT key, reason FROM rejected ORDER BY seq").fetchall()
        return [(bytes(k), str(r)) for k, r in rows]

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT count(*) FROM outbox").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()
