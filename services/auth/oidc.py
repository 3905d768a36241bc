"""Company sign-in: bearer JWT access tokens checked against the identity provider's keys.

A token is accepted only when its signature verifies with a key the issuer publishes (its
JWKS, found through the issuer's discovery document unless configured), with an allowed
public-key algorithm, and its issuer, audience, expiry and not-before hold (with a little
leeway for clock skew). PyJWT does the cryptography and the claim checks; this module owns
the keys:

- fetched keys are used for ``jwks_max_age_s``; after half of that they are refreshed in
  the background, and if the provider is down then the cached keys keep working until they
  are that old -- after that, requests get a clear "identity provider unavailable" (503);
- a token naming a key id the cache does not hold (the provider rotated its keys) triggers
  one refetch, at most every ``jwks_refetch_interval_s``, so a flood of made-up key ids
  cannot turn the gateway into a load generator against the provider.

The claims then become a :class:`~services.auth.principal.Principal` through the
deployment's claim mapping (names differ between Entra ID, Keycloak and Okta). Error
messages say what is wrong with a token, never what it contains.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping
from typing import Any

import httpx
import jwt

from services.auth.errors import AuthError, AuthUnavailable
from services.auth.principal import Principal, Role
from services.config import ClaimSettings, OidcSettings, loopback_or_https
from services.kb.classification import Classification

log = logging.getLogger(__name__)


class ProviderUnavailable(AuthUnavailable):
    """The identity provider's keys cannot be had, and none cached are young enough to use.

    Clients get a fixed message; ``detail`` (which URL failed, how) is for the log."""

    def __init__(self, detail: str) -> None:
        super().__init__("identity provider unavailable: try again shortly")
        self.detail = detail


MAX_DOCUMENT_BYTES = 1024 * 1024
"""A discovery document or JWKS larger than this is refused (they are a few kB)."""


class KeySet:
    """The issuer's published signing keys, cached (see the module docstring).

    One fetch runs at a time, under a deadline for the whole of it (connect, headers, body). A
    refresh of keys that are still usable runs in the background, so no request waits for
    it; only a request that has no usable keys waits -- and after a failed fetch, such
    requests are refused at once until ``jwks_refetch_interval_s`` has passed, so nobody can
    make the gateway flood a provider that is down."""

    def __init__(self, settings: OidcSettings, client: httpx.AsyncClient, clock=time.monotonic) -> None:
        self.settings = settings
        self._client = client
        self._clock = clock
        self._keys: dict[str | None, jwt.PyJWK] = {}
        self._fetched_at: float | None = None
        self._last_attempt = float("-inf")
        """When the last fetch ended (success or not)."""
        self._failed: ProviderUnavailable | None = None
        self._jwks_uri = settings.jwks_uri
        self._lock = asyncio.Lock()
        self._background: asyncio.Task[None] | None = None

    async def aclose(self) -> None:
        if self._background is not None:
            self._background.cancel()
        await self._client.aclose()

    @property
    def age(self) -> float | None:
        return None if self._fetched_at is None else self._clock() - self._fetched_at

    def _may_fetch(self) -> bool:
        return self._clock() - self._last_attempt >= self.settings.jwks_refetch_interval_s

    async def key(self, kid: str | None, alg: str) -> jwt.PyJWK:
        """The key for a token's ``kid`` (or the only key for ``alg`` when it names none)."""
        age = self.age
        if age is None or age >= self.settings.jwks_max_age_s:
            await self._required()
        elif age >= self.settings.jwks_max_age_s / 2 and self._may_fetch():
            self._refresh_in_background()
        found = self._find(kid, alg)
        if found is None and await self.refetch():  # rotated keys: look once more
            found = self._find(kid, alg)
        if found is None:
            if kid is None:
                raise AuthError(
                    f"the token names no signing key (kid) and the issuer publishes "
                    f"{len(self._usable(alg))} keys for {alg}"
                )
            raise AuthError("the token is signed with a key the issuer does not publish")
        return found

    def _usable(self, alg: str) -> list[jwt.PyJWK]:
        return [k for k in self._keys.values() if _fits(k, alg)]

    def _find(self, kid: str | None, alg: str) -> jwt.PyJWK | None:
        if kid is not None:
            key = self._keys.get(kid)
            return key if key is not None and _fits(key, alg) else None
        usable = self._usable(alg)
        return usable[0] if len(usable) == 1 else None

    async def _required(self) -> None:
        """Usable keys, fetched now if need be, or :class:`ProviderUnavailable`."""
        if self._failed is not None and not self._may_fetch():
            raise self._failed  # the provider just failed: do not ask it again yet
        async with self._lock:
            age = self.age
            if age is not None and age < self.settings.jwks_max_age_s:
                return  # fetched while this request waited
            if self._failed is not None and not self._may_fetch():
                raise self._failed
            await self._fetch_now()
        if self.age is None or self.age >= self.settings.jwks_max_age_s:
            assert self._failed is not None
            raise self._failed

    def _refresh_in_background(self) -> None:
        if self._background is None or self._background.done():
            self._background = asyncio.get_running_loop().create_task(self._locked_fetch())

    async def _locked_fetch(self) -> None:
        async with self._lock:
            await self._fetch_now()

    async def refetch(self) -> bool:
        """Fetch the keys again if the rate limit allows; whether it got new ones."""
        if not self._may_fetch():
            return False
        async with self._lock:
            if not self._may_fetch():
                return False  # another request just did
            before = self._fetched_at
            await self._fetch_now()
        return self._fetched_at != before

    async def _fetch_now(self) -> None:
        """One fetch (the caller holds the lock); a failure is kept and logged, not raised."""
        try:
            async with asyncio.timeout(self.settings.jwks_timeout_s):
                keys = await self._fetch()
        except TimeoutError:
            self._failure(f"no answer from the identity provider within {self.settings.jwks_timeout_s} s")
        except ProviderUnavailable as exc:
            self._failure(exc.detail)
        else:
            self._keys, self._fetched_at, self._failed = keys, self._clock(), None
        finally:
            self._last_attempt = self._clock()

    def _failure(self, detail: str) -> None:
        log.warning("identity provider unavailable: %s", detail)
        self._failed = ProviderUnavailable(detail)

    async def _fetch(self) -> dict[str | None, jwt.PyJWK]:
        if self._jwks_uri is None:
            self._jwks_uri = await self._discover()
        document = await self._get_json(self._jwks_uri, "the JWKS")
        keys: dict[str | None, jwt.PyJWK] = {}
        for entry in document.get("keys") or []:
            if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
                continue  # encryption keys are not for checking signatures
            try:
                keys[entry.get("kid")] = jwt.PyJWK(entry)
            except jwt.PyJWTError:
                continue  # a key type this gateway cannot use is skipped, as RFC 7517 asks
        if not keys:
            raise ProviderUnavailable(f"the JWKS at {self._jwks_uri} holds no usable key")
        return keys

    async def _discover(self) -> str:
        issuer = self.settings.issuer
        url = f"{issuer.rstrip('/')}/.well-known/openid-configuration"
        document = await self._get_json(url, "the discovery document")
        if document.get("issuer") != issuer:
            raise ProviderUnavailable(
                f"the discovery document at {url} names issuer {document.get('issuer')!r}, "
                f"not gateway.oidc.issuer {issuer!r}"
            )
        uri = document.get("jwks_uri")
        if not isinstance(uri, str) or not uri:
            raise ProviderUnavailable(f"the discovery document at {url} names no jwks_uri")
        try:
            return loopback_or_https(uri, "the discovered jwks_uri")
        except ValueError as exc:
            raise ProviderUnavailable(str(exc)) from None

    async def _get_json(self, url: str, what: str) -> dict[str, Any]:
        try:
            async with self._client.stream("GET", url) as r:
                r.raise_for_status()
                body = bytearray()
                async for piece in r.aiter_bytes():
                    body += piece
                    if len(body) > MAX_DOCUMENT_BYTES:
                        raise ProviderUnavailable(f"{what} at {url} is over {MAX_DOCUMENT_BYTES} bytes")
            document = json.loads(body)
        except (httpx.HTTPError, ValueError) as exc:
            raise ProviderUnavailable(f"cannot fetch {what} from {url} ({type(exc).__name__})") from None
        if not isinstance(document, dict):
            raise ProviderUnavailable(f"{what} at {url} is not a JSON object")
        return document


