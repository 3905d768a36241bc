"""The sync script's lock, run by bash with a stand-in `aws` that notices two syncs at once."""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import time
from pathlib import Path

from infra import model_layout as layout

STAND_IN_AWS = """#!/bin/sh
[ "$1" = configure ] && exit 0
mkdir "$CACHE/busy" 2>/dev/null || { echo overlap >> "$CACHE/overlaps"; exit 0; }
mkdir -p "$CACHE/p/v1/repository"
sleep 0.3
rmdir "$CACHE/busy"
"""


def _run(script: str, bin_dir: Path, cache: Path) -> subprocess.CompletedProcess[str]:
    mapped = script.replace(layout.SYNC_ROOT, str(cache))
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "CACHE": str(cache), "HOME": str(cache)}
    return subprocess.run(["bash", "-c", mapped], env=env, capture_output=True, text=True, timeout=120)


def test_one_sync_per_version_even_when_waiters_race_for_a_stale_lock(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "aws").write_text(STAND_IN_AWS)
    (tmp_path / "bin" / "aws").chmod(0o755)
    script = layout.sync_script("s3://bucket/p/v1/", "p", "v1")
    for attempt in range(3):
        cache = tmp_path / f"cache-{attempt}"
        (cache / "p" / "v1.lock").mkdir(parents=True)  # left by a pod killed two minutes ago
        (cache / layout.NODE_CACHE_READY).touch()
        os.utime(cache / "p" / "v1.lock", (time.time() - 120, time.time() - 120))
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            runs = list(pool.map(lambda _, c=cache: _run(script, tmp_path / "bin", c), range(4)))
        assert [r.returncode for r in runs] == [0, 0, 0, 0], [r.stderr for r in runs]
        assert not (cache / "overlaps").exists()  # never two syncs at once
        assert sum("taking over" in r.stderr for r in runs) == 1  # one waiter took the stale lock over
        assert not (cache / "p" / "v1.lock").exists() and not (cache / "p" / "v1.takeover").exists()


def test_a_holder_taken_over_leaves_its_successors_lock(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "aws").write_text('#!/bin/sh\nmkdir -p "$CACHE/p/v1/repository"\n')
    (tmp_path / "bin" / "aws").chmod(0o755)
    cache = tmp_path / "cache"
    (cache / "p").mkdir(parents=True)
    (cache / layout.NODE_CACHE_READY).touch()
    script = layout.sync_script("s3://bucket/p/v1/", "p", "v1")
    # the lock now belongs to someone else (a successor): this holder's exit must not remove it
    hijack = script.replace(
        "aws configure set", 'echo successor > "$CACHE/p/v1.lock/owner"; aws configure set', 1
    )
    assert _run(hijack, tmp_path / "bin", cache).returncode == 0
    assert (cache / "p" / "v1.lock" / "owner").read_text().strip() == "successor"
