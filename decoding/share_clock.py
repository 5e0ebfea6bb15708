"""Each request's share of a server's busy time, for pricing a self-hosted server by the hour.

A vLLM server decodes every request it holds in the same passes, so wall time double-bills:
eight requests that each took 10 s on a server that was busy for 10 s used 10 s of it, not 80.
``ShareClock`` books each interval of wall time to the requests in flight during it, split
evenly (processor sharing): a request alone is billed its wall time; eight at once, an eighth of
each second they overlap. The shares of all requests add up to the time the server was busy
with at least one of them.

It only sees the gateway's own requests: traffic other clients send to the same server is not
counted, so a shared server is over-billed (each share assumes the server was the gateway's).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class ShareClock:
    """A virtual clock that advances at ``1 / requests in flight`` per second of wall time;
    a request's share is how far it advanced between its ``begin`` and ``end``."""

    def __init__(self, now: Callable[[], float] = time.monotonic):
        self._now = now
        self._lock = threading.Lock()
        self._in_flight = 0
        self._virtual = 0.0  # seconds of share one request accrued since the clock started
        self._last = now()

    def _advance(self) -> None:
        now = self._now()
        if self._in_flight:
            self._virtual += (now - self._last) / self._in_flight
        self._last = now

    def begin(self) -> float:
        """A request starts; returns the mark that ``end`` takes."""
        with self._lock:
            self._advance()
            self._in_flight += 1
            return self._virtual

    def end(self, mark: float) -> float:
        """The request started at ``mark`` ends; returns its share of busy seconds."""
        with self._lock:
            self._advance()
            self._in_flight = max(0, self._in_flight - 1)
            return self._virtual - mark

    @property
    def in_flight(self) -> int:
        return self._in_flight