_CURVES = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}


def _fits(key: jwt.PyJWK, alg: str) -> bool:
    """Whether ``key`` may check an ``alg`` signature: the key's own ``alg`` when it names one,
    else any algorithm of its key type."""
    jwk = key._jwk_data  # PyJWK keeps the JWK it was made from
    if jwk.get("alg") and jwk["alg"] != alg:
        return False
    if alg in _CURVES and jwk.get("crv") != _CURVES[alg]:
        return False  # an EC key checks only its own curve's algorithm
    family = {"RSA": ("RS", "PS"), "EC": ("ES",), "OKP": ("EdDSA",)}.get(key.key_type or "", ())
    return any(alg.startswith(prefix) for prefix in family)


_CLIENT_CLAIMS = ("azp", "client_id", "cid", "appid")
"""Where providers name the client a token was issued to: OIDC, RFC 9068, Okta, Entra ID v1."""
_ACCESS_TYPES = frozenset({"at+jwt", "application/at+jwt"})
_JWT_TYPES = frozenset({"jwt", "application/jwt"}) | _ACCESS_TYPES


def _check_type(typ: object, access_only: bool) -> None:
    """The header's ``typ``: absent or a JWT type; ``at+jwt`` (RFC 9068) when required. A
    token of another type (a logout token, a signed request object) is never a bearer token."""
    if typ is not None and not isinstance(typ, str):
        raise AuthError("the token's header typ is not a JWT access token type")
    kind = typ.lower() if typ is not None else None
    if access_only and kind not in _ACCESS_TYPES:
        raise AuthError(
            "the token is not an RFC 9068 access token (header typ must be at+jwt: "
            "gateway.oidc.require_access_token_type)"
        )
    if kind is not None and kind not in _JWT_TYPES:
        raise AuthError("the token's header typ is not a JWT access token type")


