"""checkov on every rendered plan: no failed check unless infra/checkov-skips.yaml lists it with a reason."""

from __future__ import annotations

import json
import subprocess
from fnmatch import fnmatch
from pathlib import Path

import pytest
import yaml

from dualtrack.plan import PLANS_DIR, ROOT, STACKS

CHECKOV = ROOT / ".venv-checkov" / "bin" / "checkov"
SKIPS = yaml.safe_load((ROOT / "infra" / "checkov-skips.yaml").read_text(encoding="utf-8"))["skips"]


def _checkov(directory: Path) -> list[dict]:
    assert CHECKOV.is_file(), "checkov lives in its own venv: run `make install-dev`"
    out = subprocess.run(
        [
            str(CHECKOV),
            "-d",
            str(directory),
            "--framework",
            "kubernetes",
            "-o",
            "json",
            "--quiet",
            "--skip-download",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode in (0, 1), out.stderr[-2000:]
    reports = json.loads(out.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    assert all(r["summary"]["parsing_errors"] == 0 for r in reports)
    return [c for r in reports for c in r["results"]["failed_checks"]]


def _allowed(check: dict) -> bool:
    return any(
        s["id"] == check["check_id"] and any(fnmatch(check["resource"], p) for p in s["resources"])
        for s in SKIPS
    )


def test_every_skip_has_a_reason() -> None:
    assert SKIPS and all(len(s["reason"].split()) >= 10 and s["resources"] for s in SKIPS)


@pytest.mark.parametrize("stack", STACKS)
def test_plans_pass_checkov(stack: str) -> None:
    failed = _checkov(PLANS_DIR / stack / "kubernetes")
    unexplained = [f"{c['check_id']} {c['resource']}: {c['check_name']}" for c in failed if not _allowed(c)]
    assert unexplained == []


def test_checkov_catches_a_bad_workload(tmp_path: Path) -> None:
    """The scan really runs: a privileged, limitless pod fails checks the skip file does not cover."""
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "bad", "namespace": "serving"},
        "spec": {
            "containers": [{"name": "c", "image": "busybox:latest", "securityContext": {"privileged": True}}]
        },
    }
    (tmp_path / "pod.yaml").write_text(yaml.safe_dump(pod), encoding="utf-8")
    failed = {c["check_id"] for c in _checkov(tmp_path) if not _allowed(c)}
    assert {"CKV_K8S_16", "CKV_K8S_11", "CKV_K8S_13"} <= failed  # privileged, no CPU limit, no memory limit
