"""A real OpenID Connect provider for tests: ``oidc-provider-mock`` as its own process.

It signs real RS256 tokens with a key it generates at start (a restart on the same port is a
key rotation) and publishes it in its JWKS. Tokens come from the authorization-code flow,
driven without a browser: ``PUT /users/<sub>`` sets the user's claims (any JSON, merged into
the ID token last, so ``aud``, ``exp`` or ``nbf`` can be chosen), ``POST /oauth2/authorize``
with ``sub`` submits its login form. The ID token is the signed JWT the gateway receives
as a bearer token (the provider's access tokens are opaque).
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import httpx

from tests.support import ROOT, free_port

PROVIDER = ROOT / ".venv-oidc" / "bin" / "oidc-provider-mock"
AUDIENCE = "dualtrack-gateway"
REDIRECT = "http://127.0.0.1/callback"


@dataclass
class OidcProvider:
    workdir: Path
    port: int = 0
    token_max_age_s: int = 3600
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.port = self.port or free_port()

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30.0) -> OidcProvider:
        log = (self.workdir / f"oidc-{self.port}.log").open("ab")
        argv = [str(PROVIDER), "--host", "127.0.0.1", "--port", str(self.port)]
        argv += ["--token-max-age", str(self.token_max_age_s)]
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the OIDC provider exited ({self.proc.returncode}); see {self.workdir}")
            try:
                if httpx.get(f"{self.issuer}/.well-known/openid-configuration", timeout=1).is_success:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the OIDC provider did not start within {timeout_s} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None

    def restart(self) -> None:
        """A new process on the same port: a new signing key (the provider's key rotation)."""
        self.stop()
        self.start()

    def token(self, sub: str, client_id: str = AUDIENCE, **claims: Any) -> str:
        """A signed ID token for ``sub`` with ``claims``, from the provider's code flow."""
        with httpx.Client(base_url=self.issuer, follow_redirects=False, timeout=10) as c:
            c.put(f"/users/{sub}", json=claims).raise_for_status()
            r = c.post(
                "/oauth2/authorize",
                params={
                    "response_type": "code",
                    "client_id": client_id,
                    "redirect_uri": REDIRECT,
                    "scope": "openid",
                    "state": "s",
                    "nonce": "n",
                },
                data={"sub": sub},
            )
            assert r.status_code == 302, r.text
            code = parse_qs(urlparse(r.headers["location"]).query)["code"][0]
            r = c.post(
                "/oauth2/token",
                data={
                    "grant_type": "authorization_code",
                    "code": code,
                    "redirect_uri": REDIRECT,
                    "client_id": client_id,
                    "client_secret": "test-client-secret",
                },
            )
            r.raise_for_status()
            return r.json()["id_token"]
