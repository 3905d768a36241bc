"""`dualtrack onprem apply`: outputs validated first, the playbook run by ansible-runner against a
real systemd host, live progress, a per-host summary, and an exit code that tells the truth."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from dualtrack.cli import app
from tests.onprem.conftest import outputs_file

runner = CliRunner()


@pytest.fixture
def apply(wheelhouse: Path):
    """``dualtrack onprem apply ARGS`` -- by default the read-only preflight playbook."""

    def run(*args: str):
        extra = [] if "--playbook" in args else ["--playbook", "preflight.yml"]
        return runner.invoke(app, ["onprem", "apply", *args, "--wheelhouse", str(wheelhouse), *extra])

    return run


def _text(result) -> str:
    """The CLI output with rich's line wrapping undone."""
    return " ".join(result.output.split())


@pytest.fixture
def outputs(tmp_path: Path) -> Path:
    """The dev stack's outputs as CI would export them (the committed offline plan's values)."""
    return outputs_file(tmp_path)


@pytest.fixture(autouse=True)
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DUALTRACK_HOME", str(tmp_path / "state"))
    return tmp_path / "state"


def _runs(state: Path) -> list[Path]:
    return sorted((state / "onprem-runs").glob("*")) if (state / "onprem-runs").exists() else []


def test_preflight_passes_on_the_systemd_host(apply, inventory: Path, outputs: Path, state: Path) -> None:
    result = apply("-i", str(inventory), "--outputs", str(outputs))
    assert result.exit_code == 0, result.output
    assert "ok" in result.output and "The cloud stack's outputs were passed in" in _text(result)
    (run,) = _runs(state)
    summary = json.loads((run / "summary.json").read_text())
    (host,) = summary["hosts"].values()
    assert summary["status"] == "successful" and host["failed"] == 0 and host["changed"] == 0
    extravars = (run / "env" / "extravars").read_text()
    assert "triton_http_endpoint" in extravars and "https://llm.dev.dualtrack.example.com" in extravars
    everything = "".join(p.read_text(errors="ignore") for p in run.rglob("*") if p.is_file())
    assert (
        "kube-SECRET-token" not in everything and "kubeconfig" not in extravars
    )  # secrets never handed over


def test_check_mode_and_limit_pass_through(apply, inventory: Path, outputs: Path, state: Path) -> None:
    result = apply("-i", str(inventory), "--outputs", str(outputs), "--check", "--diff", "--limit", "all")
    assert result.exit_code == 0, result.output
    assert "check mode" in _text(result)
    assert json.loads((_runs(state)[0] / "summary.json").read_text())["check"] is True


def test_bad_outputs_stop_before_anything_runs(apply, inventory: Path, outputs: Path, state: Path) -> None:
    values = json.loads(outputs.read_text())
    del values["kafkaBootstrapBrokers"]
    values["tritonHttpEndpoint"] = "http://plain"
    outputs.write_text(json.dumps(values))
    result = apply("-i", str(inventory), "--outputs", str(outputs))
    assert result.exit_code == 2
    assert "stack output 'kafkaBootstrapBrokers' is missing" in _text(result)
    assert "'tritonHttpEndpoint': 'http://plain'" in _text(result)
    assert _runs(state) == []  # nothing ran


def test_a_failing_host_fails_the_run(apply, inventory: Path, outputs: Path) -> None:
    group_vars = inventory.parent / "group_vars" / "all.yml"
    group_vars.write_text(
        group_vars.read_text().replace('dualtrack_python_version: "3.11"', 'dualtrack_python_version: "3.99"')
    )
    result = apply("-i", str(inventory), "--outputs", str(outputs))
    assert result.exit_code == 1
    assert "the services need 3.99 (dualtrack_python_version)" in _text(result)


def test_an_unreachable_host_fails_the_run(apply, tmp_path: Path, outputs: Path) -> None:
    inv = tmp_path / "gone.yml"
    inv.write_text(
        yaml.safe_dump(
            {"onprem": {"hosts": {"no-such-container": {"ansible_connection": "containers.podman.podman"}}}}
        )
    )
    result = apply("-i", str(inv), "--outputs", str(outputs))
    assert result.exit_code == 1 and "unreachable" in result.output


def test_usage_errors(apply, outputs: Path, inventory: Path) -> None:
    assert "choose an inventory" in _text(apply("--outputs", str(outputs)))
    both = apply("-i", str(inventory), "--outputs", str(outputs), "--stack", "dev")
    assert both.exit_code == 2 and "exactly one of --stack" in _text(both)
    missing = apply("-i", str(inventory), "--outputs", str(outputs), "--playbook", "nope.yml")
    assert missing.exit_code == 2 and "no playbook 'nope.yml'; available:" in _text(missing)


def test_playbooks_pass_ansible_syntax_check() -> None:
    import subprocess
    import sys

    from dualtrack.onprem import ANSIBLE_DIR, _environment

    env = {**__import__("os").environ, **_environment()}
    for book in sorted((ANSIBLE_DIR / "playbooks").glob("*.yml")):
        done = subprocess.run(
            [
                str(Path(sys.executable).parent / "ansible-playbook"),
                "--syntax-check",
                "-i",
                str(ANSIBLE_DIR / "inventories" / "example" / "hosts.yml"),
                str(book),
            ],
            capture_output=True,
            text=True,
            env=env,
            cwd=ANSIBLE_DIR,
        )
        assert done.returncode == 0, done.stdout + done.stderr
