"""The committed offline plans: current, deterministic, secret-free, and diffable."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

import dualtrack.plan as planmod
from dualtrack.cli import app
from dualtrack.plan import STACKS, Plan, PlanError, diff_against, render_plan, run_program, stale_files

runner = CliRunner()


@pytest.mark.parametrize("stack", STACKS)
def test_committed_plan_is_current(plans: dict[str, Plan], stack: str) -> None:
    """Fails when infra/ or stacks/ changed without `dualtrack plan` being re-run and committed."""
    assert stale_files(plans[stack]) == [], f"run `dualtrack plan --stack {stack}` and commit plans/{stack}/"


def test_plan_is_deterministic(plans: dict[str, Plan]) -> None:
    assert render_plan(run_program("dev")) == render_plan(plans["dev"])


def test_plan_covers_every_resource(plans: dict[str, Plan]) -> None:
    files = render_plan(plans["prod"])
    listed = files["resources.yaml"]
    for res in plans["prod"].resources:
        assert f"name: {res.name}\n" in listed
    assert len([p for p in files if p.startswith("kubernetes/")]) == len(plans["prod"].kubernetes_objects())


def test_secrets_never_reach_the_plan(stack_config) -> None:
    config = stack_config("dev")
    config["dualtrack:grafanaAdminPassword"] = "grafana-Pa55-do-not-leak"
    files = render_plan(run_program("dev", config))
    assert not any("grafana-Pa55-do-not-leak" in text for text in files.values())
    secret = files["kubernetes/monitoring/Secret-grafana-admin.yaml"]
    assert "admin-password: '[secret]'" in secret
    assert "kubeconfig: '[secret]'" in files["outputs.yaml"]
    # encrypted stack values are ciphertext only the CLI can open: the plan uses a placeholder
    config["dualtrack:grafanaAdminPassword"] = {"secure": "v1:AAAAciphertext"}
    files = render_plan(run_program("dev", config))
    assert not any("AAAAciphertext" in text for text in files.values())


def test_check_reports_a_stale_plan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(planmod, "PLANS_DIR", tmp_path)
    result = runner.invoke(app, ["plan", "--stack", "dev"])
    assert result.exit_code == 0, result.output
    assert runner.invoke(app, ["plan", "--stack", "dev", "--check"]).exit_code == 0
    deployment = tmp_path / "dev" / "kubernetes" / "serving" / "Deployment-triton-v1.yaml"
    deployment.write_text(deployment.read_text().replace("maxUnavailable: 1", "maxUnavailable: 2"))
    (tmp_path / "dev" / "kubernetes" / "serving" / "Extra-thing.yaml").write_text("kind: Extra\n")
    result = runner.invoke(app, ["plan", "--stack", "dev", "--check"])
    assert result.exit_code == 1
    assert "plans/dev/kubernetes/serving/Deployment-triton-v1.yaml" in result.output
    assert "plans/dev/kubernetes/serving/Extra-thing.yaml" in result.output


def test_diff_against_a_revision() -> None:
    root = subprocess.run(
        ["git", "rev-list", "--max-parents=0", "HEAD"],
        capture_output=True,
        text=True,
        cwd=planmod.ROOT,
        check=True,
    ).stdout.split()[0]
    text = diff_against(["dev"], root)  # the first commit has no plans: everything is added
    assert f"--- {root}:plans/dev/resources.yaml" in text and "+++ plans/dev/resources.yaml" in text
    assert "+kind: Deployment" in text
    with pytest.raises(PlanError, match="cannot read revision"):
        diff_against(["dev"], "no-such-revision")


def test_cli_errors_are_one_line() -> None:
    result = runner.invoke(app, ["plan", "--stack", "nosuch"])
    assert result.exit_code == 2 and "no stack file" in result.output and "Traceback" not in result.output


def test_pull_request_workflow_previews_every_stack_with_the_pack() -> None:
    import yaml

    workflow = yaml.safe_load((planmod.ROOT / ".github" / "workflows" / "preview.yml").read_text())
    jobs = workflow["jobs"]
    assert jobs["preview"]["strategy"]["matrix"]["stack"] == list(STACKS)
    preview = next(
        s for s in jobs["preview"]["steps"] if str(s.get("uses", "")).startswith("pulumi/actions@")
    )
    assert preview["with"]["command"] == "preview" and preview["with"]["comment-on-pr"] is True
    assert (planmod.ROOT / preview["with"]["policyPacks"] / "PulumiPolicy.yaml").is_file()
    assert any("plan --check" in str(s.get("run", "")) for s in jobs["offline-plan"]["steps"])
    up = next(s for s in jobs["up-dev"]["steps"] if str(s.get("uses", "")).startswith("pulumi/actions@"))
    assert up["with"]["command"] == "up" and up["with"]["stack-name"].endswith("/dev")
