"""Sensitivity routing: may this request go to the cloud?

Decided per request from the query and the classification of the retrieved
chunks. Any chunk labelled with a local-only classification (always
``confidential``) or a query carrying personal data keeps the request on the
premises. The decision carries its reason, which is returned with the answer
and counted in metrics -- never the matched personal data itself.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from services.config import RoutingSettings
from services.kb.models import Hit

Target = Literal["cloud", "local"]

_CARD_CANDIDATE = re.compile(r"(?<!\d)(?:\d[ -]?){12,18}\d(?!\d)")
BUILTIN: dict[str, re.Pattern[str]] = {
    "email": re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"),
    # +CC international, (area) local, North-American 3-3-4, or a national number with a 0 trunk prefix
    "phone": re.compile(
        r"(?<![\w+])\+\d{1,3}[ .-]?\d[\d .-]{6,14}\d(?!\d)"
        r"|\(\d{2,5}\)\s?\d{3,4}[ .-]?\d{3,5}\b"
        r"|\b\d{3}[ .-]\d{3}[ .-]\d{4}\b"
        r"|\b0\d{2,4}[ /-]\d{3,8}\b"
    ),
    # US SSN, UK National Insurance number, German tax id style 11 digits with separators
    # US SSN (with dashes, spaces or bare -- a bare 9-digit number errs on the safe side),
    # UK National Insurance number
    "national_id": re.compile(
        r"(?<![\d-])\d{3}[- ]?\d{2}[- ]?\d{4}(?![\d-])"
        r"|\b[A-CEGHJ-PR-TW-Z]{2}\s?\d{2}\s?\d{2}\s?\d{2}\s?[A-D]\b",
        re.IGNORECASE,
    ),
}


_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?:\s?[A-Z0-9]){11,30}\b")


def iban_ok(candidate: str) -> bool:
    """ISO 13616 mod-97 check (so a random code is not taken for an account number)."""
    compact = candidate.replace(" ", "").upper()
    rearranged = compact[4:] + compact[:4]
    digits = "".join(str(int(ch, 36)) for ch in rearranged)
    return len(compact) >= 15 and int(digits) % 97 == 1


def _iban(text: str) -> bool:
    return any(iban_ok(m.group()) for m in _IBAN.finditer(text))


def luhn_ok(digits: str) -> bool:
    total, parity = 0, len(digits) % 2
    for i, ch in enumerate(digits):
        d = int(ch)
        if i % 2 == parity:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _card(text: str) -> bool:
    for match in _CARD_CANDIDATE.finditer(text):
        digits = re.sub(r"\D", "", match.group())
        if 13 <= len(digits) <= 19 and luhn_ok(digits):
            return True
    return False


@dataclass(frozen=True)
class RouteDecision:
    target: Target
    reason: str
    """Why: ``no-sensitive-content``, ``confidential-context``, ``personal-data:<detector>``,
    ``forced-local`` (the caller asked), ``no-cloud-endpoint``."""


class SensitivityRouter:
    """Stateless and cheap: regexes over the query, labels over the hits."""

    def __init__(self, settings: RoutingSettings) -> None:
        self.local_labels = set(settings.local_classifications)
        # most specific first: a card or national id must not be reported as a phone number
        order = ("card_number", "iban", "national_id", "email", "phone")
        checks = {"card_number": _card, "iban": _iban}
        self.detectors: dict[str, re.Pattern[str] | None] = {
            name: BUILTIN.get(name) for name in order if name in settings.detectors
        }
        self._checks = {name: checks[name] for name in self.detectors if name in checks}
        self.detectors.update({name: re.compile(p) for name, p in settings.custom_patterns.items()})

    def personal_data(self, text: str) -> str | None:
        """The first detector that matches ``text`` (its name only), or None."""
        for name, pattern in self.detectors.items():
            if (pattern is None and self._checks[name](text)) or (
                pattern is not None and pattern.search(text)
            ):
                return name
        return None

    def decide(self, query: str, hits: Sequence[Hit], *, cloud_available: bool = True) -> RouteDecision:
        if any(h.chunk.classification in self.local_labels for h in hits):
            return RouteDecision("local", "confidential-context")
        detector = self.personal_data(query)
        if detector is not None:
            return RouteDecision("local", f"personal-data:{detector}")
        if not cloud_available:
            return RouteDecision("local", "no-cloud-endpoint")
        return RouteDecision("cloud", "no-sensitive-content")
