"""The audit log on a real filesystem: sealed, appended, rotated, resumed, verified; every kind
of tampering is found and named; two writers cannot share a log."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from services.audit.chain import CURRENT, AuditError, files, verify
from services.audit.log import AuditLog
from services.config import AuditSettings


def _log(tmp_path: Path, **kw: object) -> AuditLog:
    return AuditLog(AuditSettings(dir=tmp_path / "audit", **kw))


def _write(log: AuditLog, n: int) -> None:
    for i in range(n):
        log.write({"action": "search", "status": 200, "results": [{"chunk_id": f"c{i}"}]})


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


def test_records_chain_and_resume_after_a_restart(tmp_path: Path) -> None:
    log = _log(tmp_path)
    _write(log, 3)
    log.close()
    log = _log(tmp_path)  # a restarted gateway continues the chain
    _write(log, 2)
    log.close()
    result = verify(tmp_path / "audit")
    assert (result.records, result.first_seq, result.last_seq, result.starts_at_genesis) == (5, 1, 5, True)
    assert stat.S_IMODE(os.stat(tmp_path / "audit" / CURRENT).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "audit").st_mode) == 0o700


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (lambda ls: [ls[0], ls[1].replace('"c1"', '"cX"'), *ls[2:]], "seq 2 was altered"),
        (lambda ls: [ls[0], *ls[2:]], "seq 3 follows 1"),
        (lambda ls: [ls[0], ls[2], ls[1], *ls[3:]], "seq 3 follows 1"),
        (lambda ls: [*ls[:2], ls[1], *ls[2:]], "seq 2 follows 2"),
        (lambda ls: [ls[0], "not json\n", *ls[1:]], ":2: not a JSON record"),
        (lambda ls: [ls[0], "[" * 100_000 + "\n", *ls[1:]], ":2: not a JSON record"),
        (lambda ls: ls[2:], "never rotated but starts at seq 3"),
        (lambda ls: [ls[0].replace('"c0"', '"\\ud800"'), *ls[1:]], "seq 1 was altered"),
    ],
    ids=["altered", "removed", "reordered", "inserted", "garbage", "deep", "head-cut", "surrogate"],
)
def test_tampering_is_found_and_named(tmp_path: Path, tamper, message: str) -> None:
    log = _log(tmp_path)
    _write(log, 4)
    log.close()
    path = tmp_path / "audit" / CURRENT
    path.write_text("".join(tamper(_lines(path))))
    with pytest.raises(AuditError, match=message):
        verify(tmp_path / "audit")


def test_a_record_resealed_without_its_successors_breaks_the_next_link(tmp_path: Path) -> None:
    """Recomputing an edited record's hash is not enough: the next record names the old one."""
    from services.audit.chain import seal

    log = _log(tmp_path)
    _write(log, 3)
    log.close()
    path = tmp_path / "audit" / CURRENT
    lines = _lines(path)
    record = json.loads(lines[1])
    record["status"] = 403
    lines[1] = json.dumps(seal(record, record["prev"])) + "\n"
    path.write_text("".join(lines))
    with pytest.raises(AuditError, match="seq 3 does not link to the record before it"):
        verify(tmp_path / "audit")


def test_rotation_keeps_the_chain_across_files_and_prunes_the_oldest(tmp_path: Path) -> None:
    log = _log(tmp_path, max_bytes=4096, keep=2)
    _write(log, 60)
    log.close()
    names = [p.name for p in files(tmp_path / "audit")]
    assert len(names) == 3 and names[-1] == CURRENT and names[0].startswith("audit-")
    result = verify(tmp_path / "audit")
    assert result.last_seq == 60 and not result.starts_at_genesis and result.first_seq > 1
    log = _log(tmp_path, max_bytes=4096, keep=2)  # resumes from the current file
    _write(log, 1)
    log.close()
    assert verify(tmp_path / "audit").last_seq == 61


def test_records_cut_from_a_rotated_segment_are_found(tmp_path: Path) -> None:
    log = _log(tmp_path, max_bytes=4096, keep=5)
    _write(log, 30)
    log.close()
    oldest = files(tmp_path / "audit")[0]
    oldest.write_text("".join(_lines(oldest)[1:]))
    with pytest.raises(AuditError, match="named for seq 1 but starts at 2"):
        verify(tmp_path / "audit")


def test_a_torn_last_record_stops_the_writer(tmp_path: Path) -> None:
    log = _log(tmp_path)
    _write(log, 2)
    log.close()
    path = tmp_path / "audit" / CURRENT
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(AuditError, match="ends in an incomplete record"):
        _log(tmp_path)


def test_one_writer_per_log(tmp_path: Path) -> None:
    first = _log(tmp_path)
    with pytest.raises(AuditError, match="in use by another process"):
        _log(tmp_path)
    first.close()
    _log(tmp_path).close()


def test_an_empty_directory_does_not_verify(tmp_path: Path) -> None:
    with pytest.raises(AuditError, match="no audit log here"):
        verify(tmp_path)
