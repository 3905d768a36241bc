"""Circuit breaker state machine, on a fake clock."""

from __future__ import annotations

from services.llm.breaker import CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_consecutive_failures_and_recovers() -> None:
    clock, changes = Clock(), []
    breaker = CircuitBreaker(3, 5.0, clock=clock, on_change=changes.append)
    for _ in range(2):
        assert breaker.allow()
        breaker.record_failure()
    breaker.record_success()  # a success resets the count
    for _ in range(3):
        breaker.record_failure()
    assert breaker.state == "open" and not breaker.allow()
    clock.now = 4.9
    assert not breaker.allow()
    clock.now = 5.0
    assert breaker.state == "half_open"
    trial = breaker.allow()
    assert trial and not breaker.allow()  # one trial at a time
    breaker.record_success(trial)
    assert breaker.state == "closed" and breaker.allow()
    assert changes == ["open", "half_open", "closed"]


def test_failed_trial_reopens() -> None:
    clock = Clock()
    breaker = CircuitBreaker(1, 2.0, clock=clock)
    breaker.record_failure()
    clock.now = 2.0
    trial = breaker.allow()
    assert trial
    breaker.record_failure(trial)
    assert breaker.state == "open"
    clock.now = 3.9
    assert not breaker.allow()


def test_health_probe_brings_traffic_back_early() -> None:
    clock = Clock()
    breaker = CircuitBreaker(1, 60.0, clock=clock)
    breaker.record_failure()
    assert not breaker.allow()
    breaker.probe_succeeded()
    assert breaker.state == "half_open" and breaker.allow()


def test_a_cancelled_trial_is_released() -> None:
    clock = Clock()
    breaker = CircuitBreaker(1, 1.0, clock=clock)
    breaker.record_failure()
    clock.now = 1.0
    trial = breaker.allow()
    assert trial is not None and trial.trial and not breaker.allow()  # the trial is out
    breaker.release(trial)  # ...and its request was cancelled: nothing learnt, slot free again
    assert breaker.state == "half_open" and breaker.allow()


def test_only_the_trial_frees_the_trial_slot() -> None:
    clock = Clock()
    breaker = CircuitBreaker(1, 1.0, clock=clock)
    earlier = breaker.allow()  # let through while closed
    assert earlier is not None and not earlier.trial
    breaker.record_failure()
    clock.now = 1.0
    assert breaker.allow() is not None  # the half-open trial is out
    breaker.release(earlier)  # the earlier request ends without an answer: not its slot
    assert breaker.allow() is None  # still one trial at a time


def test_while_half_open_only_the_trial_decides() -> None:
    """Requests let through before the breaker opened may end during the trial: their outcome
    neither reopens nor closes it, so there is never a second trial at once."""
    clock = Clock()
    breaker = CircuitBreaker(1, 1.0, clock=clock)
    earlier = breaker.allow()
    assert earlier is not None
    breaker.record_failure()  # another request failed: open
    clock.now = 1.0
    trial = breaker.allow()
    assert trial is not None and trial.trial
    breaker.record_failure(earlier)  # the earlier request fails late
    assert breaker.state == "half_open" and breaker.allow() is None  # the trial is still the only one
    breaker.record_success(earlier)  # ... or succeeds late: no closing on its word
    assert breaker.state == "half_open"
    breaker.record_failure(trial)
    assert breaker.state == "open"
    clock.now = 2.0
    second = breaker.allow()
    assert second is not None and second.trial != trial.trial
    breaker.release(trial)  # a stale permit ends long after its slot was reused: no effect
    assert breaker.allow() is None
    breaker.record_success(second)
    assert breaker.state == "closed"
