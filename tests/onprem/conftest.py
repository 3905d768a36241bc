"""A real systemd host (podman) for the on-prem track, and a site converged on it once per session."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from dualtrack.cli import app
from dualtrack.plan import PLANS_DIR
from tests.onprem.host import OnPremHost
from tests.support import SAMPLES, gemma_gguf, issue_tls

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_VARS = ROOT / "ansible" / "inventories" / "example" / "group_vars" / "all.yml"
API_KEY = 'test-api-key-0123456789\\"$x`y'  # every character systemd unescapes
CLOUD_TOKEN = "eyJhbGciOiJub25lIn0.e30.cloud-SECRET-jwt"
VAULT_PASSWORD = "vault-test-password"
SAMPLE_DOC = SAMPLES / "handbook" / "employee-handbook.md"
GATEWAY_NAME = "kb.dualtrack.test"
"""The name the test site's gateway certificate is issued for (and clients use)."""
GATEWAY = f"https://{GATEWAY_NAME}:8080"
CLIENT_TLS = ("--cacert", "/etc/dualtrack/tls/ca.crt", "--resolve", f"{GATEWAY_NAME}:8080:127.0.0.1")
"""What curl on the host needs to reach the gateway as a client would: the site CA, and the
name pointed at loopback."""


@pytest.fixture(autouse=True)
def podman_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ansible's podman connection must see the test host's private podman configuration."""
    from tests.onprem.host import podman_env

    env = podman_env()
    for key in ("CONTAINERS_CONF", "CONTAINERS_STORAGE_CONF"):
        monkeypatch.setenv(key, env[key])


def _podman_env_vars() -> None:
    from tests.onprem.host import podman_env

    env = podman_env()
    for key in ("CONTAINERS_CONF", "CONTAINERS_STORAGE_CONF"):
        os.environ[key] = env[key]


@pytest.fixture(scope="session")
def onprem_host() -> Iterator[OnPremHost]:
    """A fresh host per session; ``ONPREM_TEST_KEEP_HOST=NAME`` reuses (and keeps) container NAME
    -- a developer's shortcut: the converge then runs as a re-run."""
    keep = os.environ.get("ONPREM_TEST_KEEP_HOST")
    host = OnPremHost(keep or f"dualtrack-onprem-test-{os.getpid()}")
    if not (keep and host.running()):
        host.start()
    try:
        yield host
    finally:
        if not keep:
            host.stop()


def write_site(
    directory: Path, host: OnPremHost, overrides: dict | None = None, vault: dict | None = None
) -> Path:
    """An inventory like an operator's: hosts.yml, the example group_vars, a vault file."""
    (directory / "group_vars" / "onprem").mkdir(parents=True)
    hosts = {
        "onprem": {
            "hosts": {
                host.name: {
                    "ansible_connection": "containers.podman.podman",
                    "ansible_python_interpreter": "/usr/bin/python3",
                    "ansible_become": False,  # podman exec is root already (minbase has no sudo)
                }
            }
        }
    }
    (directory / "hosts.yml").write_text(yaml.safe_dump(hosts), encoding="utf-8")
    (directory / "group_vars" / "all.yml").write_text(
        EXAMPLE_VARS.read_text(encoding="utf-8"), encoding="utf-8"
    )
    (directory / "group_vars" / "onprem" / "site.yml").write_text(
        yaml.safe_dump(overrides or {}), encoding="utf-8"
    )
    if vault is not None:
        plain = directory / "group_vars" / "onprem" / "vault.yml"
        plain.write_text(yaml.safe_dump(vault), encoding="utf-8")
        password = directory / "vault-password"
        password.write_text(VAULT_PASSWORD + "\n", encoding="utf-8")
        subprocess.run(
            [
                str(Path(sys.executable).parent / "ansible-vault"),
                "encrypt",
                "--vault-password-file",
                str(password),
                str(plain),
            ],
            check=True,
            capture_output=True,
        )
    return directory / "hosts.yml"


