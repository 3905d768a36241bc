"""Sensitivity routing: may this request go to the cloud? It fails closed.

Two checks, both on what would actually leave the premises:

:meth:`SensitivityRouter.decide`, before a prompt exists: the labels of every chunk the request
involves (the prompt's passages *and* what an unfiltered probe of the knowledge base finds for
the question and each earlier turn, so a client's filter or threshold cannot hide a
confidential match), whether every earlier answer is one the gateway gave (a client cannot
forge "earlier turns were public"), and a DLP scan of every turn.

:meth:`SensitivityRouter.outbound`, on the composed cloud prompt itself: its passages' labels
and a DLP scan of every message, system prompt and passages included, exactly as they would be
sent. A finding, an unknown label or a scanner failure keeps the request local.

Only labels in ``llm.routing.cloud_classifications`` may go (never confidential). The decision
carries its reason, returned with the answer, counted in metrics and audited -- never the
matched personal data itself.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

from services.config import RoutingSettings
from services.kb.classification import Classification
from services.llm.dlp import Scanner, decode_blobs, normalise
from services.llm.prompt import Prompt

log = logging.getLogger(__name__)

Target = Literal["cloud", "local"]


_RUN = re.compile(r"[A-Za-z0-9]+(?:-+[A-Za-z0-9]+)*")
"""Letters and digits joined by hyphens: where codes are looked for."""
MAX_IDENTIFIERS = 256
"""More code-like words than this in one request are not looked up: the request stays local
(``too-many-identifiers``), so decoys cannot crowd a real code out."""
_SPACED = re.compile(
    r"(?<![A-Za-z0-9])[A-Za-z0-9](?:(?:[ \t]*[-._/][ \t]*|[ \t]+)[A-Za-z0-9](?![A-Za-z0-9])){3,}"
)
"""Single characters with separators between them: a code spelled out (``O W L - 7 7 8 1``)."""


def _spelled_out(text: str) -> str:
    """``text``'s spelled-out codes closed up (spaces, dots, underscores and slashes dropped,
    hyphens kept as a code writes them)."""
    return _SPACED.sub(lambda m: re.sub(r"[\s._/]", "", m.group()), text)


def identifiers(texts: Iterable[str]) -> list[str]:
    """Code-like words (8-64 letters, digits and hyphens, with both a letter and a digit: a
    project code, an account or ticket id) to look up verbatim in the knowledge base, as
    written and in upper case, after Unicode normalisation (zero-width characters dropped,
    dashes as hyphens), and also with a code spelled out character by character closed up.
    A code joined to other words by hyphens or dashes (``the invoice—KES-9000—to``) is found
    as every run of its hyphen-separated parts. Every one is returned (the caller refuses
    more than ``MAX_IDENTIFIERS``)."""
    variants = (v for t in texts for n in (normalise(t),) for v in dict.fromkeys((n, _spelled_out(n))))
    found = dict.fromkeys(
        v
        for t in variants
        for m in _RUN.finditer(t)
        for code in _codes(m.group())
        for v in (code, code.upper())
    )
    return sorted(found, key=len, reverse=True)


def _codes(run: str) -> Iterator[str]:
    """The code-like runs of consecutive parts of ``run`` (never across a doubled hyphen)."""
    for piece in re.split(r"-{2,}", run):
        parts = piece.split("-")
        for i in range(len(parts)):
            for j in range(i + 1, len(parts) + 1):
                code = "-".join(parts[i:j])
                if len(code) > 64:
                    break
                if len(code) >= 8 and any(c.isdigit() for c in code) and any(c.isalpha() for c in code):
                    yield code


@dataclass(frozen=True)
class RouteDecision:
    target: Target
    reason: str
    """Why: ``no-sensitive-content``, ``<label>-context`` (a chunk with a label that may not go),
    ``personal-data:<entity>``, ``opaque-content`` (base64 that decodes to no text),
    ``unverified-assistant-turn``, ``dlp-unavailable``, ``verbatim-lookup-unavailable`` (the
    store cannot look a code up, so whether it is in a confidential passage is unknown),
    ``too-many-identifiers`` (more codes than are looked up),
    ``requested-local`` (the caller asked), ``no-cloud-endpoint``."""


class SensitivityRouter:
    def __init__(self, settings: RoutingSettings, scanner: Scanner | None = None) -> None:
        self.cloud_labels = frozenset(settings.cloud_classifications)
        self.scanner = scanner or Scanner(
            settings.dlp_entities, settings.dlp_min_score, settings.custom_patterns, settings.dlp_allow
        )

    def personal_data(self, text: str) -> str | None:
        """``personal-data:<entity>`` for the strongest finding in ``text`` or in base64 it
        carries, ``opaque-content`` for base64 that is not text, ``dlp-unavailable`` when the
        scanner failed, or None."""
        hidden = decode_blobs(normalise(text))
        if hidden.opaque:
            return "opaque-content"
        try:
            for part in (text, *hidden.texts):
                entity = self.scanner.first(part)
                if entity:
                    return f"personal-data:{entity.lower()}"
        except Exception:  # an undetermined scan is a reason to stay local, never to go
            log.exception("DLP scan failed: keeping the request local")
            return "dlp-unavailable"
        return None

    def _labels(self, labels: Iterable[Classification]) -> str | None:
        barred = sorted({c for c in labels if c not in self.cloud_labels}, key=lambda c: -c.rank)
        return f"{barred[0].value}-context" if barred else None

    def decide(
        self,
        texts: Sequence[str],
        labels: Iterable[Classification],
        *,
        vouched: bool = True,
        unlooked: str | None = None,
        cloud_available: bool = True,
    ) -> RouteDecision:
        """``texts``: the question and every turn; ``labels``: of every chunk they involve;
        ``vouched``: every earlier assistant turn is an answer this gateway gave for the cloud;
        ``unlooked``: why the identifiers in ``texts`` could not be looked up verbatim."""
        barred = self._labels(labels)
        if barred:
            return RouteDecision("local", barred)
        if unlooked:
            return RouteDecision("local", unlooked)
        for text in texts:
            found = self.personal_data(text)
            if found:
                return RouteDecision("local", found)
        if not vouched:
            return RouteDecision("local", "unverified-assistant-turn")
        if not cloud_available:
            return RouteDecision("local", "no-cloud-endpoint")
        return RouteDecision("cloud", "no-sensitive-content")

    def outbound(self, prompt: Prompt) -> str | None:
        """Why the composed cloud ``prompt`` must not be sent, or None when it may."""
        barred = self._labels(h.chunk.classification for h in prompt.hits)
        if barred:
            return barred
        return self.personal_data("\n".join(m.content for m in prompt.messages))
