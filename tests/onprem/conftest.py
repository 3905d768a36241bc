"""A real systemd host (podman) for the on-prem track; started once per session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.onprem.host import OnPremHost


@pytest.fixture(scope="session")
def onprem_host() -> Iterator[OnPremHost]:
    host = OnPremHost(f"dualtrack-onprem-test-{os.getpid()}").start()
    try:
        yield host
    finally:
        host.stop()


@pytest.fixture
def inventory(onprem_host: OnPremHost, tmp_path: Path) -> Path:
    """An inventory whose ``onprem`` group is the test host (group_vars as in the example site)."""
    site = tmp_path / "site"
    (site / "group_vars").mkdir(parents=True)
    inv = {"onprem": {"hosts": onprem_host.inventory()["all"]["hosts"]}}
    (site / "hosts.yml").write_text(yaml.safe_dump(inv), encoding="utf-8")
    example = (
        Path(__file__).resolve().parents[2] / "ansible" / "inventories" / "example" / "group_vars" / "all.yml"
    )
    (site / "group_vars" / "all.yml").write_text(example.read_text(encoding="utf-8"), encoding="utf-8")
    return site / "hosts.yml"


@pytest.fixture(autouse=True)
def podman_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ansible's podman connection must see the test host's private podman configuration."""
    from tests.onprem.host import podman_env

    env = podman_env()
    for key in ("CONTAINERS_CONF", "CONTAINERS_STORAGE_CONF"):
        monkeypatch.setenv(key, env[key])
