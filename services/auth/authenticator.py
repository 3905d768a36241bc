"""One place that turns a request's ``Authorization`` header into a principal.

Three kinds of credential, tried by their shape:

- a service API key (``dtk_...``, :mod:`services.auth.keys`), looked up on every request so
  a revocation holds at once;
- a signed-in user's bearer JWT (three dot-separated parts), checked by
  :class:`~services.auth.oidc.OidcValidator` when ``gateway.oidc`` is set;
- the bootstrap admin key (``gateway.api_key``): one shared secret with every right, for
  setting a deployment up and for the local stack -- off unless set.

Anything else, or nothing, is refused with 401 before the request's body is read.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from pathlib import Path

from services.auth.errors import AuthError, AuthUnavailable
from services.auth.keys import PREFIX, KeyStore, KeyStoreUnavailable
from services.auth.oidc import OidcValidator
from services.auth.principal import Principal, Role
from services.config import ConfigError, GatewaySettings
from services.kb.classification import Classification

log = logging.getLogger(__name__)


BOOTSTRAP = Principal(
    "bootstrap-admin", "bootstrap", frozenset(), frozenset({Role.ADMIN}), Classification.CONFIDENTIAL
)
"""Who the bootstrap key stands for: every role, every label."""

AUTH_DISABLED = Principal(
    "anonymous", "bootstrap", frozenset(), frozenset({Role.ADMIN}), Classification.CONFIDENTIAL
)
"""Who everyone is when a deployment turned authentication off (``gateway.auth_enabled``)."""


def load_bootstrap_key(settings: GatewaySettings) -> str | None:
    """The bootstrap admin key, from ``gateway.api_key`` or ``gateway.api_key_file``, if set."""
    if settings.api_key is not None and settings.api_key.get_secret_value().strip():
        return _long_enough(settings.api_key.get_secret_value().strip(), "gateway.api_key")
    if settings.api_key_file is not None:
        path = Path(settings.api_key_file)
        try:
            key = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"gateway.api_key_file = {str(path)!r}: cannot read: {exc.strerror}") from None
        if not key:
            raise ConfigError(f"gateway.api_key_file = {str(path)!r}: file is empty")
        return _long_enough(key, f"gateway.api_key_file = {str(path)!r}")
    return None


MIN_BOOTSTRAP_KEY = 16


def _long_enough(key: str, where: str) -> str:
    """The bootstrap key has every right: one short enough to guess is refused at start-up."""
    if len(key) < MIN_BOOTSTRAP_KEY:
        raise ConfigError(
            f"{where}: the bootstrap admin key is {len(key)} characters; use at least "
            f"{MIN_BOOTSTRAP_KEY} (e.g. `openssl rand -hex 24`)"
        )
    return key


class Authenticator:
    """The gateway's credential check; built once, at start, from ``[gateway]``."""

    def __init__(self, settings: GatewaySettings, oidc: OidcValidator | None = None) -> None:
        self.enabled = settings.auth_enabled
        self.bootstrap = load_bootstrap_key(settings) if self.enabled else None
        self.keys = KeyStore(settings.keys_file) if settings.keys_file is not None else None
        self.oidc = oidc or (OidcValidator(settings.oidc) if settings.oidc is not None else None)
        if self.enabled and self.bootstrap is None and self.keys is None and self.oidc is None:
            raise ConfigError(
                "gateway.auth_enabled is true but no way to sign in is set: set gateway.oidc "
                "(company sign-in), gateway.keys_file (service API keys) and/or gateway.api_key "
                "(the bootstrap admin key, env DUALTRACK_GATEWAY__API_KEY) -- or disable auth explicitly"
            )

    async def aclose(self) -> None:
        if self.oidc is not None:
            await self.oidc.aclose()

    async def principal(self, authorization: str | None) -> Principal:
        """The principal of a request, or :class:`AuthError` (401; 503 when the identity
        provider cannot be reached)."""
        if not self.enabled:
            return AUTH_DISABLED
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise AuthError("sign in: send `Authorization: Bearer <token or API key>`")
        if token.startswith(PREFIX) and self.keys is not None:
            try:  # SQLite blocks: off the event loop, which every other request shares
                principal = await asyncio.to_thread(self.keys.authenticate, token)
            except KeyStoreUnavailable as exc:
                log.error("%s", exc)
                raise AuthUnavailable("API keys cannot be checked right now: try again shortly") from None
            if principal is None:
                raise AuthError("unknown, expired or revoked API key")
            return principal
        if self.bootstrap is not None and hmac.compare_digest(token.encode(), self.bootstrap.encode()):
            return BOOTSTRAP
        if self.oidc is not None and token.count(".") == 2:
            return await self.oidc.principal(token)
        raise AuthError("missing or wrong API key or token")
