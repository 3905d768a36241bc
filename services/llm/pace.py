"""Deadlines from an endpoint's measured speed.

A 7B model on a few CPU cores reads a long prompt at ~13 tokens/s: two minutes before its
first token, where a GPU answers in a second. With ``timeouts = "measured"`` the gateway
times a short warm-up request when it starts (requests wait for it) and every answer after
it, and gives a request ``margin`` times what the model needs at that speed -- its own prompt,
plus the requests ahead of it, since a CPU server answers one at a time -- never less than the
configured ``first_token_timeout_s`` / ``request_timeout_s``. So a slow local model is not
given up on while it works, and a hung one still is.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.config import EndpointSettings

EWMA = 0.3
"""Weight of the newest measurement."""


@dataclass
class Pace:
    settings: EndpointSettings
    prompt_tps: float | None = None
    """Prompt tokens read per second (prompt tokens / time to first token)."""
    generate_tps: float | None = None
    """Tokens generated per second after the first."""
    request_s: float | None = None
    """How long a whole answer takes."""
    in_flight: int = 0
    """Requests this gateway has sent to the endpoint and not finished."""

    @property
    def measured(self) -> bool:
        return self.settings.timeouts == "measured"

    def observe(self, prompt_tokens: int, first_token_s: float, generated: int, generate_s: float) -> None:
        if prompt_tokens >= 16 and first_token_s > 0:
            self.prompt_tps = _blend(self.prompt_tps, prompt_tokens / first_token_s)
        if generated >= 4 and generate_s > 0:
            self.generate_tps = _blend(self.generate_tps, generated / generate_s)
        self.request_s = _blend(self.request_s, first_token_s + generate_s)

    def first_token_timeout(self, prompt_tokens: int) -> float:
        floor = self.settings.first_token_timeout_s
        if not self.measured or not self.prompt_tps:
            return floor
        ahead = max(0, self.in_flight - 1) * (self.request_s or 0.0)  # queued behind the others
        return max(floor, self.settings.timeout_margin * (prompt_tokens / self.prompt_tps + ahead))

    def request_timeout(self, prompt_tokens: int, max_tokens: int) -> float:
        floor = self.settings.request_timeout_s
        if not self.measured or not self.generate_tps:
            return floor
        needed = (
            self.first_token_timeout(prompt_tokens)
            + self.settings.timeout_margin * max_tokens / self.generate_tps
        )
        return max(floor, needed)


def _blend(old: float | None, new: float) -> float:
    return new if old is None else (1 - EWMA) * old + EWMA * new
