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
    private = names.index("prod's cluster endpoint resolves to a private address here")
    assert guard == 0 and private < names.index("pulumi/actions@v6")  # before anything else runs
    assert steps[guard]["if"] == steps[private]["if"] == "matrix.stack == 'prod'"
    script = steps[guard]["run"]
    unset = subprocess.run(["bash", "-c", script], env={"PROD_RUNNER": ""}, capture_output=True, text=True)
    assert unset.returncode == 1 and "set the repository variable PROD_RUNNER" in unset.stdout
    ok = subprocess.run(
        ["bash", "-c", script], env={"PROD_RUNNER": "vpc-runner"}, capture_output=True, text=True
    )
    assert ok.returncode == 0


def test_private_endpoint_check_tells_public_from_private(tmp_path: Path) -> None:
    """The endpoint check, run with stand-ins for `aws` and `getent` on PATH."""
    script = next(s for s in _steps() if s.get("name", "").startswith("prod's cluster endpoint"))["run"]
    for name, body in {
        "aws": "echo https://ABC.gr7.us-east-1.eks.amazonaws.com",
        "getent": 'echo "$ADDRESS ABC.gr7.us-east-1.eks.amazonaws.com"',
    }.items():
        (tmp_path / name).write_text(f"#!/bin/sh\n{body}\n")
        (tmp_path / name).chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin"}
    public = subprocess.run(
        ["bash", "-c", script], env={**env, "ADDRESS": "54.1.2.3"}, capture_output=True, text=True
    )
    assert public.returncode == 1 and "not a private address" in public.stdout
    private = subprocess.run(
        ["bash", "-c", script], env={**env, "ADDRESS": "10.42.3.4"}, capture_output=True, text=True
    )
    assert private.returncode == 0, private.stdout + private.stderr
