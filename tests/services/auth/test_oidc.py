"""Bearer tokens checked against a real OpenID Connect provider process (``tests/idp.py``):
real RS256 signatures, its real discovery document and JWKS; nothing about validation is
mocked. Forged tokens are made the way an attacker would make them."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from services.auth.errors import AuthError
from services.auth.oidc import OidcValidator, ProviderUnavailable
from services.auth.principal import Principal, Role
from services.config import ConfigError, OidcSettings, load_settings
from services.kb.classification import Classification
from tests.idp import AUDIENCE, OidcProvider


@pytest.fixture(scope="module")
def idp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcProvider]:
    provider = OidcProvider(tmp_path_factory.mktemp("idp")).start()
    try:
        yield provider
    finally:
        provider.stop()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _settings(idp: OidcProvider, **extra) -> OidcSettings:
    claims = {
        "role_map": {"kb-admins": "admin", "kb-writers": "contributor"},
        "clearance_by_group": {"finance": "confidential", "everyone": "internal"},
        "default_clearance": "public",
    }
    return OidcSettings(issuer=idp.issuer, audience=[AUDIENCE], claims=claims, **extra)


LOOP = asyncio.new_event_loop()  # one loop, as in the gateway: the validator's client lives in it


def _principal(validator: OidcValidator, token: str):
    return LOOP.run_until_complete(validator.principal(token))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _reject(validator: OidcValidator, token: str, message: str) -> None:
    with pytest.raises(AuthError, match=message) as err:
        _principal(validator, token)
    assert err.value.status == 401


def test_a_signed_token_becomes_a_principal(idp: OidcProvider) -> None:
    validator = OidcValidator(_settings(idp))
    token = idp.token("alice", groups=["finance", "everyone"], roles=["kb-writers", "offline"])
    p = _principal(validator, token)
    assert (p.subject, p.kind, p.issuer) == ("alice", "user", idp.issuer)
    assert p.groups == {"finance", "everyone"}
    assert p.roles == {Role.CONTRIBUTOR} and p.has(Role.READER) and not p.has(Role.ADMIN)
    assert p.clearance is Classification.CONFIDENTIAL  # the highest of its groups'
    bob = _principal(validator, idp.token("bob", groups=["sales", "kb-admins", "admin"]))
    assert bob.roles == {Role.READER} and bob.clearance is Classification.PUBLIC  # the defaults
    # a group's name grants no role, whatever it is called
    default = OidcValidator(OidcSettings(issuer=idp.issuer, audience=[AUDIENCE]))
    assert _principal(default, idp.token("eve", groups=["admin"], roles=["admin"])).roles == {Role.READER}


def test_claim_names_follow_the_provider(idp: OidcProvider) -> None:
    # Keycloak puts roles under realm_access.roles and can name the groups claim otherwise
    claims = {"groups": "member_of", "roles": "realm_access.roles", "role_map": {"kb-admin": "admin"}}
    validator = OidcValidator(OidcSettings(issuer=idp.issuer, audience=[AUDIENCE], claims=claims))
    token = idp.token("carol", member_of=["ops"], realm_access={"roles": ["kb-admin", "offline_access"]})
    p = _principal(validator, token)
    assert p.groups == {"ops"} and p.roles == {Role.ADMIN}
    mapping = {"role_map": {"kb-admin": "admin"}, "default_role": "none"}
    strict = OidcSettings(issuer=idp.issuer, audience=[AUDIENCE], claims=mapping)
    _reject(OidcValidator(strict), idp.token("dave", groups=["ops"]), "carries no role this gateway knows")


@pytest.mark.parametrize(
    "claims, message",
    [
        ({"exp": int(time.time()) - 120}, "the token has expired"),
        ({"nbf": int(time.time()) + 3600}, "not valid yet"),
        ({"iss": "http://127.0.0.1:1"}, "comes from another issuer"),
        ({"aud": "another-app"}, "meant for another audience"),
        ({}, "no 'groups' claim"),
        ({"groups": 7}, "'groups' claim must be a list of names"),
        ({"groups": ["ok", 3]}, "'groups' claim must be a list of names"),
    ],
)
def test_bad_tokens_from_the_provider_are_refused_with_the_reason(
    idp: OidcProvider, claims: dict, message: str
) -> None:
    if "groups" not in claims and message != "no 'groups' claim":
        claims = {**claims, "groups": ["everyone"]}
    _reject(OidcValidator(_settings(idp)), idp.token("eve", **claims), message)


def test_a_token_for_another_client_is_for_another_audience(idp: OidcProvider) -> None:
    token = idp.token("frank", client_id="some-other-app", groups=["everyone"])
    _reject(OidcValidator(_settings(idp)), token, "meant for another audience")


def test_id_tokens_and_other_clients_tokens_are_refused_where_the_provider_says_so(idp: OidcProvider) -> None:
    keycloak_id_token = idp.token("gina", groups=["everyone"], typ="ID")
    _reject(OidcValidator(_settings(idp)), keycloak_id_token, "is an ID token: send an access token")
    parties = OidcValidator(_settings(idp, authorized_parties=["dualtrack-cli"]))
    assert _principal(parties, idp.token("gina", groups=["everyone"], azp="dualtrack-cli")).subject == "gina"
    _reject(parties, idp.token("gina", groups=["everyone"], azp="some-other-app"), "issued to a client")
    _reject(parties, idp.token("gina", groups=["everyone"]), "issued to a client")  # no azp at all
    assert _principal(parties, idp.token("gina", groups=["everyone"], cid="dualtrack-cli")).subject == "gina"
    _reject(parties, idp.token("gina", groups=["everyone"], azp=["dualtrack-cli"]), "issued to a client")
    # this provider signs ID tokens (typ JWT), never RFC 9068 access tokens
    strict = OidcValidator(_settings(idp, require_access_token_type=True))
    _reject(strict, idp.token("gina", groups=["everyone"]), "not an RFC 9068 access token")


def test_forged_tokens_are_refused(idp: OidcProvider) -> None:
    validator = OidcValidator(_settings(idp))
    genuine = idp.token("mallory", groups=["everyone"])
    head, body, sig = genuine.split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=="))

    # alg "none": no signature at all
    none = f"{_b64(json.dumps({'alg': 'none', 'typ': 'JWT'}).encode())}.{body}."
    _reject(validator, none, "token algorithm 'none' is not accepted")

    # HS256 keyed with the provider's published public key (the classic confusion attack)
    public = _principal_key_pem(validator, genuine)
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    mac = hmac.new(public, f"{header}.{body}".encode(), hashlib.sha256).digest()
    _reject(validator, f"{header}.{body}.{_b64(mac)}", "token algorithm 'HS256' is not accepted")

    # the genuine signature over changed claims
    raised = _b64(json.dumps({**claims, "groups": ["finance"]}).encode())
    _reject(validator, f"{head}.{raised}.{sig}", "signature does not verify")

    # a key of the attacker's own, under a key id the issuer does not publish
    own = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rogue = jwt.encode(claims, own, algorithm="RS256", headers={"kid": "rogue"})
    _reject(validator, rogue, "signed with a key the issuer does not publish")

    _reject(validator, "not-a-token", "not a JWT")
    _reject(validator, "x" * 9000, "the token is 9000 bytes; at most 8192 are accepted")


def _principal_key_pem(validator: OidcValidator, token: str) -> bytes:
    _principal(validator, token)  # fetches the keys
    (key,) = validator.keys._keys.values()
    return key.key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def test_keys_are_cached_and_a_down_provider_is_a_clear_503_once_they_are_old(
    tmp_path: Path,
) -> None:
    idp = OidcProvider(tmp_path).start()
    clock = Clock()
    validator = OidcValidator(_settings(idp, jwks_max_age_s=600), clock=clock)
    try:
        token = idp.token("grace", groups=["everyone"])
        assert _principal(validator, token).subject == "grace"
    finally:
        idp.stop()
    clock.now += 400  # past half the keys' age: a refresh is tried, fails, the cached keys serve
    assert _principal(validator, token).subject == "grace"
    clock.now += 300  # past their age: no keys to trust
    with pytest.raises(ProviderUnavailable, match="identity provider unavailable: try again") as err:
        _principal(validator, token)
    assert err.value.status == 503 and err.value.detail.startswith("cannot fetch the JWKS from")
    with pytest.raises(ProviderUnavailable):  # refused at once, the provider is not asked again yet
        _principal(validator, token)


def test_a_rotated_key_is_picked_up_without_a_restart(tmp_path: Path) -> None:
    idp = OidcProvider(tmp_path).start()
    clock = Clock()
    validator = OidcValidator(_settings(idp, jwks_refetch_interval_s=10), clock=clock)
    try:
        old = idp.token("heidi", groups=["everyone"])
        assert _principal(validator, old).subject == "heidi"
        idp.restart()  # a new signing key, the old one no longer published
        new = idp.token("heidi", groups=["everyone"])
        _reject(validator, new, "signature does not verify")  # refetch rate limit: not yet
        clock.now += 11
        assert _principal(validator, new).subject == "heidi"  # refetched once, accepted
        clock.now += 11
        _reject(validator, old, "signature does not verify")  # the retired key is gone
    finally:
        idp.stop()


def test_the_issuer_is_compared_exactly(idp: OidcProvider) -> None:
    # the provider names itself by the host it is asked under: "localhost" is another issuer
    settings = OidcSettings(issuer=idp.issuer.replace("127.0.0.1", "localhost"), audience=[AUDIENCE])
    _reject(OidcValidator(settings), idp.token("ivan", groups=["everyone"]), "comes from another issuer")


@pytest.mark.parametrize(
    "oidc, message",
    [
        ({"issuer": "http://idp.example.com", "audience": ["a"]}, "must be an https:// URL"),
        ({"issuer": "https://idp.example.com", "audience": []}, "gateway.oidc.audience"),
        (
            {"issuer": "https://idp.example.com", "audience": ["a"], "algorithms": ["HS256"]},
            r"\['HS256'\] not allowed",
        ),
        (
            {"issuer": "https://idp.example.com", "audience": ["a"], "claims": {"role_map": {"x": "root"}}},
            "gateway.oidc.claims.role_map.x",
        ),
    ],
)
def test_bad_oidc_settings_name_the_key(oidc: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(gateway={"api_key": "bootstrap-key-0123456789", "oidc": oidc})


def test_malformed_headers_are_a_401_not_a_crash(idp: OidcProvider) -> None:
    validator = OidcValidator(_settings(idp))
    body = _b64(b'{"sub": "x"}')
    for header in ({"alg": "RS256", "kid": 5}, {"alg": "RS256", "crit": "x\nFAKE LOG LINE"}):
        _reject(validator, f"{_b64(json.dumps(header).encode())}.{body}.AAAA", "header is not valid")
    for typ in (["JWT"], {"a": 1}, 7, "logout+jwt"):  # before any signature check: never a 500
        header = _b64(json.dumps({"alg": "RS256", "typ": typ}).encode())
        _reject(validator, f"{header}.{body}.AAAA", "header typ is not a JWT access token type")
    long_alg = {"alg": "A" * 5000}
    _reject(validator, f"{_b64(json.dumps(long_alg).encode())}.{body}.AAAA", r"algorithm \(unknown\)")


class BrokenProvider:
    """TEST DOUBLE: a provider that answers 500 -- or nothing, for ``hang_s`` -- and counts asks."""

    def __init__(self, hang_s: float = 0.0) -> None:
        import http.server
        import threading

        owner = self
        self.asked = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.asked += 1
                time.sleep(hang_s)
                self.send_response(500)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


def test_a_down_provider_is_not_flooded_by_anonymous_requests() -> None:
    broken = BrokenProvider()
    try:
        validator = OidcValidator(OidcSettings(issuer=broken.url, audience=[AUDIENCE]))
        own = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        junk = jwt.encode({"sub": "x"}, own, algorithm="RS256", headers={"kid": "k"})
        for _ in range(20):
            with pytest.raises(ProviderUnavailable):
                _principal(validator, junk)
        assert broken.asked == 1  # then refused at once for jwks_refetch_interval_s
    finally:
        broken.close()


def test_a_hanging_provider_costs_one_deadline_not_one_per_request() -> None:
    broken = BrokenProvider(hang_s=3)
    try:
        settings = OidcSettings(issuer=broken.url, audience=[AUDIENCE], jwks_timeout_s=1)
        validator = OidcValidator(settings)
        own = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        junk = jwt.encode({"sub": "x"}, own, algorithm="RS256", headers={"kid": "k"})

        async def many() -> list[BaseException | Principal]:
            calls = [validator.principal(junk) for _ in range(6)]
            return await asyncio.gather(*calls, return_exceptions=True)

        started = time.monotonic()
        results = LOOP.run_until_complete(many())
        assert all(isinstance(r, ProviderUnavailable) for r in results)
        assert time.monotonic() - started < 2.5 and broken.asked == 1
    finally:
        broken.close()
