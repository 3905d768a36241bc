"""``dualtrack onprem verify``: a converged on-prem host is what the roles promise.

Read-only checks (run against production hosts): units active and enabled, every port
listening only where configured, the firewall's allowlist loaded, secret files root-only,
the knowledge-base collections present, the gateway ready, backups scheduled.
"""

from __future__ import annotations

import json
import os
import re
import shlex

import pytest
from conftest import CONFIG_DIR, VENV, env_file

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


WILDCARDS = {"0.0.0.0", "::", "*"}  # noqa: S104 -- how ss shows "every address" (gRPC binds '*')


def _same(configured: str, shown: str) -> bool:
    return shown == configured or (configured in WILDCARDS and shown in WILDCARDS)


@pytest.mark.parametrize("unit", SERVICES)
def test_ports_listen_only_where_configured(host, listeners, unit: str) -> None:
    sockets = _listening(host)
    for want in listeners[unit]:
        bound = {addr for addr, port in sockets if port == want.port}
        assert any(_same(want.address, addr) for addr in bound), f"{unit} is not listening on {want}"
        elsewhere = {addr for addr in bound if not _same(want.address, addr)}
        assert not elsewhere, f"{unit} port {want.port} also listens on {sorted(elsewhere)}"


def test_firewall_allowlist_loaded(host, listeners) -> None:
    ruleset = host.run("nft list table inet dualtrack")
    assert ruleset.rc == 0, "table inet dualtrack is not loaded"
    for unit in SERVICES:
        for listener in listeners[unit]:
            assert str(listener.port) in ruleset.stdout
    assert ruleset.stdout.count("drop") >= 3 and 'iifname "lo" accept' in ruleset.stdout


@pytest.mark.parametrize("unit", SERVICES)
def test_services_stop_with_the_firewall(host, unit: str) -> None:
    """No port without its allowlist: each service is bound to the firewall unit (it stops when
    the table is removed) and ordered after it (it starts once the table is loaded)."""
    shown = host.run(f"systemctl show {unit} --property=BindsTo --property=After").stdout
    deps = dict(line.split("=", 1) for line in shown.splitlines() if "=" in line)
    assert "dualtrack-firewall.service" in deps.get("BindsTo", "").split(), (
        f"{unit} runs without the firewall"
    )
    assert "dualtrack-firewall.service" in deps.get("After", "").split(), f"{unit} may start before it"


def test_nftables_start_keeps_the_allowlist(host) -> None:
    """nftables.service flushes every table when it starts or reloads: it loads ours again."""
    for prop in ("ExecStartPost", "ExecReload"):
        shown = host.run(f"systemctl show nftables --property={prop}").stdout
        assert f"{CONFIG_DIR}/firewall.nft" in shown, (
            f"nftables.service {prop} leaves the dualtrack table out"
        )


MAX_EXPOSURE = 2.5
"""The most `systemd-analyze security` exposure a dualtrack service may show (0 = fully
confined, 10 = not at all). The sandbox the services share (dualtrack_unit_sandbox) scores 1.2
with loopback-only networking (the local model) and 1.4 with the network the others need
(systemd 252, Debian bookworm); 2.5 leaves room for a unit's own needs (a GPU's devices) and
fails any unit that lost its sandbox (8.3 for one with only NoNewPrivileges, ProtectSystem and
PrivateTmp)."""


@pytest.mark.parametrize("unit", [*SERVICES, "dualtrack-llama", "dualtrack-kb-sync", "dualtrack-backup"])
def test_units_are_sandboxed(host, unit: str) -> None:
    unit_file = host.file(f"/etc/systemd/system/{unit}.service")
    if not unit_file.exists:
        pytest.skip(f"{unit} is not installed on this host")
    if "docker compose" in unit_file.content_string:
        pytest.skip(f"{unit} runs Milvus standalone under Docker: its containers are confined by Docker")
    report = host.run(f"systemd-analyze security --no-pager {unit}.service").stdout
    found = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", report)
    assert found, report[-500:]
    exposure = float(found.group(1))
    worst = [line.split()[1] for line in report.splitlines() if line.startswith("✗")][:8]
    assert exposure <= MAX_EXPOSURE, f"{unit}: exposure {exposure} over {MAX_EXPOSURE}; open: {worst}"


