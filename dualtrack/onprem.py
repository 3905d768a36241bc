"""``dualtrack onprem apply`` / ``verify``: run the on-prem playbooks with the cloud stack's
outputs, then check the hosts with testinfra (``ansible/verify``).

The outputs come from ``pulumi stack output --json --show-secrets -s STACK`` when the
Pulumi CLI is there, or from a file exported by CI (JSON or YAML). They are validated
against ``infra/contract.py`` before anything runs -- a missing or mistyped output is a
clear error, not a half-configured host -- and passed to Ansible as ``dualtrack_cloud``
(snake_case keys), minus secret outputs, which no role needs and which ansible-runner
would otherwise write into its artifacts. Each run keeps its artifacts (events, stats)
in its own directory.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from infra.contract import SECRET_OUTPUTS, ContractError, StackOutputs, parse_outputs

ROOT = Path(__file__).resolve().parent.parent
ANSIBLE_DIR = ROOT / "ansible"
COLLECTIONS = ANSIBLE_DIR / "collections"


class OnPremError(RuntimeError):
    """The run could not start; the message says why (nothing was changed)."""


def load_outputs(*, stack: str | None = None, outputs_file: Path | None = None) -> StackOutputs:
    if (stack is None) == (outputs_file is None):
        raise OnPremError("give exactly one of --stack (reads `pulumi stack output`) or --outputs FILE")
    if outputs_file is not None:
        try:
            raw = yaml.safe_load(outputs_file.read_text(encoding="utf-8"))
        except OSError as exc:
            raise OnPremError(f"cannot read {outputs_file}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise OnPremError(f"{outputs_file} is not JSON or YAML: {exc}") from None
        source = str(outputs_file)
    else:
        pulumi = shutil.which("pulumi")
        if pulumi is None:
            raise OnPremError(
                "the Pulumi CLI is not installed here: export the outputs in CI and pass --outputs FILE"
            )
        done = subprocess.run(
            [pulumi, "stack", "output", "--json", "--show-secrets", "-s", str(stack)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            check=False,
        )
        if done.returncode != 0:
            raise OnPremError(f"pulumi stack output -s {stack} failed: {done.stderr.strip()[-500:]}")
        raw, source = done.stdout, f"stack {stack}"
    try:
        return parse_outputs(raw)
    except ContractError as exc:
        raise OnPremError(f"outputs from {source} do not match infra/contract.py:\n{exc}") from None


def extravars(outputs: StackOutputs) -> dict[str, Any]:
    """What Ansible sees: every non-secret output, snake_case, under ``dualtrack_cloud``."""
    cloud = {
        name: value
        for name, value in outputs.model_dump().items()
        if (StackOutputs.model_fields[name].alias or name) not in SECRET_OUTPUTS
    }
    from dualtrack.model_repo import client_call

    # the Triton model the gateway calls and its input style follow from the profile
    call = client_call(outputs.model_profile, "cloud")
    cloud["llm_model"], cloud["llm_inputs"], cloud["llm_reasoning"] = call.model, call.inputs, call.reasoning
    return {"dualtrack_cloud": cloud, "dualtrack_stack": outputs.environment}


@dataclass
class HostSummary:
    ok: int = 0
    changed: int = 0
    failed: int = 0
    unreachable: int = 0
    skipped: int = 0


@dataclass
class RunResult:
    status: str
    rc: int
    hosts: dict[str, HostSummary]
    artifacts: Path
    failures: list[str] = field(default_factory=list)

    @property
    def succeeded(self) -> bool:
        return self.rc == 0 and all(h.failed == 0 and h.unreachable == 0 for h in self.hosts.values())


def _environment() -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)  # ansible-runner calls ansible-playbook from PATH
    return {
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
        "ANSIBLE_CONFIG": str(ANSIBLE_DIR / "ansible.cfg"),
        "ANSIBLE_COLLECTIONS_PATH": str(COLLECTIONS),
        "ANSIBLE_ROLES_PATH": str(ANSIBLE_DIR / "roles"),
        "ANSIBLE_FORCE_COLOR": "0",
    }


def apply(
    *,
    inventory: Path,
    variables: dict[str, Any],
    playbook: str = "site.yml",
    check: bool = False,
    diff: bool = False,
    limit: str | None = None,
    tags: str | None = None,
    extra_args: list[str] | None = None,
    runs_dir: Path,
    on_event: Callable[[dict[str, Any]], None] | None = None,
) -> RunResult:
    """Run ``ansible/playbooks/<playbook>`` with ansible-runner; never raises for a failed play."""
    import ansible_runner

    book = ANSIBLE_DIR / "playbooks" / playbook
    if not book.is_file():
        known = sorted(p.name for p in (ANSIBLE_DIR / "playbooks").glob("*.yml"))
        raise OnPremError(f"no playbook {playbook!r}; available: {', '.join(known)}")
    if not inventory.exists():
        raise OnPremError(f"no inventory at {inventory}")
    run_dir = runs_dir / time.strftime("%Y%m%dT%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=False)
    flags = [flag for flag, on in (("--check", check), ("--diff", diff)) if on] + list(extra_args or [])
    cmdline = " ".join(shlex.quote(flag) for flag in flags)
    failures: list[str] = []

    def handler(event: dict[str, Any]) -> bool:
        data = event.get("event_data", {})
        if event.get("event") in ("runner_on_failed", "runner_on_unreachable") and not data.get(
            "ignore_errors"
        ):
            res = data.get("res") or {}
            message = res.get("msg", "")
            detail = (res.get("stderr") or res.get("stdout") or "").strip().splitlines()[-3:]
            if detail and not data.get("no_log"):
                message += ": " + " | ".join(detail)
            failures.append(f"{data.get('host')}: {data.get('task')}: {message}")
        if on_event is not None:
            on_event(event)
        return True

    runner = ansible_runner.run(
        private_data_dir=str(run_dir),
        project_dir=str(ANSIBLE_DIR),
        playbook=str(book),
        inventory=str(inventory.resolve()),
        extravars=variables,
        cmdline=cmdline or None,
        limit=limit,
        tags=tags,
        envvars=_environment(),
        event_handler=handler,
        quiet=True,
    )
    stats = runner.stats or {}
    hosts: dict[str, HostSummary] = {}
    for key, attr in (
        ("ok", "ok"),
        ("changed", "changed"),
        ("failures", "failed"),
        ("dark", "unreachable"),
        ("skipped", "skipped"),
    ):
        for host, count in (stats.get(key) or {}).items():
            setattr(hosts.setdefault(host, HostSummary()), attr, count)
    (run_dir / "summary.json").write_text(
        json.dumps(
            {
                "status": runner.status,
                "rc": runner.rc,
                "check": check,
                "hosts": {h: vars(s) for h, s in hosts.items()},
            },
            indent=2,
        )
        + "\n",
        encoding="utf-8",
    )
    return RunResult(
        status=runner.status, rc=int(runner.rc or 0), hosts=hosts, artifacts=run_dir, failures=failures
    )


# --------------------------------------------------------------------------- verify

VERIFY_DIR = ANSIBLE_DIR / "verify"


def inventory_hosts(
    inventory: Path, pattern: str = "onprem", vault_password_file: Path | None = None
) -> dict[str, dict[str, Any]]:
    """Hosts matching ``pattern`` with their inventory variables (``ansible-inventory --list``)."""
    vault = ["--vault-password-file", str(vault_password_file)] if vault_password_file else []
    done = subprocess.run(
        [str(Path(sys.executable).parent / "ansible-inventory"), "-i", str(inventory), "--list", *vault],
        capture_output=True,
        text=True,
        env={**os.environ, **_environment()},
        check=False,
    )
    if done.returncode != 0:
        raise OnPremError(f"cannot read inventory {inventory}: {done.stderr.strip()[-500:]}")
    data = json.loads(done.stdout)
    hostvars = data.get("_meta", {}).get("hostvars", {})

    def members(group: str) -> list[str]:
        node = data.get(group, {})
        found = list(node.get("hosts", []))
        for child in node.get("children", []):
            found += members(child)
        return found

    names = members(pattern) if pattern in data else ([pattern] if pattern in hostvars else [])
    if not names:
        raise OnPremError(f"no host of {inventory} matches {pattern!r}")
    return {name: hostvars.get(name, {}) for name in dict.fromkeys(names)}


def testinfra_spec(name: str, hostvars: dict[str, Any]) -> str:
    """How testinfra reaches a host, from its Ansible connection variables."""
    connection = str(hostvars.get("ansible_connection", "ssh")).rsplit(".", 1)[-1]
    if connection == "podman":
        return f"podman://{hostvars.get('ansible_host', name)}"
    if connection == "local":
        return "local://"
    if connection in ("ssh", "smart", "paramiko_ssh"):
        user = hostvars.get("ansible_user")
        port = hostvars.get("ansible_port")
        address = hostvars.get("ansible_host", name)
        return f"ssh://{user + '@' if user else ''}{address}{':' + str(port) if port else ''}?sudo=true"
    raise OnPremError(f"{name}: ansible_connection {connection!r} is not supported by verify")


CERT_DAYS_ENV = "DUALTRACK_VERIFY_CERT_DAYS"
"""How the verify checks learn ``--cert-days``: they run in a pytest process of their own."""


def verify(
    inventory: Path,
    limit: str | None = None,
    junit: Path | None = None,
    vault_password_file: Path | None = None,
    cert_days: int = 14,
) -> int:
    """Run the testinfra checks (``ansible/verify``) against the inventory's hosts; pytest's exit code.
    ``cert_days``: a certificate that expires sooner than this fails the check."""
    hosts = inventory_hosts(inventory, limit or "onprem", vault_password_file)
    specs = ",".join(testinfra_spec(name, hv) for name, hv in hosts.items())
    argv = [
        sys.executable,
        "-m",
        "pytest",
        str(VERIFY_DIR),
        f"--hosts={specs}",
        "-p",
        "no:cacheprovider",
        "-q",
        "--rootdir",
        str(VERIFY_DIR),
        "-c",
        os.devnull,
    ]
    if junit is not None:
        argv.append(f"--junitxml={junit}")
    env = {**os.environ, CERT_DAYS_ENV: str(cert_days)}
    return subprocess.run(argv, check=False, env=env).returncode
