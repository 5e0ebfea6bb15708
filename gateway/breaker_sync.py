"""Circuit breakers shared by replicas: a breaker that opens on one replica is published with the
wall-clock time it closes, and every replica opens its own breaker for the same backend until
then, so a failing upstream is not hammered by each replica in turn (``redis_url``)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping

from decoding.resilience import CircuitBreaker
from gateway.shared_state import SharedState

log = logging.getLogger(__name__)

Breakers = Callable[[], Mapping[str, CircuitBreaker]]


class BreakerSync:
    """``sync_once`` publishes local openings and adopts remote ones; ``run`` repeats it."""

    def __init__(
        self,
        state: SharedState,
        breakers: Breakers,
        interval_s: float = 0.5,
        clock: Callable[[], float] = time.time,
    ):
        self.state = state
        self.breakers = breakers
        self.interval_s = interval_s
        self.clock = clock
        self._published: dict[str, int] = {}  # backend -> opened_here count last published
        self.adopted = 0

    def _key(self, backend: str) -> str:
        return self.state.key("breaker", backend)

    async def sync_once(self) -> None:
        breakers = dict(self.breakers())
        if not breakers:
            return
        now = self.clock()
        for name, breaker in breakers.items():
            opened = breaker.opened_here
            if opened != self._published.get(name, 0) and breaker.state == "open":
                await self.state.set_until(self._key(name), now + breaker.retry_in())
            self._published[name] = opened
        untils = await self.state.get_until([self._key(n) for n in breakers])
        for (name, breaker), until in zip(breakers.items(), untils, strict=True):
            if until is not None and until - now > 0.05 and breaker.state != "open":
                breaker.force_open(until - now)
                self.adopted += 1
                log.warning("backend %s: circuit opened by another replica for %.1f s",
                            name, until - now)  # fmt: skip

    async def run(self) -> None:
        while True:
            try:
                await self.sync_once()
            except Exception:  # never let the loop die; SharedState already degrades
                log.exception("breaker sync failed")
            await asyncio.sleep(self.interval_s)
