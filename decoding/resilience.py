"""Retries with backoff and a circuit breaker for remote backends (pure: no HTTP here).

A remote tier fails in two ways that need different answers: the server is briefly unwell
(429, 5xx, a dropped connection, a timeout) — retry after a pause, and stop sending to it for a
while when it keeps failing — or the request itself is wrong (a 4xx other than 429) — never
retry, and never hold it against the server. ``call_with_retries`` applies that rule; the
backends only say which of their errors are retryable.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, TypeVar

from schemas.errors import OverloadedError, SlmgateError

T = TypeVar("T")
BreakerState = Literal["closed", "open", "half_open"]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with full jitter (AWS's "full jitter": uniform in [0, backoff]).

    Retry ``k`` (0-based) waits ``min(max_delay_s, base_delay_s * 2**k)``, drawn uniformly
    below that when ``jitter``. A server's ``Retry-After`` replaces the computed delay when it
    is longer; one longer than ``max_retry_after_s`` ends the retries at once (the caller — the
    router — can use another tier instead of waiting that long inside one request).
    """

    max_retries: int = 2
    base_delay_s: float = 0.25
    max_delay_s: float = 4.0
    jitter: bool = True
    max_retry_after_s: float = 30.0

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        if self.base_delay_s < 0 or self.max_delay_s < 0 or self.max_retry_after_s < 0:
            raise ValueError("delays must be >= 0")

    def backoff(self, retry: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait before retry number ``retry`` (0-based), Retry-After aside."""
        ceiling = min(self.max_delay_s, self.base_delay_s * (2.0**retry))
        return ceiling * rand() if self.jitter else ceiling

    def delay(
        self,
        retry: int,
        retry_after: float | None = None,
        rand: Callable[[], float] = random.random,
    ) -> float | None:
        """Seconds to wait before retry ``retry``, or None when the retry should not happen."""
        if retry >= self.max_retries:
            return None
        wait = self.backoff(retry, rand)
        if retry_after is not None:
            if retry_after > self.max_retry_after_s:
                return None
            wait = max(wait, retry_after)
        return wait


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header: delta-seconds or an HTTP date (RFC 9110)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)


class CircuitBreaker:
    """Stops calls to a backend that keeps failing, then lets one probe through.

    ``closed``: calls pass; ``failure_threshold`` consecutive failures open it. ``open``: calls
    are refused until ``reset_after_s`` have passed, then it is ``half_open``. ``half_open``:
    exactly one probe call is allowed; its success closes the breaker, its failure reopens it
    for another ``reset_after_s``. A call that says nothing about the backend's health (a
    caller error, a cancellation) ends with ``release()``, which frees the probe slot.
    """

    def __init__(
        self,
        failure_threshold: int = 5,
        reset_after_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be >= 1")
        if reset_after_s < 0:
            raise ValueError("reset_after_s must be >= 0")
        self.failure_threshold = failure_threshold
        self.reset_after_s = reset_after_s
        self.clock = clock
        self.failures = 0  # consecutive, while closed
        self._state: BreakerState = "closed"
        self._opened_at = 0.0
        self._probe_out = False
        self.opened_here = 0  # times this breaker opened on its own failures (not adopted)

    @property
    def state(self) -> BreakerState:
        if self._state == "open" and self.clock() - self._opened_at >= self.reset_after_s:
            self._state = "half_open"
            self._probe_out = False
        return self._state

    def retry_in(self) -> float:
        """Seconds until an open breaker lets a probe through (0 unless open)."""
        if self.state != "open":
            return 0.0
        return max(0.0, self.reset_after_s - (self.clock() - self._opened_at))

    def allow(self) -> bool:
        """Whether a call may go out now; in half-open state this takes the one probe slot."""
        state = self.state
        if state == "closed":
            return True
        if state == "half_open" and not self._probe_out:
            self._probe_out = True
            return True
        return False

    def record_success(self) -> None:
        self._state = "closed"
        self.failures = 0
        self._probe_out = False

    def record_failure(self) -> None:
        state = self.state
        if state == "half_open":
            self._open()
            return
        if state == "open":
            return
        self.failures += 1
        if self.failures >= self.failure_threshold:
            self._open()

    def release(self) -> None:
        """End a call without a verdict on the backend's health (frees a half-open probe)."""
        self._probe_out = False

    def force_open(self, seconds: float) -> None:
        """Open for ``seconds`` because another replica's breaker for the same backend opened
        (``gateway.breaker_sync``); then half-open as usual."""
        self._state = "open"
        self._opened_at = self.clock() - max(0.0, self.reset_after_s - seconds)
        self._probe_out = False
        self.failures = 0

    def _open(self) -> None:
        self._state = "open"
        self._opened_at = self.clock()
        self._probe_out = False
        self.failures = 0
        self.opened_here += 1


def default_is_retryable(exc: BaseException) -> bool:
    """slmgate errors say so themselves; bare timeouts and connection errors are transient."""
    if isinstance(exc, SlmgateError):
        return exc.retryable
    return isinstance(exc, TimeoutError | ConnectionError)


def default_retry_after(exc: BaseException) -> float | None:
    """The server's Retry-After, when the error carries one (``exc.retry_after`` seconds)."""
    value = getattr(exc, "retry_after", None)
    return float(value) if isinstance(value, int | float) else None


async def call_with_retries(
    fn: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    breaker: CircuitBreaker,
    is_retryable: Callable[[BaseException], bool] = default_is_retryable,
    *,
    name: str = "backend",
    retry_after: Callable[[BaseException], float | None] = default_retry_after,
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    rand: Callable[[], float] = random.random,
) -> T:
    """Run ``fn`` until it succeeds, a non-retryable error, or the retries run out.

    Each retryable failure counts against ``breaker``; a non-retryable one is raised at once
    and does not count. When the breaker refuses a call, a 503 ``OverloadedError`` (code
    ``circuit_open``, Retry-After = the time to the next probe) is raised without calling ``fn``
    (chained to the last failure, if any): the backend is unavailable, not broken. The last
    retryable error is raised as it is when the retries run out, so the caller sees e.g.
    ``RequestTimeoutError``.
    """
    retry = 0
    last: BaseException | None = None
    while True:
        if not breaker.allow():
            probe_in = breaker.retry_in()
            raise OverloadedError(
                f"circuit open for backend {name}: too many recent failures; "
                f"next probe in {probe_in:.1f} s",
                code="circuit_open",
                retry_after=max(1.0, probe_in),
            ) from last
        try:
            result = await fn()
        except BaseException as exc:
            if not isinstance(exc, Exception) or not is_retryable(exc):
                breaker.release()
                raise
            breaker.record_failure()
            last = exc
            wait = policy.delay(retry, retry_after(exc), rand)
            if wait is None:
                raise
            await sleep(wait)
            retry += 1
            continue
        breaker.record_success()
        return result
