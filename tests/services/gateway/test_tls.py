"""The gateway's HTTPS, through its real entry point (``python -m services.gateway``): a real TLS
handshake by a real client, with a certificate a (test) site CA issued."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import ROOT, TlsFiles, free_port, issue_tls

KEY = "tls-test-key-0123456789"


def gateway_env(tmp_path: Path, port: int, **gateway: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DUALTRACK_")}
    env.update(
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=str(ROOT),
        DUALTRACK_GATEWAY__HOST="127.0.0.1",
        DUALTRACK_GATEWAY__PORT=str(port),
        DUALTRACK_GATEWAY__API_KEY=KEY,
        DUALTRACK_MILVUS__URI=str(tmp_path / "kb.db"),
        DUALTRACK_AUDIT__DIR=str(tmp_path / "audit"),
    )
    env.update({f"DUALTRACK_GATEWAY__{k.upper()}": v for k, v in gateway.items()})
    return env


@pytest.fixture
def tls(tmp_path: Path) -> TlsFiles:
    return issue_tls(tmp_path / "tls")


@pytest.fixture
def https_gateway(tmp_path: Path, tls: TlsFiles) -> Iterator[str]:
    port = free_port()
    env = gateway_env(tmp_path, port, tls_cert_file=str(tls.cert), tls_key_file=str(tls.key))
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.gateway"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    url = f"https://localhost:{port}"
    trust = ssl.create_default_context(cafile=str(tls.ca))
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            try:
                if httpx.get(url + "/healthz", verify=trust, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def test_https_with_the_site_ca(https_gateway: str, tls: TlsFiles) -> None:
    context = ssl.create_default_context(cafile=str(tls.ca))
    r = httpx.get(https_gateway + "/v1/models", verify=context, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and r.url.scheme == "https"
    # a client that does not trust the site CA refuses the connection
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(https_gateway + "/healthz", timeout=5)
    # plain HTTP on the same port gets no answer: nothing is served in clear
    with pytest.raises(httpx.HTTPError):
        httpx.get(https_gateway.replace("https://", "http://") + "/healthz", timeout=5)


def test_a_lan_address_without_a_certificate_is_refused(tmp_path: Path) -> None:
    env = gateway_env(tmp_path, free_port(), host="0.0.0.0")
    done = subprocess.run(
        [sys.executable, "-m", "services.gateway"], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert "gateway.host = '0.0.0.0' without gateway.tls_cert_file and tls_key_file" in done.stderr


def test_a_key_that_does_not_match_its_certificate_is_named(tmp_path: Path, tls: TlsFiles) -> None:
    other = issue_tls(tmp_path / "other")
    env = gateway_env(tmp_path, free_port(), tls_cert_file=str(tls.cert), tls_key_file=str(other.key))
    done = subprocess.run(
        [sys.executable, "-m", "services.gateway"], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "gateway.tls_cert_file / tls_key_file" in done.stderr
    only_cert = gateway_env(tmp_path, free_port(), tls_cert_file=str(tls.cert))
    done = subprocess.run(
        [sys.executable, "-m", "services.gateway"], env=only_cert, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2 and "gateway.tls_cert_file is set alone" in done.stderr
