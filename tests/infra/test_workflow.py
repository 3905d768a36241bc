"""The pull-request workflow: prod's preview refuses to run where the private API is out of reach."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

WORKFLOW = Path(__file__).resolve().parents[2] / ".github" / "workflows" / "preview.yml"


def _steps() -> list[dict]:
    return yaml.safe_load(WORKFLOW.read_text(encoding="utf-8"))["jobs"]["preview"]["steps"]


def test_prod_preview_refuses_a_runner_outside_the_vpc() -> None:
    steps = _steps()
    names = [s.get("name") or s.get("uses") for s in steps]
    guard = names.index("prod previews run inside the VPC")
    private = names.index("prod's cluster endpoint answers from this runner")
    assert guard == 0 and private < names.index("pulumi/actions@v6")  # before anything else runs
    assert steps[guard]["if"] == steps[private]["if"] == "matrix.stack == 'prod'"
    script = steps[guard]["run"]
    unset = subprocess.run(["bash", "-c", script], env={"PROD_RUNNER": ""}, capture_output=True, text=True)
    assert unset.returncode == 1 and "set the repository variable PROD_RUNNER" in unset.stdout
    ok = subprocess.run(
        ["bash", "-c", script], env={"PROD_RUNNER": "vpc-runner"}, capture_output=True, text=True
    )
    assert ok.returncode == 0


def _endpoint_check(tmp_path: Path, aws: str, curl: str) -> subprocess.CompletedProcess[str]:
    """The endpoint check, run with stand-ins for `aws` and `curl` on PATH."""
    script = next(s for s in _steps() if s.get("name", "").startswith("prod's cluster endpoint"))["run"]
    for name, body in {"aws": aws, "curl": curl}.items():
        (tmp_path / name).write_text(f"#!/bin/sh\n{body}\n")
        (tmp_path / name).chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin"}
    return subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, cwd=tmp_path)


def test_endpoint_check_needs_an_answer_and_fails_closed(tmp_path: Path) -> None:
    ca = "LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCg=="  # "-----BEGIN CERTIFICATE-----"
    endpoint = f"printf 'https://ABC.gr7.us-east-1.eks.amazonaws.com\\t{ca}\\n'"
    # the stand-in curl answers only when asked with the cluster's CA, never --insecure
    curl_with_ca = 'case "$*" in *"--cacert cluster-ca.crt"*) exit 0;; *) exit 60;; esac'
    inside = _endpoint_check(tmp_path, endpoint, curl_with_ca)
    assert inside.returncode == 0, inside.stdout + inside.stderr
    assert (tmp_path / "cluster-ca.crt").read_text().startswith("-----BEGIN CERTIFICATE-----")
    outside = _endpoint_check(tmp_path, endpoint, "exit 28")  # curl: timed out
    assert outside.returncode == 1 and "does not answer from this runner" in outside.stdout
    denied = _endpoint_check(
        tmp_path, "echo 'An error occurred (AccessDeniedException)' >&2; exit 254", "exit 0"
    )
    assert denied.returncode == 1 and "cannot describe the dualtrack-prod cluster" in denied.stdout
    first = _endpoint_check(
        tmp_path, "echo 'An error occurred (ResourceNotFoundException)' >&2; exit 254", "exit 7"
    )
    assert first.returncode == 0 and "no dualtrack-prod cluster yet" in first.stdout
