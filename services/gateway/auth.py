"""Bearer API-key authentication (on by default)."""

from __future__ import annotations

import hmac
from pathlib import Path

from fastapi import HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from services.config import ConfigError, GatewaySettings

bearer = HTTPBearer(auto_error=False, description="API key: `Authorization: Bearer <key>`")


def load_api_key(settings: GatewaySettings) -> str | None:
    """The configured key, from ``gateway.api_key`` or ``gateway.api_key_file``.

    Returns ``None`` only when auth is disabled; a missing or empty key with auth
    on is a configuration error, not an open door.
    """
    if not settings.auth_enabled:
        return None
    if settings.api_key is not None and settings.api_key.get_secret_value().strip():
        return settings.api_key.get_secret_value().strip()
    if settings.api_key_file is not None:
        path = Path(settings.api_key_file)
        try:
            key = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"gateway.api_key_file = {str(path)!r}: cannot read: {exc.strerror}") from None
        if not key:
            raise ConfigError(f"gateway.api_key_file = {str(path)!r}: file is empty")
        return key
    raise ConfigError(
        "gateway.auth_enabled is true but no key is set: set gateway.api_key "
        "(env DUALTRACK_GATEWAY__API_KEY) or gateway.api_key_file, or disable auth explicitly"
    )


UNAUTHORIZED = "missing or wrong API key"
CHALLENGE = {"WWW-Authenticate": "Bearer"}


def key_matches(expected: str | None, authorization: str | None) -> bool:
    """Whether an ``Authorization`` header carries the key (constant-time compare).
    Used by the endpoint dependency and by the upload gate that runs before parsing."""
    if expected is None:
        return True
    scheme, _, token = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), expected.encode())


def require_key(request: Request, credentials: HTTPAuthorizationCredentials | None) -> None:
    header = f"Bearer {credentials.credentials}" if credentials else None
    if not key_matches(request.app.state.api_key, header):
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, UNAUTHORIZED, headers=CHALLENGE)
