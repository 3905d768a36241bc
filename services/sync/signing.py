"""Per-site signatures on knowledge-update events (Ed25519).

Anyone who can write to the updates topic (a leaked client credential, a compromised
broker) could otherwise forge a document into every site's knowledge base. So each site
signs what it publishes with its own Ed25519 key, and a consumer applies only events
signed by a key it trusts *for the origin the event names*: a site's key cannot speak
for another site.

The signature travels in message headers, so the event body (and its JSON Schema) is
unchanged:

``dualtrack.key_id``     the first 8 bytes of SHA-256 of the raw public key, in hex
``dualtrack.sent_at``    the publisher's clock when it sent the message, microseconds
``dualtrack.signature``  Ed25519 over :func:`signed_bytes` (domain, topic, sent_at, key, value)

``sent_at`` is signed, so a consumer can refuse a message that was captured and written
to the topic again after the topic's retention would have removed it (a replay), or one
dated in the future. Rotation: give the new public key to every site under the same
origin, switch the site's ``sync.signing_key_file``, and remove the old public key once
the topic's retention has passed (nothing signed with it is left to read).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import struct
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from services.config import ConfigError, SyncSettings

KEY_ID_HEADER: Final = "dualtrack.key_id"
SENT_AT_HEADER: Final = "dualtrack.sent_at"
SIGNATURE_HEADER: Final = "dualtrack.signature"
DOMAIN: Final = b"dualtrack knowledge-update v1\n"
"""Prefix of every signed message, so a signature made here can never be valid for anything else."""


class SigningError(ConfigError):
    """A key that cannot be used; the message names the setting and what is wrong."""


class Rejected(ValueError):
    """A message whose signature does not hold; the message is the dead-letter reason."""


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_text(public: Ed25519PublicKey) -> str:
    """The form ``sync.trusted_keys`` takes: base64 of the 32-byte raw public key."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


