"""Bounded grammar compiles, engine-neutral: a dedicated thread pool, a deadline per compile,
one shared compile per key, and a cache bounded by bytes and entries.

Compiling a grammar is native code that cannot be interrupted, so a request waits for it at
most ``compile_timeout_s`` and then gets a 400; the compile goes on in the background and its
result is cached for the next request with the same schema. A compile that has not started
when its last waiter gives up is cancelled. The pool is separate from asyncio's default
executor, so slow compiles never delay the threads other requests need.
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast

T = TypeVar("T")

MIB = 2**20


@dataclass(frozen=True, slots=True)
class GrammarLimits:
    """Bounds on grammar work for one process (the gateway's ``limits`` fill them in).

    ``compile_timeout_s``: how long a request waits for its grammar
    (``limits.grammar_compile_timeout_s``). ``cache_bytes`` / ``cache_entries``: the compiled
    grammars kept (``limits.grammar_cache_bytes``). ``compile_threads``: the dedicated pool.
    ``max_schema_depth``: JSON nesting of a schema (``limits.max_json_depth``).
    ``max_repeat`` / ``max_min_repeat`` / ``max_forced_chars``: size keywords and forced text
    (see ``schemas.schema_bounds.size_limit_reason`` for the measurements behind them).
    ``recursive_jump_forward_chars``: a recursive schema whose recursive part's shortest value
    is longer than this decodes without jump-forward, since its forced text can repeat once
    per nesting level.
    """

    compile_timeout_s: float = 10.0
    cache_bytes: int = 512 * MIB
    cache_entries: int = 256
    compile_threads: int = 2
    max_schema_depth: int = 64
    max_repeat: int = 100_000
    max_min_repeat: int = 1_000
    max_forced_chars: int = 1_000_000
    recursive_jump_forward_chars: int = 256

    def __post_init__(self) -> None:
        if self.compile_timeout_s <= 0:
            raise ValueError("compile_timeout_s must be > 0")
        if min(self.cache_bytes, self.cache_entries, self.compile_threads) < 1:
            raise ValueError("cache_bytes, cache_entries and compile_threads must be >= 1")
        if min(self.max_schema_depth, self.max_repeat, self.max_min_repeat) < 1:
            raise ValueError("max_schema_depth, max_repeat and max_min_repeat must be >= 1")
        if self.max_forced_chars < 1 or self.recursive_jump_forward_chars < 0:
            raise ValueError("max_forced_chars >= 1, recursive_jump_forward_chars >= 0")


@dataclass(frozen=True, slots=True)
class CacheStats:
    """A snapshot for metrics. ``shared``: requests that joined a compile already running;
    ``timeouts``: requests that gave up waiting; ``inflight``: compiles running or queued."""

    hits: int
    misses: int
    shared: int
    timeouts: int
    entries: int
    bytes: int
    inflight: int


@dataclass(slots=True)
class _Flight(Generic[T]):
    """One compile running or queued, and how many requests wait for it."""

    future: Future[T]
    waiters: int = 0


class CompileCache(Generic[T]):
    """Compiled values by key: cached (LRU, bounded by bytes and entries), or compiled once on
    the pool however many requests ask at the same time.

    ``get(key, prepare, on_timeout)``: on a miss, ``prepare()`` runs on the caller's thread
    (quick checks that should fail fast, whatever the pool is doing) and returns the slow
    ``build`` that runs on the pool. ``size_of`` gives a value's bytes for the bound; a value
    larger than the whole budget is returned but not kept.
    """

    def __init__(self, limits: GrammarLimits, size_of: Callable[[T], int],
                 name: str = "grammar-compile"):  # fmt: skip
        self.limits = limits
        self._size_of = size_of
        self._pool = ThreadPoolExecutor(limits.compile_threads, thread_name_prefix=name)
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, tuple[T, int]] = OrderedDict()
        self._inflight: dict[str, _Flight[T]] = {}
        self._bytes = 0
        self._hits = self._misses = self._shared = self._timeouts = 0

    # ---- public API ---------------------------------------------------------------------------

    def get(self, key: str, prepare: Callable[[], Callable[[], T]],
            on_timeout: Callable[[], BaseException]) -> T:  # fmt: skip
        """The value for ``key``, waiting at most ``compile_timeout_s`` for its compile."""
        found = self._join(key, prepare)
        if not isinstance(found, _Flight):
            return found
        try:
            return found.future.result(timeout=self.limits.compile_timeout_s)
        except FutureTimeout:
            raise self._gave_up(on_timeout) from None
        finally:
            self._leave(key, found)

    async def get_async(self, key: str, prepare: Callable[[], Callable[[], T]],
                        on_timeout: Callable[[], BaseException]) -> T:  # fmt: skip
        """``get`` for the event loop: ``prepare`` runs on a worker thread, and waiting holds
        no thread at all."""
        with self._lock:
            hit = self._lookup(key)
        if hit is not None:
            return hit[0]
        found = await asyncio.to_thread(self._join, key, prepare)
        if not isinstance(found, _Flight):
            return found
        inner = asyncio.wrap_future(found.future)
        # Read the outcome even when this waiter left early, so it is never logged as lost.
        inner.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            return await asyncio.wait_for(asyncio.shield(inner), self.limits.compile_timeout_s)
        except TimeoutError:
            raise self._gave_up(on_timeout) from None
        finally:
            self._leave(key, found)

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(self._hits, self._misses, self._shared, self._timeouts,
                              len(self._entries), self._bytes, len(self._inflight))  # fmt: skip

    def close(self) -> None:
        """Stop taking compiles; queued ones are cancelled, running ones finish."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ---- internals ----------------------------------------------------------------------------

    def _lookup(self, key: str) -> tuple[T] | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        self._hits += 1
        return (entry[0],)

    def _join(self, key: str, prepare: Callable[[], Callable[[], T]]) -> T | _Flight[T]:
        """A cached value, or the flight this caller now waits on (counted as a waiter)."""
        with self._lock:
            found = self._lookup_or_wait(key)
        if found is not None:
            return found[0]
        build = prepare()  # outside the lock: checks may take milliseconds
        with self._lock:
            found = self._lookup_or_wait(key)
            if found is not None:
                return found[0]
            self._misses += 1
            flight = _Flight(self._pool.submit(self._run, key, build), waiters=1)
            self._inflight[key] = flight
            return flight

    def _lookup_or_wait(self, key: str) -> tuple[T | _Flight[T]] | None:
        """Under the lock: a cached value, or a running compile to wait for (one waiter
        more), or None."""
        hit = self._lookup(key)
        if hit is not None:
            return hit
        flight = self._inflight.get(key)
        if flight is None:
            return None
        self._shared += 1
        flight.waiters += 1
        return (flight,)

    def _run(self, key: str, build: Callable[[], T]) -> T:
        """On the pool: compile, then cache the result even if every waiter has gone."""
        try:
            value = build()
        except BaseException:
            with self._lock:
                self._inflight.pop(key, None)
            raise
        size = max(int(self._size_of(value)), 1)
        with self._lock:
            self._inflight.pop(key, None)
            self._store(key, value, size)
        return value

    def _store(self, key: str, value: T, size: int) -> None:
        if size > self.limits.cache_bytes:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= old[1]
        self._entries[key] = (value, size)
        self._bytes += size
        while self._bytes > self.limits.cache_bytes or (
            len(self._entries) > self.limits.cache_entries
        ):
            _, (_, evicted) = self._entries.popitem(last=False)
            self._bytes -= evicted

    def _gave_up(self, on_timeout: Callable[[], BaseException]) -> BaseException:
        with self._lock:
            self._timeouts += 1
        return on_timeout()

    def _leave(self, key: str, flight: _Flight[T]) -> None:
        """One waiter less; a compile nobody waits for that has not started is dropped."""
        with self._lock:
            flight.waiters -= 1
            cancelled = flight.waiters == 0 and flight.future.cancel()
            if cancelled and self._inflight.get(key) is flight:
                del self._inflight[key]


_SHARED: dict[tuple[GrammarLimits, Callable[[Any], int]], CompileCache[Any]] = {}
_SHARED_LOCK = threading.Lock()


def shared_cache(limits: GrammarLimits, size_of: Callable[[T], int]) -> CompileCache[T]:
    """The process's one pool and cache for ``limits`` and values measured by ``size_of``:
    every model's compiler shares its threads and byte budget (keys carry each compiler's
    own prefix)."""
    with _SHARED_LOCK:
        cache = _SHARED.get((limits, size_of))
        if cache is None:
            cache = _SHARED[limits, size_of] = CompileCache(limits, size_of)
        return cast("CompileCache[T]", cache)
