"""The audit log's hash chain: how a record is sealed, and how a directory of them is verified.

Each record is one JSON line. ``hash`` is SHA-256 over the previous record's hash and the
record's canonical JSON (sorted keys, no whitespace, ``hash`` itself left out); ``prev`` repeats
the previous hash and ``seq`` counts up by one. Changing, removing, reordering or inserting a
record anywhere breaks every later link, which :func:`verify` reports with the file and line.

Rotated segments (``audit-<first seq>.jsonl``) continue the chain of the one before. Deleting the
oldest segments (retention) is allowed: the chain is then verified from the oldest one present,
and the report says where it starts. A log rewritten in full by someone who can write the files
is consistent again, which is why records are also shipped off the host (journald, a log
collector) and why ``verify`` prints the head hash to compare with a copy kept elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

GENESIS: Final = "0" * 64
CURRENT: Final = "audit.jsonl"
_SEGMENT = re.compile(r"^audit-(\d{12})\.jsonl$")


class AuditError(RuntimeError):
    """The audit log cannot be written or does not verify; the message says where."""


def canonical(record: dict[str, Any]) -> bytes:
    body = {k: v for k, v in record.items() if k != "hash"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def seal(record: dict[str, Any], prev: str) -> dict[str, Any]:
    """``record`` with ``prev`` and its ``hash`` set."""
    record = {**record, "prev": prev}
    record["hash"] = hashlib.sha256(prev.encode() + b"\n" + canonical(record)).hexdigest()
    return record


def segment_name(first_seq: int) -> str:
    return f"audit-{first_seq:012d}.jsonl"


def files(directory: Path) -> list[Path]:
    """The log's files in chain order: rotated segments by first sequence number, then the
    current file."""
    rotated = sorted(p for p in directory.glob("audit-*.jsonl") if _SEGMENT.match(p.name))
    current = directory / CURRENT
    return [*rotated, *([current] if current.exists() else [])]


@dataclass(frozen=True)
class Verified:
    records: int
    first_seq: int | None
    last_seq: int | None
    head: str
    """The last record's hash: compare it with a copy kept off the host."""
    starts_at_genesis: bool


def records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, record)`` of one file; a line that is not a JSON object raises."""
    with path.open("rb") as data:
        for n, line in enumerate(data, 1):
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):
                raise AuditError(f"{path}:{n}: not a JSON record (truncated or altered)") from None
            if not isinstance(record, dict):
                raise AuditError(f"{path}:{n}: not a JSON record (truncated or altered)")
            yield n, record


def verify(directory: Path) -> Verified:
    """Check every link of the chain in ``directory``; :class:`AuditError` at the first bad one."""
    paths = files(directory)
    if not paths:
        raise AuditError(f"{directory}: no audit log here ({CURRENT} or audit-*.jsonl)")
    prev: str | None = None
    seq: int | None = None
    first: int | None = None
    genesis = False
    count = 0
    for path in paths:
        segment = _SEGMENT.match(path.name)
        opened = True
        for n, record in records(path):
            where = f"{path}:{n}"
            if opened and segment and record.get("seq") != int(segment.group(1)):
                raise AuditError(
                    f"{where}: the segment is named for seq {int(segment.group(1))} but starts at "
                    f"{record.get('seq')}: records were removed from its start"
                )
            if opened and prev is None and not segment and record.get("seq") != 1:
                raise AuditError(
                    f"{where}: the log was never rotated but starts at seq {record.get('seq')}: "
                    "records were removed from its start"
                )
            opened = False
            got_seq, got_prev, got_hash = record.get("seq"), record.get("prev"), record.get("hash")
            if not isinstance(got_seq, int) or not isinstance(got_prev, str) or not isinstance(got_hash, str):
                raise AuditError(f"{where}: the record lacks seq, prev or hash")
            if prev is None:
                first, genesis = got_seq, got_prev == GENESIS and got_seq == 1
            elif got_seq != (seq or 0) + 1:
                raise AuditError(f"{where}: seq {got_seq} follows {seq}: records were removed or reordered")
            elif got_prev != prev:
                raise AuditError(f"{where}: seq {got_seq} does not link to the record before it")
            try:
                intact = seal(record, got_prev)["hash"] == got_hash
            except (UnicodeEncodeError, ValueError, RecursionError):
                intact = False
            if not intact:
                raise AuditError(f"{where}: seq {got_seq} was altered (its hash does not match its content)")
            prev, seq = got_hash, got_seq
            count += 1
    return Verified(count, first, seq, prev or GENESIS, genesis)
