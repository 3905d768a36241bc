"""Why a request is not authenticated: the errors every credential check raises."""

from __future__ import annotations


class AuthError(Exception):
    """A request is not authenticated; ``str()`` is for the client, verbatim."""

    status = 401


class AuthUnavailable(AuthError):
    """The credential cannot be checked right now (its store or provider is unreachable)."""

    status = 503
