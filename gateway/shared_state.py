"""Counters and breaker state that several gateway replicas share through Redis, or keep in this
process when no ``redis_url`` is configured.

Redis being down never fails a request: each operation falls back to this process's own
counters, the fallback is counted (``health``, ``/metrics``) and Redis is not tried again for
``retry_after_s``, so an outage costs one timeout, not one per request. Counters are fixed
windows (a key per minute, day or month, expiring after it), which is exact across replicas:
an increment is atomic on the server.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

log = logging.getLogger(__name__)


class Counters(Protocol):
    """Where the numbers live: this process, or Redis."""

    async def read_and_add(
        self, reads: Sequence[str], add: tuple[str, float] | None, ttl_s: int
    ) -> tuple[list[float], float | None]: ...

    async def add_many(self, adds: Sequence[tuple[str, float, int]]) -> None: ...

    async def seed(self, key: str, value: float, ttl_s: int) -> None: ...

    async def set_until(self, key: str, until: float) -> None: ...

    async def get_until(self, keys: Sequence[str]) -> list[float | None]: ...


class LocalCounters:
    """In-process counters with expiry; the default, and what an outage falls back to."""

    def __init__(self, clock: Callable[[], float] = time.time, max_keys: int = 100_000):
        self.clock = clock
        self.max_keys = max_keys
        self._values: dict[str, tuple[float, float]] = {}  # key -> (value, expires at)

    def _get(self, key: str) -> float | None:
        entry = self._values.get(key)
        if entry is None or entry[1] <= self.clock():
            return None
        return entry[0]

    def _put(self, key: str, value: float, ttl_s: float) -> None:
        if len(self._values) >= self.max_keys:  # bounded: expired windows go first, then
            now = self.clock()  # the half that ends soonest
            live = sorted(((v[1], k) for k, v in self._values.items() if v[1] > now), reverse=True)
            keep = live[: self.max_keys // 2] if len(live) >= self.max_keys else live
            self._values = {k: self._values[k] for _, k in keep}
        self._values[key] = (value, self.clock() + ttl_s)

    def _add(self, key: str, amount: float, ttl_s: int) -> float:
        entry = self._values.get(key)
        if entry is None or entry[1] <= self.clock():  # a new window starts its own expiry
            self._put(key, amount, ttl_s)
            return amount
        self._values[key] = (entry[0] + amount, entry[1])
        return entry[0] + amount

    async def read_and_add(
        self, reads: Sequence[str], add: tuple[str, float] | None, ttl_s: int
    ) -> tuple[list[float], float | None]:
        values = [self._get(k) or 0.0 for k in reads]
        return values, None if add is None else self._add(add[0], add[1], ttl_s)

    async def add_many(self, adds: Sequence[tuple[str, float, int]]) -> None:
        for key, amount, ttl_s in adds:
            self._add(key, amount, ttl_s)

    async def seed(self, key: str, value: float, ttl_s: int) -> None:
        if self._get(key) is None:
            self._put(key, value, ttl_s)

    async def set_until(self, key: str, until: float) -> None:
        self._put(key, until, max(0.0, until - self.clock()))

    async def get_until(self, keys: Sequence[str]) -> list[float | None]:
        return [self._get(k) for k in keys]


class RedisCounters:
    """The same counters in Redis (``redis.asyncio``); one round trip per call."""

    def __init__(self, url: str, timeout_s: float = 0.5):
        import redis.asyncio as aioredis

        self.client: Any = aioredis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
            health_check_interval=30, decode_responses=True,
        )  # fmt: skip

    async def read_and_add(
        self, reads: Sequence[str], add: tuple[str, float] | None, ttl_s: int
    ) -> tuple[list[float], float | None]:
        pipe = self.client.pipeline(transaction=False)
        if reads:
            pipe.mget(list(reads))
        if add is not None:
            pipe.incrbyfloat(add[0], add[1])
            pipe.expire(add[0], ttl_s)  # window keys: a refreshed ttl is harmless (no NX: Redis 6)
        out = await pipe.execute()
        values = [0.0 if v is None else float(v) for v in out[0]] if reads else []
        added = None if add is None else float(out[1 if reads else 0])
        return values, added

    async def add_many(self, adds: Sequence[tuple[str, float, int]]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for key, amount, ttl_s in adds:
            pipe.incrbyfloat(key, amount)
            pipe.expire(key, ttl_s)
        await pipe.execute()

    async def seed(self, key: str, value: float, ttl_s: int) -> None:
        await self.client.set(key, repr(float(value)), ex=ttl_s, nx=True)

    async def set_until(self, key: str, until: float) -> None:
        ms = int((until - time.time()) * 1000)
        if ms > 0:
            await self.client.set(key, repr(until), px=ms)

    async def get_until(self, keys: Sequence[str]) -> list[float | None]:
        if not keys:
            return []
        return [None if v is None else float(v) for v in await self.client.mget(list(keys))]

    async def aclose(self) -> None:
        await self.client.aclose()


@dataclass(slots=True)
class SharedHealth:
    configured: bool  # a redis_url is set
    up: bool  # the last Redis operation worked
    fallbacks: int = 0  # operations served from local state because Redis failed or was down
    last_error: str | None = None


class SharedState:
    """Every counter operation goes to Redis when configured and up, else to local counters.
    Keys are namespaced by ``prefix``, so several deployments can share one Redis."""

    def __init__(
        self,
        redis: Counters | None,
        prefix: str = "slmgate",
        *,
        retry_after_s: float = 5.0,
        on_fallback: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.redis = redis
        self.local = LocalCounters()
        self.prefix = prefix
        self.retry_after_s = retry_after_s
        self.on_fallback = on_fallback
        self.clock = clock
        self.health = SharedHealth(configured=redis is not None, up=redis is not None)
        self._down_until = 0.0

    @classmethod
    def from_url(
        cls,
        url: str | None,
        prefix: str = "slmgate",
        on_fallback: Callable[[str], None] | None = None,
    ) -> SharedState:
        return cls(None if url is None else RedisCounters(url), prefix, on_fallback=on_fallback)

    def key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    async def _call(self, op: str, *args: Any) -> Any:
        if self.redis is not None:
            if self.clock() >= self._down_until:
                try:
                    result = await getattr(self.redis, op)(*args)
                except Exception as exc:  # redis errors, OSError, timeouts: degrade, never fail
                    self._fell_back(op, exc)
                else:
                    if not self.health.up:
                        log.warning("shared state: Redis is reachable again")
                    self.health.up = True
                    return result
            else:
                self._fell_back(op, None)
        return await getattr(self.local, op)(*args)

    def _fell_back(self, op: str, exc: BaseException | None) -> None:
        self.health.fallbacks += 1
        if exc is not None:
            if self.health.up:
                log.warning("shared state: Redis failed (%s: %s); this replica uses its own "
                            "state, retrying in %.0f s", type(exc).__name__, exc,
                            self.retry_after_s)  # fmt: skip
            self.health.up = False
            self.health.last_error = f"{type(exc).__name__}: {exc}"
            self._down_until = self.clock() + self.retry_after_s
        if self.on_fallback is not None:
            self.on_fallback(op)

    async def read_and_add(
        self, reads: Sequence[str], add: tuple[str, float] | None, ttl_s: int
    ) -> tuple[list[float], float | None]:
        """The current values of ``reads`` and, in the same round trip, ``add`` applied to
        one counter (its new value); a counter expires ``ttl_s`` after it was last added to (at
        the latest: window keys carry their window in their name)."""
        result: tuple[list[float], float | None] = await self._call(
            "read_and_add", reads, add, ttl_s
        )
        return result

    async def add_many(self, adds: Sequence[tuple[str, float, int]]) -> None:
        """Add to several counters, each with its own ttl (seconds)."""
        if adds:
            await self._call("add_many", adds)

    async def seed(self, key: str, value: float, ttl_s: int) -> None:
        """Set ``key`` to ``value`` unless it exists (another replica seeded it first)."""
        await self._call("seed", key, value, ttl_s)

    async def set_until(self, key: str, until: float) -> None:
        """Store a wall-clock deadline that disappears when it passes."""
        await self._call("set_until", key, until)

    async def get_until(self, keys: Sequence[str]) -> list[float | None]:
        result: list[float | None] = await self._call("get_until", keys)
        return result

    async def aclose(self) -> None:
        close = getattr(self.redis, "aclose", None)
        if close is not None:
            try:
                await close()
            except Exception:
                log.debug("closing the Redis client failed", exc_info=True)
