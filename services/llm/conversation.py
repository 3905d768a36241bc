"""Which earlier answers the gateway can vouch for.

A chat client sends the whole conversation back with every request, its earlier assistant turns
included, and could rewrite them: "the earlier turns were public" must not be the client's word.
The gateway remembers, server-side, a digest of every answer it gave whose inputs could go to
the cloud; an assistant turn it does not remember (forged, edited, from another gateway, or from
before a restart) makes the conversation undetermined, and an undetermined conversation stays on
the premises. Only digests are kept, never the text, and the oldest are forgotten first.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict


def digest(text: str) -> bytes:
    return hashlib.sha256(text.strip().encode()).digest()


class AnswerMemory:
    def __init__(self, size: int) -> None:
        self.size = size
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        self._lock = threading.Lock()

    def remember(self, answer: str) -> None:
        """``answer`` (as the client received it) was produced from cloud-eligible inputs."""
        if self.size == 0:
            return
        key = digest(answer)
        with self._lock:
            self._seen[key] = None
            self._seen.move_to_end(key)
            while len(self._seen) > self.size:
                self._seen.popitem(last=False)

    def vouches(self, answer: str) -> bool:
        with self._lock:
            return digest(answer) in self._seen
