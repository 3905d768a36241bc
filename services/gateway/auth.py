"""The gateway's side of sign-in: every request but the probes and the API description is
authenticated in the middleware, from its headers alone, before its body is read; the
endpoints find the principal on ``request.state``."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer

from services.auth.authenticator import Authenticator
from services.auth.errors import AuthError
from services.auth.principal import Principal

bearer = HTTPBearer(
    auto_error=False,
    description="A signed-in user's access token, a service API key (`dtk_...`) or the bootstrap "
    "admin key: `Authorization: Bearer <credential>`",
)
"""Declared on the secured endpoints so the OpenAPI description shows the scheme."""

PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
DOCS_ASSETS = "/docs/assets"
"""Where the API pages' scripts and styles are served (public, like the pages)."""
CHALLENGE = {"WWW-Authenticate": "Bearer"}


PROBES = frozenset({"/metrics"})
"""Signed in (the monitor role), but not audited: a scrape every few seconds is no access to
content, and would bury the records that are."""


def is_probe(request: Request) -> bool:
    return own_path(request) in PROBES


def own_path(request: Request) -> str:
    """The path within the app: without the prefix it is served under (behind a proxy)."""
    path, root = request.url.path, request.scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def is_public(request: Request) -> bool:
    """A liveness or readiness probe or the API description: answered without sign-in (and not
    audited)."""
    path = own_path(request)
    return path in PUBLIC_PATHS or path.startswith(DOCS_ASSETS + "/")


async def authenticate(request: Request, authenticator: Authenticator) -> JSONResponse | None:
    """Set ``request.state.principal``, or the error response to send instead."""
    if is_public(request):
        return None
    try:
        request.state.principal = await authenticator.principal(request.headers.get("authorization"))
    except AuthError as exc:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status, headers=CHALLENGE)
    return None


def principal_of(request: Request) -> Principal:
    """The principal the middleware authenticated (every secured endpoint has one)."""
    return request.state.principal
