"""A fake OpenAI-compatible upstream (``benchmarks.soak_upstream``) on its own thread and event
loop, answering at once, that a test can switch to failing (HTTP 500) and back."""

from __future__ import annotations

import asyncio
import threading
from types import TracebackType

from benchmarks.soak_plan import FaultWindow
from benchmarks.soak_upstream import FakeUpstream


class ThreadedUpstream:
    """``with ThreadedUpstream() as up:`` → ``up.base_url``; ``up.failing = True`` → 500s."""

    def __init__(self) -> None:
        self.failing = False
        self._loop = asyncio.new_event_loop()
        # progress 0.5 is inside the 500-fault window, 2.0 outside it (healthy)
        self.upstream = FakeUpstream(FaultWindow(0.0, 1.0, "500"), latency_s=0.0,
                                     progress=lambda: 0.5 if self.failing else 2.0)  # fmt: skip
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.upstream.port}/v1"

    @property
    def served(self) -> int:
        return self.upstream.counts["served"] + self.upstream.counts["http_500"]

    def __enter__(self) -> ThreadedUpstream:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.upstream.start(), self._loop).result(10)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        asyncio.run_coroutine_threadsafe(self.upstream.close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()