def test_secret_files_are_private(host) -> None:
    """Every settings/secret file the roles wrote: 0600, never group- or world-readable."""
    names = host.run(f"find {CONFIG_DIR} -type f -name '*.env' -o -type f -path '*/secrets/*'").stdout.split()
    assert f"{CONFIG_DIR}/gateway.env" in names and f"{CONFIG_DIR}/backup.env" in names
    for name in names:
        secret = host.file(name)
        assert secret.mode == 0o600, f"{name} has mode {oct(secret.mode)}"
        assert secret.user in ("root", "dualtrack"), f"{name} belongs to {secret.user}"


def test_knowledge_base_collections_exist(host, gateway_env) -> None:
    script = (
        "import json, os; from pymilvus import MilvusClient; "
        "c = MilvusClient(uri=os.environ['DUALTRACK_MILVUS__URI'], "
        "token=os.environ.get('DUALTRACK_MILVUS__TOKEN', '')); "
        "print(json.dumps(c.list_collections()))"
    )
    wanted = ("DUALTRACK_MILVUS__URI", "DUALTRACK_MILVUS__TOKEN")
    env = " ".join(shlex.quote(f"{k}={v}") for k, v in gateway_env.items() if k in wanted)
    out = host.run(f"env {env} {VENV}/bin/python -c {shlex.quote(script)}")
    assert out.rc == 0, out.stderr
    collection = gateway_env["DUALTRACK_MILVUS__COLLECTION"]
    assert {collection, f"{collection}_documents"} <= set(json.loads(out.stdout))


TLS_DIR = f"{CONFIG_DIR}/tls"
LOOPBACK = ("127.0.0.1", "::1", "localhost")


def _server_name(host) -> str:
    """The name clients connect to, as the role recorded it (else the certificate's first DNS name)."""
    recorded = host.file(f"{TLS_DIR}/server-name")
    if recorded.exists and recorded.content_string.strip():
        return recorded.content_string.strip()
    sans = host.run(f"openssl x509 -in {TLS_DIR}/gateway.crt -noout -ext subjectAltName").stdout
    names = re.findall(r"DNS:([^,\s]+)", sans)
    assert names, f"the gateway's certificate names no host: {sans.strip()}"
    return names[0]


def test_gateway_ready(host, listeners, gateway_env) -> None:
    """Asked as a client would: over HTTPS, the chain checked against the site CA and the name
    against the certificate."""
    (gateway,) = listeners["dualtrack-gateway"]
    address = "127.0.0.1" if gateway.address in WILDCARDS else gateway.address
    if "DUALTRACK_GATEWAY__TLS_CERT_FILE" in gateway_env:
        name = _server_name(host)
        ca = f"--cacert {TLS_DIR}/ca.crt" if host.file(f"{TLS_DIR}/ca.crt").exists else ""
        url = f"https://{name}:{gateway.port}/readyz"
        out = host.run(f"curl -sSf --noproxy '*' {ca} --resolve {name}:{gateway.port}:{address} {url}")
    else:
        out = host.run(f"curl -sSf http://{address}:{gateway.port}/readyz")
    assert out.rc == 0, f"/readyz: {out.stdout or out.stderr}"
    assert json.loads(out.stdout).get("ready") is True


