"""What left the premises, per request: every call to a model endpoint, with the exact number of
body bytes sent and the prompt's token count (never the text).

The gateway sets a fresh list for each request (:func:`collecting`); the endpoint clients add to
it (:func:`calling`, and :func:`count_request` as an httpx request hook, which sees the encoded
body exactly as it goes on the wire). Calls outside a request (the warm-up) are not collected.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

import httpx

_calls: ContextVar[list[dict[str, Any]] | None] = ContextVar("egress_calls", default=None)
_current: ContextVar[dict[str, Any] | None] = ContextVar("egress_current", default=None)


def collecting(calls: list[dict[str, Any]]) -> None:
    """Collect this request's model calls into ``calls`` (set before the endpoint runs)."""
    _calls.set(calls)


@contextlib.contextmanager
def calling(endpoint: str, url: str, prompt_tokens: int, leaves_premises: bool) -> Iterator[None]:
    calls = _calls.get()
    if calls is None:
        yield
        return
    call = {
        "endpoint": endpoint,
        "url": url,
        "leaves_premises": leaves_premises,
        "bytes": 0,
        "prompt_tokens": prompt_tokens,
    }
    calls.append(call)
    _current.set(call)
    try:
        yield
    finally:
        # not reset(token): a streamed answer ends in another task's copy of the context
        _current.set(None)


async def count_request(request: httpx.Request) -> None:
    call = _current.get()
    if call is not None:
        call["bytes"] += len(request.content)
