"""``dualtrack onprem verify``: a converged on-prem host is what the roles promise.

Read-only checks (run against production hosts): units active and enabled, every port
listening only where configured, the firewall's allowlist loaded, secret files root-only,
the knowledge-base collections present, the gateway ready, backups scheduled.
"""

from __future__ import annotations

import json

import pytest

from conftest import CONFIG_DIR, VENV

SERVICES = ("dualtrack-milvus", "dualtrack-triton", "dualtrack-gateway")


@pytest.mark.parametrize("unit", [*SERVICES, "dualtrack-firewall", "dualtrack-backup.timer"])
def test_unit_active_and_enabled(host, unit: str) -> None:
    service = host.service(unit)
    assert service.is_running or host.run(f"systemctl is-active {unit}").stdout.strip() == "active"
    assert service.is_enabled


def _listening(host) -> set[tuple[str, int]]:
    out = host.run("ss -Hltn").stdout
    found = set()
    for line in out.splitlines():
        local = line.split()[3]
        address, _, port = local.rpartition(":")
        found.add((address.strip("[]"), int(port)))
    return found


@pytest.mark.parametrize("unit", SERVICES)
def test_ports_listen_only_where_configured(host, listeners, unit: str) -> None:
    sockets = _listening(host)
    for want in listeners[unit]:
        assert (want.address, want.port) in sockets, f"{unit} is not listening on {want}"
        elsewhere = {addr for addr, port in sockets if port == want.port and addr != want.address}
        assert not elsewhere, f"{unit} port {want.port} also listens on {sorted(elsewhere)}"


def test_firewall_allowlist_loaded(host, listeners) -> None:
    ruleset = host.run("nft list table inet dualtrack")
    assert ruleset.rc == 0, "table inet dualtrack is not loaded"
    for unit in SERVICES:
        for listener in listeners[unit]:
            assert str(listener.port) in ruleset.stdout
    assert ruleset.stdout.count("drop") >= 3 and 'iifname "lo" accept' in ruleset.stdout


@pytest.mark.parametrize("name", ["gateway.env", "backup.env", "secrets/cloud-token", "kb-sync.env"])
def test_secret_files_are_private(host, name: str) -> None:
    secret = host.file(f"{CONFIG_DIR}/{name}")
    if not secret.exists:
        pytest.skip(f"{name} is not used on this host")
    assert secret.mode == 0o600, f"{name} has mode {oct(secret.mode)}"
    assert secret.user in ("root", "dualtrack")


def test_knowledge_base_collections_exist(host, gateway_env) -> None:
    script = (
        "import json, os; from pymilvus import MilvusClient; "
        "c = MilvusClient(uri=os.environ['DUALTRACK_MILVUS__URI'], token=os.environ.get('DUALTRACK_MILVUS__TOKEN', '')); "
        "print(json.dumps(c.list_collections()))"
    )
    env = " ".join(
        f"{k}={v!r}" for k, v in gateway_env.items() if k in ("DUALTRACK_MILVUS__URI", "DUALTRACK_MILVUS__TOKEN")
    )
    out = host.run(f"env {env} {VENV}/bin/python -c {script!r}")
    assert out.rc == 0, out.stderr
    collection = gateway_env["DUALTRACK_MILVUS__COLLECTION"]
    assert {collection, f"{collection}_documents"} <= set(json.loads(out.stdout))


def test_gateway_ready(host, listeners) -> None:
    (gateway,) = listeners["dualtrack-gateway"]
    address = "127.0.0.1" if gateway.address in ("0.0.0.0", "::") else gateway.address
    out = host.run(f"curl -sf http://{address}:{gateway.port}/readyz")
    assert out.rc == 0, f"/readyz: {out.stdout or out.stderr}"
    assert json.loads(out.stdout).get("ready") is True


def test_backups_scheduled(host) -> None:
    timers = host.run("systemctl list-timers --all --no-legend dualtrack-backup.timer").stdout
    assert "dualtrack-backup.timer" in timers
    assert host.file(f"{CONFIG_DIR}/backup.env").exists
