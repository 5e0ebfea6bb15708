"""Retry policy, circuit breaker and the retry loop, on a fake clock (no HTTP, no sleeping)."""

from __future__ import annotations

import email.utils
from collections.abc import Awaitable, Callable

import pytest

from decoding.resilience import (
    CircuitBreaker,
    RetryPolicy,
    call_with_retries,
    parse_retry_after,
)
from schemas.errors import (
    InvalidRequestError,
    OverloadedError,
    RequestTimeoutError,
    SlmgateError,
    UpstreamError,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Sleeps:
    """Records the waits instead of sleeping; advances a fake clock by them."""

    def __init__(self, clock: FakeClock | None = None) -> None:
        self.waits: list[float] = []
        self.clock = clock

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        if self.clock is not None:
            self.clock.now += seconds


class Upstream(UpstreamError):
    def __init__(self, message: str = "503 from upstream", retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


def scripted(
    outcomes: list[BaseException | str],
) -> tuple[Callable[[], Awaitable[str]], list[int]]:
    """An async fn that raises or returns the next scripted outcome; counts its calls."""
    calls: list[int] = []

    async def fn() -> str:
        calls.append(1)
        outcome = outcomes[len(calls) - 1]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    return fn, calls


def state(breaker: CircuitBreaker) -> str:
    """The breaker's state, read fresh (a property that changes with the clock)."""
    return breaker.state


# ---- RetryPolicy ----------------------------------------------------------------------------


def test_backoff_sequence_without_jitter() -> None:
    policy = RetryPolicy(max_retries=6, base_delay_s=0.25, max_delay_s=4.0, jitter=False)
    assert [policy.backoff(k) for k in range(7)] == [0.25, 0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert [policy.delay(k) for k in range(7)] == [0.25, 0.5, 1.0, 2.0, 4.0, 4.0, None]


def test_full_jitter_scales_the_ceiling() -> None:
    policy = RetryPolicy(max_retries=3, base_delay_s=1.0, max_delay_s=3.0, jitter=True)
    assert [policy.backoff(k, lambda: 0.5) for k in range(3)] == [0.5, 1.0, 1.5]
    assert policy.backoff(2, lambda: 0.0) == 0.0


def test_retry_after_replaces_a_shorter_backoff_and_ends_retries_when_too_long() -> None:
    policy = RetryPolicy(max_retries=2, base_delay_s=0.25, jitter=False, max_retry_after_s=10.0)
    assert policy.delay(0, retry_after=3.0) == 3.0
    assert policy.delay(1, retry_after=0.1) == 0.5  # the backoff is longer
    assert policy.delay(0, retry_after=11.0) is None
    assert policy.delay(2, retry_after=1.0) is None  # no retries left


def test_parse_retry_after_seconds_and_http_date() -> None:
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(" 1.5 ") == 1.5
    assert parse_retry_after("-3") == 0.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    date = email.utils.formatdate(1_000_030.0, usegmt=True)
    assert parse_retry_after(date, now=1_000_000.0) == 30.0


def test_policy_rejects_negative_settings() -> None:
    with pytest.raises(ValueError, match="max_retries"):
        RetryPolicy(max_retries=-1)


# ---- CircuitBreaker -------------------------------------------------------------------------


def test_breaker_state_transitions() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=3, reset_after_s=30.0, clock=clock)
    assert state(breaker) == "closed"
    breaker.record_failure()
    breaker.record_failure()
    breaker.record_success()  # a success resets the consecutive count
    breaker.record_failure()
    breaker.record_failure()
    assert state(breaker) == "closed"
    assert breaker.allow()
    breaker.record_failure()
    assert state(breaker) == "open"
    assert not breaker.allow()
    assert breaker.retry_in() == 30.0

    clock.now = 29.999
    assert state(breaker) == "open"
    assert not breaker.allow()
    clock.now = 30.0
    assert state(breaker) == "half_open"
    assert breaker.allow()  # the one probe
    assert not breaker.allow()  # nobody else while it is out
    breaker.record_failure()  # probe failed: open again, for another full period
    assert state(breaker) == "open"
    clock.now = 59.0
    assert not breaker.allow()
    clock.now = 60.0
    assert breaker.allow()
    breaker.record_success()
    assert state(breaker) == "closed"
    assert breaker.allow()
    assert breaker.allow()


def test_release_frees_the_half_open_probe() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=1, reset_after_s=5.0, clock=clock)
    breaker.record_failure()
    clock.now = 5.0
    assert breaker.allow()
    breaker.release()  # e.g. the probe got a 400: no verdict on the server
    assert state(breaker) == "half_open"
    assert breaker.allow()


# ---- call_with_retries ----------------------------------------------------------------------


async def test_retries_then_succeeds_with_the_backoff_sequence() -> None:
    fn, calls = scripted([Upstream(), Upstream(), "ok"])
    sleeps = Sleeps()
    policy = RetryPolicy(max_retries=2, base_delay_s=0.25, jitter=False)
    breaker = CircuitBreaker(failure_threshold=5)
    assert await call_with_retries(fn, policy, breaker, sleep=sleeps) == "ok"
    assert len(calls) == 3
    assert sleeps.waits == [0.25, 0.5]
    assert state(breaker) == "closed"
    assert breaker.failures == 0


async def test_gives_up_after_max_retries_with_the_last_error() -> None:
    last = RequestTimeoutError("timed out")
    fn, calls = scripted([Upstream(), Upstream(), last])
    with pytest.raises(RequestTimeoutError) as info:
        await call_with_retries(
            fn, RetryPolicy(max_retries=2, jitter=False), CircuitBreaker(10), sleep=Sleeps()
        )
    assert info.value is last
    assert len(calls) == 3


async def test_retry_after_is_respected() -> None:
    fn, _ = scripted([Upstream(retry_after=2.0), "ok"])
    sleeps = Sleeps()
    policy = RetryPolicy(max_retries=2, base_delay_s=0.25, jitter=False)
    assert await call_with_retries(fn, policy, CircuitBreaker(), sleep=sleeps) == "ok"
    assert sleeps.waits == [2.0]


async def test_a_too_long_retry_after_is_not_waited_for() -> None:
    error = Upstream(retry_after=120.0)
    fn, calls = scripted([error, "ok"])
    sleeps = Sleeps()
    with pytest.raises(Upstream):
        await call_with_retries(fn, RetryPolicy(), CircuitBreaker(), sleep=sleeps)
    assert len(calls) == 1
    assert sleeps.waits == []


async def test_non_retryable_error_is_not_retried_and_not_counted() -> None:
    fn, calls = scripted([InvalidRequestError("bad schema"), "ok"])
    breaker = CircuitBreaker(failure_threshold=1)
    sleeps = Sleeps()
    with pytest.raises(InvalidRequestError):
        await call_with_retries(fn, RetryPolicy(), breaker, sleep=sleeps)
    assert len(calls) == 1
    assert sleeps.waits == []
    assert state(breaker) == "closed"


async def test_custom_classifier_and_plain_exceptions() -> None:
    fn, calls = scripted([ConnectionResetError("reset"), TimeoutError(), ValueError("bug")])
    with pytest.raises(ValueError, match="bug"):
        await call_with_retries(
            fn, RetryPolicy(max_retries=5, jitter=False), CircuitBreaker(), sleep=Sleeps()
        )
    assert len(calls) == 3  # two transient errors retried, the bug raised at once

    fn, calls = scripted([Upstream(), "ok"])
    with pytest.raises(Upstream):
        await call_with_retries(
            fn, RetryPolicy(), CircuitBreaker(), lambda exc: False, sleep=Sleeps()
        )
    assert len(calls) == 1


async def test_open_breaker_fails_fast_and_recovers_after_a_probe() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=3, reset_after_s=30.0, clock=clock)
    policy = RetryPolicy(max_retries=2, base_delay_s=0.25, jitter=False)
    fn, calls = scripted([Upstream(), Upstream(), Upstream()])
    with pytest.raises(Upstream):
        await call_with_retries(fn, policy, breaker, name="llm", sleep=Sleeps(clock))
    assert len(calls) == 3
    assert state(breaker) == "open"

    fn, calls = scripted(["never"])
    with pytest.raises(OverloadedError, match="circuit open for backend llm"):
        await call_with_retries(fn, policy, breaker, name="llm", sleep=Sleeps(clock))
    assert calls == []

    clock.now += 30.0
    fn, calls = scripted(["ok"])
    assert await call_with_retries(fn, policy, breaker, sleep=Sleeps(clock)) == "ok"
    assert state(breaker) == "closed"


async def test_breaker_opening_mid_call_stops_the_retries() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=2, reset_after_s=30.0, clock=clock)
    first = Upstream("first")
    fn, calls = scripted([first, Upstream("second"), "ok"])
    with pytest.raises(OverloadedError, match="circuit open") as info:
        await call_with_retries(fn, RetryPolicy(max_retries=5), breaker, sleep=Sleeps(clock))
    assert len(calls) == 2
    assert isinstance(info.value.__cause__, SlmgateError)
    assert str(info.value.__cause__) == "second"


async def test_half_open_probe_failure_reopens() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=1, reset_after_s=10.0, clock=clock)
    breaker.record_failure()
    clock.now = 10.0
    fn, calls = scripted([Upstream(), "ok"])
    with pytest.raises(OverloadedError, match="circuit open"):
        await call_with_retries(fn, RetryPolicy(jitter=False), breaker, sleep=Sleeps(clock))
    assert len(calls) == 1  # the probe; its failure reopened the breaker
    assert state(breaker) == "open"