def parse_public(text: str, where: str) -> Ed25519PublicKey:
    if "PRIVATE KEY" in text:
        raise SigningError(
            f"{where}: this is a private key; trust the public key `dualtrack sync keygen` printed"
        )
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise SigningError(f"{where}: not base64 (a {len(text)}-character value)") from None
    if len(raw) != 32:
        raise SigningError(f"{where}: an Ed25519 public key is 32 bytes, this one is {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


def generate(path: Path) -> Ed25519PublicKey:
    """Write a new private key to ``path`` (PKCS#8 PEM, mode 0600; never over an existing
    file) and return its public key."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(pem)
    return key.public_key()


def signed_bytes(topic: str, sent_at: int, key: bytes | None, value: bytes | None) -> bytes:
    """What the signature covers: the topic, the message key and value, and when it was sent
    (a message copied to another topic that trusts the same key does not verify there)."""
    k, t = key or b"", topic.encode()
    head = DOMAIN + struct.pack(">I", len(t)) + t + str(sent_at).encode() + b"\n"
    return head + struct.pack(">I", len(k)) + k + (value or b"")


class Signer:
    """This site's signing key, loaded from ``sync.signing_key_file``."""

    def __init__(self, path: Path) -> None:
        where = f"sync.signing_key_file {str(path)!r}"
        try:
            info = path.stat()
            data = path.read_bytes()
        except OSError as exc:
            raise SigningError(f"{where}: cannot be read ({exc.strerror})") from None
        if info.st_mode & 0o007:
            raise SigningError(
                f"{where}: readable by every user (mode {info.st_mode & 0o777:o}); chmod o-rwx"
            )
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise SigningError(f"{where}: not an unencrypted PEM private key ({exc})") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise SigningError(f"{where}: a {type(key).__name__}, but events are signed with Ed25519")
        self._key = key
        self.public = key.public_key()
        self.key_id = key_id(self.public)

    def headers(
        self, topic: str, key: bytes | None, value: bytes | None, sent_at: int | None = None
    ) -> list[tuple[str, bytes]]:
        """The signature headers of one message to ``topic``, sent now (or at ``sent_at``, µs)."""
        sent_at = time.time_ns() // 1000 if sent_at is None else sent_at
        signature = self._key.sign(signed_bytes(topic, sent_at, key, value))
        return [
            (KEY_ID_HEADER, self.key_id.encode()),
            (SENT_AT_HEADER, str(sent_at).encode()),
            (SIGNATURE_HEADER, base64.b64encode(signature)),
        ]


@dataclass(frozen=True, slots=True)
class Verified:
    origin: str
    """The origin the signing key belongs to: the event must name it."""
    sent_at: float
    """When the publisher sent it, in seconds since the epoch."""


class Verifier:
    """The trusted public keys (``sync.trusted_keys``: origin -> keys) and the window in
    which a message may be read (the topic's retention plus the clock skew allowed)."""

    def __init__(self, trusted: Mapping[str, Sequence[str]], window_s: float, skew_s: float) -> None:
        self._keys: dict[str, tuple[str, Ed25519PublicKey]] = {}
        for origin, texts in trusted.items():
            for i, text in enumerate(texts):
                public = parse_public(text, f"sync.trusted_keys[{origin!r}][{i}]")
                kid = key_id(public)
                other = self._keys.get(kid)
                if other is not None and other[0] != origin:
                    raise SigningError(
                        f"sync.trusted_keys: one key is listed for both {other[0]!r} and {origin!r}; "
                        "each site signs with its own key"
                    )
                self._keys[kid] = (origin, public)
        self.window_s = window_s
        self.skew_s = skew_s

    def __bool__(self) -> bool:
        return bool(self._keys)

    def verify(
        self,
        topic: str,
        headers: Sequence[tuple[str, bytes | None]] | None,
        key: bytes | None,
        value: bytes | None,
    ) -> Verified:
        """The signer of one message, or :class:`Rejected` saying why it is not trusted."""
        found: dict[str, bytes] = {}
        for name, raw in headers or []:
            if name in (KEY_ID_HEADER, SENT_AT_HEADER, SIGNATURE_HEADER):
                if name in found:
                    raise Rejected(f"unsigned: header {name} appears more than once")
                found[name] = raw or b""
        missing = [h for h in (KEY_ID_HEADER, SENT_AT_HEADER, SIGNATURE_HEADER) if h not in found]
        if missing:
            raise Rejected(f"unsigned: no {', '.join(missing)} header (every site signs what it publishes)")
        kid = found[KEY_ID_HEADER].decode("ascii", "replace")
        trusted = self._keys.get(kid)
        if trusted is None:
            raise Rejected(f"signed with key {kid[:32]!r}, which is not in sync.trusted_keys")
        origin, public = trusted
        try:
            sent_at = int(found[SENT_AT_HEADER].decode("ascii"))
            signature = base64.b64decode(found[SIGNATURE_HEADER], validate=True)
        except (UnicodeDecodeError, ValueError, binascii.Error):
            raise Rejected("wrongly signed: malformed sent_at or signature header") from None
        try:
            public.verify(signature, signed_bytes(topic, sent_at, key, value))
        except InvalidSignature:
            raise Rejected(f"wrongly signed: the signature does not match {origin!r}'s key {kid}") from None
        sent = sent_at / 1e6
        age = time.time() - sent
        if age > self.window_s:
            raise Rejected(
                f"replayed: sent {age / 3600:.1f} h ago, longer than an event can stay on the topic "
                f"({self.window_s / 3600:.1f} h: retention, a segment's roll and the clock skew)"
            )
        if age < -self.skew_s:
            raise Rejected(
                f"dated {-age:.0f} s in the future, more than sync.max_clock_skew_s ({self.skew_s:.0f})"
            )
        return Verified(origin=origin, sent_at=sent)


def signer_for(sync: SyncSettings) -> Signer | None:
    """The publisher's signer; publishing unsigned is refused unless signatures are off."""
    if sync.signing_key_file is not None:
        return Signer(sync.signing_key_file)
    if sync.require_signatures:
        raise SigningError(
            "sync.publish is on but sync.signing_key_file is unset: every site signs what it publishes "
            "(create a key with `dualtrack sync keygen` and give its public key to the other sites)"
        )
    return None


def verifier_for(sync: SyncSettings) -> Verifier | None:
    """The consumer's verifier, None when signatures are off; with no trusted key at all
    nothing could ever apply, which is refused at start rather than discovered event by event."""
    if not sync.require_signatures:
        return None
    verifier = Verifier(sync.trusted_keys, sync.replay_window_s, sync.max_clock_skew_s)
    if not verifier:
        raise SigningError(
            "sync.trusted_keys is empty, so no event could be verified: add each publishing site's "
            "public key (`dualtrack sync keygen` prints it), or set sync.require_signatures=false in a lab"
        )
    return verifier