def test_gateway_certificate(host, listeners, gateway_env) -> None:
    """Off loopback the gateway speaks HTTPS only, with a certificate its CA vouches for, that
    matches its key and is not about to expire."""
    (gateway,) = listeners["dualtrack-gateway"]
    if "DUALTRACK_GATEWAY__TLS_CERT_FILE" not in gateway_env:
        assert gateway.address in LOOPBACK, f"the gateway serves plain HTTP on {gateway.address}"
        pytest.skip("the gateway listens on loopback only, without TLS")
    cert, key = f"{TLS_DIR}/gateway.crt", f"{TLS_DIR}/gateway.key"
    if host.file(f"{TLS_DIR}/ca.crt").exists:
        chain = host.run(f"openssl verify -CAfile {TLS_DIR}/ca.crt {cert}")
        assert chain.rc == 0, f"the site CA does not vouch for the certificate: {chain.stdout}{chain.stderr}"
    days = int(os.environ.get("DUALTRACK_VERIFY_CERT_DAYS", "14"))  # `onprem verify --cert-days`
    soon = host.run(f"openssl x509 -in {cert} -noout -checkend {days * 24 * 3600}")
    assert soon.rc == 0, f"the gateway's certificate expires within {days} days: renew it"
    public = host.run(f"openssl x509 -in {cert} -noout -pubkey").stdout
    assert public and host.run(f"openssl pkey -in {key} -pubout").stdout == public, (
        "key and certificate differ"
    )
    assert host.file(key).mode == 0o600 and host.file(key).user == "root"


def test_backups_scheduled(host) -> None:
    timers = host.run("systemctl list-timers --all --no-legend dualtrack-backup.timer").stdout
    assert "dualtrack-backup.timer" in timers
    assert host.file(f"{CONFIG_DIR}/backup.env").exists


def test_sync_consumer_runs_where_enabled(host) -> None:
    if host.run("systemctl is-enabled dualtrack-kb-sync").stdout.strip() != "enabled":
        pytest.skip("kb_sync is not enabled on this host")
    assert host.run("systemctl is-active dualtrack-kb-sync").stdout.strip() == "active"
    env = env_file(host, "kb-sync.env")
    assert env["DUALTRACK_SYNC__BOOTSTRAP_SERVERS"] and env["DUALTRACK_SYNC__GROUP_ID"]
    port = int(env.get("DUALTRACK_SYNC__METRICS_PORT", "9464"))
    bound = {addr for addr, p in _listening(host) if p == port}
    assert bound == {"127.0.0.1"}, f"the consumer's /metrics listens on {sorted(bound)}"
    metrics = host.run(f"curl -sf http://127.0.0.1:{port}/metrics")
    assert metrics.rc == 0 and "dualtrack_sync_events_total" in metrics.stdout


def test_local_model_serves_on_loopback_where_configured(host, gateway_env) -> None:
    """The llama.cpp model: running, on 127.0.0.1 only, answering, and the gateway pointed at it."""
    if gateway_env.get("DUALTRACK_LLM__LOCAL__KIND") != "openai":
        pytest.skip("this host's local model is not the llama.cpp one")
    unit = "dualtrack-llama"
    assert host.run(f"systemctl is-active {unit}").stdout.strip() == "active"
    assert host.run(f"systemctl is-enabled {unit}").stdout.strip() == "enabled"
    port = int(gateway_env["DUALTRACK_LLM__LOCAL__URL"].rsplit(":", 1)[1])
    bound = {addr for addr, p in _listening(host) if p == port}
    assert bound == {"127.0.0.1"}, f"the model listens on {sorted(bound)}"
    models = host.run(f"curl -sf http://127.0.0.1:{port}/v1/models")
    assert models.rc == 0 and gateway_env["DUALTRACK_LLM__LOCAL__MODEL"] in models.stdout
    model = host.file(gateway_env["DUALTRACK_LLM__LOCAL__TOKENIZER"])
    assert model.exists and model.mode == 0o640 and model.user == "root"
    hardening = host.run(
        f"systemctl show {unit} -p NoNewPrivileges -p ProtectSystem -p User -p InaccessiblePaths"
    ).stdout
    assert "NoNewPrivileges=yes" in hardening and "ProtectSystem=strict" in hardening
    assert "User=root" not in hardening and CONFIG_DIR in hardening  # settings and secrets unseen