def site_vars() -> dict:
    """What the test site sets beyond the example: container limits, and a real GGUF model (Gemma 3
    270M, a test dependency) as the site's local model, served by llama.cpp on the host's cores."""
    return {
        "dualtrack_listen_address": "0.0.0.0",  # reachable from the client namespace of the firewall test
        "base_sysctl": {},  # the kernel is this machine's, not the container's
        "dualtrack_nofile_limit": 16384,  # podman's hard limit here is 20000
        "dualtrack_local_llm_gguf": str(gemma_gguf()),
        "dualtrack_local_llm_reasoning": False,  # a base model, no <think>
        "llama_local_threads": 2,
        "llama_local_ctx": 8192,
        "triton_local_ready_timeout": 240,
        "firewall_milvus_cidrs": ["10.99.0.0/30"],
        "firewall_gateway_cidrs": ["10.99.0.0/30", "fd00:99::/64"],
        "firewall_triton_cidrs": [],
    }


def run_local_playbook(directory: Path, plays: list[dict]) -> subprocess.CompletedProcess[str]:
    """``ansible-playbook`` on localhost with the project's configuration (roles, filters)."""
    from dualtrack.onprem import _environment

    book = directory / "local-playbook.yml"
    book.write_text(yaml.safe_dump(plays), encoding="utf-8")
    return subprocess.run(
        [
            str(Path(sys.executable).parent / "ansible-playbook"),
            *("-i", "localhost,", "-c", "local", "-e", f"ansible_python_interpreter={sys.executable}"),
            str(book),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, **_environment()},
        check=False,
    )


def outputs_file(directory: Path) -> Path:
    """The dev stack's outputs as CI exports them; the cloud endpoint is unreachable from the host."""
    values = yaml.safe_load((PLANS_DIR / "dev" / "outputs.yaml").read_text())
    values["kubeconfig"] = json.dumps(
        {"apiVersion": "v1", "users": [{"user": {"token": "kube-SECRET-token"}}]}
    )
    path = directory / "dev-outputs.json"
    path.write_text(json.dumps(values))
    return path


@dataclass
class Site:
    host: OnPremHost
    inventory: Path
    outputs: Path
    vault_password: Path
    state: Path
    wheelhouse: Path
    first_output: str = ""
    """What the first ``apply`` printed (the secrets tests search it)."""

    def apply(self, *args: str) -> tuple[int, str]:
        os.environ["DUALTRACK_HOME"] = str(self.state)
        result = CliRunner().invoke(
            app,
            [
                "onprem",
                "apply",
                "-i",
                str(self.inventory),
                "--outputs",
                str(self.outputs),
                "--vault-password-file",
                str(self.vault_password),
                "--wheelhouse",
                str(self.wheelhouse),
                *args,
            ],
        )
        return result.exit_code, result.output

    def runs(self) -> list[Path]:
        return sorted((self.state / "onprem-runs").glob("*"))

    def summary(self, run: Path) -> dict:
        return json.loads((run / "summary.json").read_text())


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built once per session (pip's cache makes it ~15 s)."""
    from dualtrack.wheelhouse import build

    return build(tmp_path_factory.mktemp("wheelhouse"))


@pytest.fixture
def inventory(onprem_host: OnPremHost, tmp_path: Path) -> Path:
    """An inventory whose ``onprem`` group is the test host, with the example site's group_vars."""
    return write_site(tmp_path / "site", onprem_host)


def make_site(host: OnPremHost, wheelhouse: Path, base: Path) -> Site:
    """The test site's inventory (HTTPS with a test CA, the vault) for ``host``; nothing applied yet."""
    tls = issue_tls(base / "tls", names=(GATEWAY_NAME,), ips=("127.0.0.1", "10.99.0.1"))
    https = {
        "gateway_tls_cert": str(tls.cert),
        "gateway_tls_key": str(tls.key),
        "gateway_tls_ca": str(tls.ca),
        "gateway_tls_server_name": GATEWAY_NAME,
    }
    inventory = write_site(
        base / "inventory",
        host,
        {**site_vars(), **https},
        vault={"gateway_api_key": API_KEY, "gateway_cloud_token": CLOUD_TOKEN},
    )
    return Site(
        host, inventory, outputs_file(base), base / "inventory" / "vault-password", base / "state", wheelhouse
    )


@pytest.fixture(scope="session")
def site(onprem_host: OnPremHost, wheelhouse: Path, tmp_path_factory: pytest.TempPathFactory) -> Site:
    """``site.yml`` converged once through ``dualtrack onprem apply`` (the first run's output is kept)."""
    _podman_env_vars()
    converged = make_site(onprem_host, wheelhouse, tmp_path_factory.mktemp("site"))
    code, converged.first_output = converged.apply()
    assert code == 0, converged.first_output[-6000:]
    return converged