_ERRORS: tuple[tuple[type[Exception], str], ...] = (
    (jwt.ExpiredSignatureError, "the token has expired"),
    (jwt.ImmatureSignatureError, "the token is not valid yet (nbf/iat in the future)"),
    (jwt.InvalidAudienceError, "the token is meant for another audience"),
    (jwt.InvalidIssuerError, "the token comes from another issuer"),
    (jwt.InvalidSignatureError, "the token's signature does not verify"),
)


class OidcValidator:
    """Bearer tokens -> principals, for one issuer."""

    def __init__(
        self, settings: OidcSettings, client: httpx.AsyncClient | None = None, clock=time.monotonic
    ) -> None:
        self.settings = settings
        self.keys = KeySet(settings, client or httpx.AsyncClient(), clock)

    async def aclose(self) -> None:
        await self.keys.aclose()

    async def principal(self, token: str) -> Principal:
        s = self.settings
        if len(token) > s.max_token_bytes:
            raise AuthError(f"the token is {len(token)} bytes; at most {s.max_token_bytes} are accepted")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError:
            raise AuthError("the bearer token is not a JWT") from None
        except jwt.PyJWTError:
            raise AuthError("the token's header is not valid (kid, crit)") from None
        alg = header.get("alg")
        if alg not in s.algorithms:
            allowed = ", ".join(s.algorithms)
            shown = repr(alg) if isinstance(alg, str) and alg.isalnum() and len(alg) <= 10 else "(unknown)"
            raise AuthError(f"token algorithm {shown} is not accepted (gateway.oidc.algorithms: {allowed})")
        _check_type(header.get("typ"), s.require_access_token_type)
        kid = header.get("kid")
        key = await self.keys.key(kid, alg)
        try:
            try:
                claims = self._decode(token, key, alg)
            except jwt.InvalidSignatureError:
                # a token that names no key, from a provider that has just rotated its only one
                if kid is not None or not await self.keys.refetch():
                    raise
                claims = self._decode(token, await self.keys.key(kid, alg), alg)
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError(f"the token has no {exc.claim!r} claim") from None
        except jwt.PyJWTError as exc:
            for kind, message in _ERRORS:
                if isinstance(exc, kind):
                    raise AuthError(message) from None
            raise AuthError(f"the token is not valid ({type(exc).__name__})") from None
        if claims.get("typ") == "ID":  # Keycloak marks its ID tokens so; they carry the same aud
            raise AuthError("the token is an ID token: send an access token")
        if s.authorized_parties:
            party = next((claims[c] for c in _CLIENT_CLAIMS if c in claims), None)
            if not isinstance(party, str) or party not in s.authorized_parties:
                raise AuthError(
                    "the token was issued to a client this gateway does not accept "
                    "(azp / client_id / cid / appid not in gateway.oidc.authorized_parties)"
                )
        return principal_from_claims(claims, s.claims, issuer=s.issuer)

    def _decode(self, token: str, key: jwt.PyJWK, alg: str) -> dict[str, Any]:
        s = self.settings
        return jwt.decode(
            token,
            key.key,
            algorithms=[alg],
            audience=s.audience,
            issuer=s.issuer,
            leeway=s.leeway_s,
            options={"require": ["exp", "iss", "aud"]},
        )


def _path(claims: Mapping[str, Any], dotted: str) -> Any:
    value: Any = claims
    for part in dotted.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def _names(claims: Mapping[str, Any], dotted: str, key: str, *, required: bool) -> frozenset[str]:
    value = _path(claims, dotted)
    if value is None:
        if required:
            raise AuthError(f"the token has no {dotted!r} claim (gateway.oidc.claims.{key})")
        return frozenset()
    if isinstance(value, str):
        value = [value]  # some providers send a single group as a string
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise AuthError(
            f"the token's {dotted!r} claim must be a list of names (gateway.oidc.claims.{key}), "
            f"got {type(value).__name__}"
        )
    return frozenset(value)


def principal_from_claims(claims: Mapping[str, Any], mapping: ClaimSettings, *, issuer: str) -> Principal:
    """The principal a validated token stands for, by the deployment's claim mapping."""
    subject = _path(claims, mapping.subject)
    if not isinstance(subject, str) or not subject.strip():
        raise AuthError(f"the token has no usable {mapping.subject!r} claim (gateway.oidc.claims.subject)")
    groups = _names(claims, mapping.groups, "groups", required=True)
    roles_claim = _names(claims, mapping.roles, "roles", required=False)
    # roles come from the roles claim only: a group someone could name "admin" grants nothing
    roles = frozenset(Role(mapping.role_map[n]) for n in roles_claim if n in mapping.role_map)
    if not roles:
        if mapping.default_role == "none":
            raise AuthError("the token carries no role this gateway knows (gateway.oidc.claims.role_map)")
        roles = frozenset({Role(mapping.default_role)})
    clearances = [mapping.clearance_by_group[g] for g in groups if g in mapping.clearance_by_group]
    clearance = max(clearances, key=lambda c: c.rank, default=Classification(mapping.default_clearance))
    return Principal(subject, "user", groups, roles, clearance, issuer=issuer)
