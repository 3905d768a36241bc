"""Circuit breaker for the cloud endpoint.

closed -> (``failure_threshold`` consecutive failures) -> open: requests go straight
to the local model, no time lost on a dead cloud -> after ``reset_timeout_s``, or as
soon as the health probe sees the cloud ready again -> half-open: one trial request
at a time; success closes the breaker, failure opens it again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

State = Literal["closed", "open", "half_open"]


@dataclass(frozen=True, slots=True)
class Permit:
    """Leave to try the cloud once, from :meth:`CircuitBreaker.allow`."""

    trial: int = 0
    """Which half-open trial this is (numbered from 1); 0 for a closed breaker's permits."""


CLOSED = Permit()
"""The permit of a request let through while the breaker was closed."""


class CircuitBreaker:
    """Thread-safe; ``clock`` is injectable so the state machine can be tested without sleeping."""

    def __init__(
        self,
        failure_threshold: int,
        reset_timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[State], None] | None = None,
    ) -> None:
        self.failure_threshold = failure_threshold
        self.reset_timeout_s = reset_timeout_s
        self._clock = clock
        self._on_change = on_change
        self._lock = threading.Lock()
        self._state: State = "closed"
        self._failures = 0
        self._opened_at = 0.0
        self._trial_in_flight = False
        self._trial = 0
        """The number of the newest trial handed out: a stale permit never frees a later slot."""

    @property
    def state(self) -> State:
        with self._lock:
            self._maybe_half_open()
            return self._state

    def _set(self, state: State) -> None:
        if state != self._state:
            self._state = state
            if self._on_change is not None:
                self._on_change(state)

    def _maybe_half_open(self) -> None:
        if self._state == "open" and self._clock() - self._opened_at >= self.reset_timeout_s:
            self._set("half_open")
            self._trial_in_flight = False

    def allow(self) -> Permit | None:
        """May a request try the cloud now? (In half-open, only one trial at a time.) The permit
        says whether it is that trial, so only its holder frees the slot (``release``)."""
        with self._lock:
            self._maybe_half_open()
            if self._state == "closed":
                return CLOSED
            if self._state == "half_open" and not self._trial_in_flight:
                self._trial_in_flight = True
                self._trial += 1
                return Permit(trial=self._trial)
            return None

    def record_success(self, permit: Permit = CLOSED) -> None:
        """The cloud answered the request ``permit`` let through. While half-open only the
        current trial decides; while open, a late answer changes nothing (the trial does)."""
        with self._lock:
            self._maybe_half_open()
            if self._state == "closed":
                self._failures = 0
            elif self._state == "half_open" and self._is_trial(permit):
                self._failures = 0
                self._trial_in_flight = False
                self._set("closed")

    def record_failure(self, permit: Permit = CLOSED) -> None:
        """The cloud failed the request ``permit`` let through. While half-open only the
        current trial's failure opens the breaker again (one trial at a time stays true)."""
        with self._lock:
            self._maybe_half_open()
            if self._state == "closed":
                self._failures += 1
                if self._failures >= self.failure_threshold:
                    self._open()
            elif self._state == "half_open" and self._is_trial(permit):
                self._trial_in_flight = False
                self._open()

    def _is_trial(self, permit: Permit) -> bool:
        return bool(permit.trial) and permit.trial == self._trial and self._trial_in_flight

    def _open(self) -> None:
        self._opened_at = self._clock()
        self._set("open")

    def release(self, permit: Permit) -> None:
        """An attempt ended without telling anything about the cloud (cancelled, or the request
        itself was refused): free the half-open trial slot, if ``permit`` holds it, so the next
        request can try. A request let through while the breaker was closed, or an earlier trial
        whose slot has since been given to another, frees nothing."""
        with self._lock:
            if permit.trial and permit.trial == self._trial:
                self._trial_in_flight = False

    def probe_succeeded(self) -> None:
        """The health probe saw the cloud ready: allow a trial now rather than at the timeout."""
        with self._lock:
            if self._state == "open":
                self._set("half_open")
                self._trial_in_flight = False
