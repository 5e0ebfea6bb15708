"""Per-key limits, shared state and shared breakers as pure logic: fixed windows, budgets that
survive restarts, Redis outages that degrade to local state, breakers adopted across replicas."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from decoding.resilience import CircuitBreaker
from gateway.breaker_sync import BreakerSync
from gateway.quota import QuotaGate, day_window, minute_window, month_window
from gateway.shared_state import LocalCounters, SharedState
from router.ledger.key_store import ApiKey, KeyLimits
from schemas.errors import InsufficientQuotaError, PermissionDeniedError, RateLimitError


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def utc(*args: int) -> float:
    return datetime(*args, tzinfo=UTC).timestamp()  # type: ignore[misc]


def key(**limits: object) -> ApiKey:
    return ApiKey("key-1", "agent", "sk-slmgate-abcd", 0.0, None, KeyLimits(**limits))  # type: ignore[arg-type]


def gate(clock: Clock, spent: float = 0.0) -> QuotaGate:
    state = SharedState(None)
    state.local = LocalCounters(clock)
    return QuotaGate(state, spend_since=lambda key_id, since: spent, clock=clock)


def test_windows_are_utc_minutes_days_and_calendar_months() -> None:
    now = utc(2026, 2, 28, 23, 59, 30)
    assert (minute_window(now).start, minute_window(now).end) == (now - 30, now + 30)
    assert day_window(now).end == utc(2026, 3, 1)
    assert day_window(now).name == "d20260228"
    assert month_window(now).start == utc(2026, 2, 1)
    assert month_window(now).end == utc(2026, 3, 1)
    assert month_window(utc(2026, 12, 31, 12)).end == utc(2027, 1, 1)


async def test_the_request_past_rpm_is_refused_until_the_next_minute() -> None:
    clock = Clock(utc(2026, 12, 2, 8, 0, 10))
    quotas, agent = gate(clock), key(rpm=3)
    for _ in range(3):
        await quotas.admit(agent, "auto")
    with pytest.raises(RateLimitError) as refused:
        await quotas.admit(agent, "auto")
    assert refused.value.code == "requests_per_minute_exceeded"
    assert refused.value.retry_after == pytest.approx(50.0)
    clock.now += 50  # the next minute
    await quotas.admit(agent, "auto")


async def test_tokens_per_minute_count_what_finished_requests_used() -> None:
    clock = Clock(utc(2026, 12, 2, 8, 0, 0))
    quotas, agent = gate(clock), key(tpm=100)
    await quotas.admit(agent, "auto")
    await quotas.settle(agent, tokens=60, cost_usd=0.0)
    await quotas.admit(agent, "auto")  # 60 < 100
    await quotas.settle(agent, tokens=60, cost_usd=0.0)
    with pytest.raises(RateLimitError) as refused:
        await quotas.admit(agent, "auto")
    assert refused.value.code == "tokens_per_minute_exceeded"


async def test_a_spent_budget_is_insufficient_quota_until_its_window_resets() -> None:
    clock = Clock(utc(2026, 12, 2, 18, 0, 0))
    quotas, agent = gate(clock), key(budget_daily_usd=0.01)
    await quotas.admit(agent, "auto")
    await quotas.settle(agent, tokens=10, cost_usd=0.004)
    await quotas.admit(agent, "auto")
    await quotas.settle(agent, tokens=10, cost_usd=0.007)  # 0.011 >= 0.01
    with pytest.raises(InsufficientQuotaError) as refused:
        await quotas.admit(agent, "auto")
    error = refused.value
    assert (error.status, error.type) == (429, "insufficient_quota")
    assert error.code == "insufficient_quota"
    assert "daily budget" in error.message
    assert "2026-12-03 00:00 UTC" in error.message
    assert error.retry_after == pytest.approx(6 * 3600)
    clock.now = utc(2026, 12, 3, 0, 0, 1)
    await quotas.admit(agent, "auto")


async def test_budgets_start_from_the_ledgers_spend_so_a_restart_does_not_reset_them() -> None:
    clock = Clock(utc(2026, 12, 2, 12))
    quotas = gate(clock, spent=5.0)  # what the ledger holds for this key this month
    with pytest.raises(InsufficientQuotaError, match="monthly budget"):
        await quotas.admit(key(budget_monthly_usd=5.0), "auto")


async def test_a_key_limited_to_some_models_is_refused_others() -> None:
    quotas = gate(Clock(0.0))
    await quotas.admit(key(models=("auto",)), "auto")
    with pytest.raises(PermissionDeniedError) as refused:
        await quotas.admit(key(models=("auto",)), "llm")
    assert refused.value.status == 403
    assert refused.value.param == "model"


class Broken:
    """A Redis that is down: every call raises, and is counted."""

    def __init__(self) -> None:
        self.calls = 0

    async def _fail(self, *args: object) -> None:
        self.calls += 1
        raise ConnectionError("connection refused")

    read_and_add = add_many = seed = set_until = get_until = _fail


async def test_redis_down_degrades_to_local_state_counted_and_retried_later() -> None:
    clock, fallbacks = Clock(100.0), []
    redis = Broken()
    state = SharedState(redis, retry_after_s=5.0, on_fallback=fallbacks.append, clock=clock)
    quotas = QuotaGate(state, clock=lambda: utc(2026, 12, 2, 8, 0, 0))
    agent = key(rpm=2)
    await quotas.admit(agent, "auto")  # Redis fails: counted locally, never an error
    await quotas.admit(agent, "auto")
    with pytest.raises(RateLimitError):  # the local count still limits this replica
        await quotas.admit(agent, "auto")
    assert redis.calls == 1  # not retried while it is known down
    assert state.health.up is False
    assert state.health.fallbacks == 3
    assert state.health.last_error == "ConnectionError: connection refused"
    assert fallbacks == ["read_and_add"] * 3
    clock.now += 5.0
    await state.seed("x", 1.0, 60)
    assert redis.calls == 2  # tried again after retry_after_s


async def test_a_breaker_opened_on_one_replica_opens_on_the_others() -> None:
    wall = Clock(1000.0)
    redis = LocalCounters(wall)  # stands in for the one Redis both replicas share
    mono_a, mono_b = Clock(50.0), Clock(7.0)
    a = CircuitBreaker(failure_threshold=2, reset_after_s=30.0, clock=mono_a)
    b = CircuitBreaker(failure_threshold=2, reset_after_s=30.0, clock=mono_b)
    sync_a = BreakerSync(SharedState(redis), lambda: {"up": a}, clock=wall)
    sync_b = BreakerSync(SharedState(redis), lambda: {"up": b}, clock=wall)
    a.record_failure()
    a.record_failure()
    assert a.state == "open"
    assert b.state == "closed"
    mono_a.now += 10.0
    wall.now += 10.0
    await sync_a.sync_once()  # publishes: open until wall 1030
    await sync_b.sync_once()  # adopts the remaining 20 s
    assert b.state == "open"
    assert b.retry_in() == pytest.approx(20.0)
    assert b.opened_here == 0
    assert sync_b.adopted == 1
    await sync_b.sync_once()  # adopted, not republished, not adopted twice
    assert sync_b.adopted == 1
    mono_b.now += 20.0
    assert b.state == "half_open"
    assert b.allow()


async def test_local_counters_expire_and_stay_bounded() -> None:
    clock = Clock(0.0)
    local = LocalCounters(clock, max_keys=3)
    values, added = await local.read_and_add([], ("a", 1.0), 10)
    assert (values, added) == ([], 1.0)
    await local.add_many([("a", 2.0, 10), ("b", 1.0, 1)])
    assert (await local.read_and_add(["a", "b"], None, 10))[0] == [3.0, 1.0]
    clock.now = 5.0
    assert (await local.read_and_add(["a", "b"], None, 10))[0] == [3.0, 0.0]
    for name in "cdef":
        await local.seed(name, 1.0, 100)
    assert len(local._values) <= 3
    assert (await local.read_and_add(["f"], None, 10))[0] == [1.0]  # the newest stays


async def test_redis_counters_on_the_machines_redis() -> None:
    """The Redis implementation behaves as the local one: windows add up, seeds do not
    overwrite, deadlines expire."""
    import time
    import uuid

    from gateway.shared_state import RedisCounters
    from tests import postgres

    redis = RedisCounters("redis://127.0.0.1:6379/0")
    prefix = f"slmgate-test-{uuid.uuid4().hex[:8]}"
    try:
        await redis.client.ping()
    except Exception as exc:
        await redis.aclose()
        postgres.service_missing(f"Redis at 127.0.0.1:6379 is unreachable: {exc}")
    try:
        a, b = f"{prefix}:a", f"{prefix}:b"
        assert await redis.read_and_add([a], (b, 1.0), 60) == ([0.0], 1.0)
        assert await redis.read_and_add([], (b, 1.5), 60) == ([], 2.5)
        await redis.seed(a, 4.0, 60)
        await redis.seed(a, 9.0, 60)  # another replica seeded first: kept
        await redis.add_many([(a, 0.5, 60), (b, 1.0, 60)])
        assert (await redis.read_and_add([a, b], None, 60))[0] == [4.5, 3.5]
        assert 0 < await redis.client.ttl(a) <= 60
        until = time.time() + 0.3
        await redis.set_until(f"{prefix}:u", until)
        assert await redis.get_until([f"{prefix}:u", f"{prefix}:none"]) == [until, None]
        await asyncio.sleep(0.4)
        assert await redis.get_until([f"{prefix}:u"]) == [None]
    finally:
        for name in await redis.client.keys(f"{prefix}:*"):
            await redis.client.delete(name)
        await redis.aclose()
