"""The compile pool and cache with a fake compile: sharing, deadlines, background completion,
cancellation, byte and entry bounds. Pure and fast: compiles block on events, never on time."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator

import pytest

from decoding.grammar_compile import CacheStats, CompileCache, GrammarLimits, shared_cache
from schemas.errors import InvalidRequestError, SchemaTooComplexError

WAIT = 10.0  # how long a test waits for a background thread before failing (never reached)


class Timeout(SchemaTooComplexError):
    pass


def too_slow() -> BaseException:
    return Timeout("did not compile in time", param="response_format")


class FakeCompiles:
    """Builds ``value-<key>`` of ``sizes[key]`` bytes; a key in ``gates`` waits for its event."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.threads: list[str] = []
        self.gates: dict[str, threading.Event] = {}
        self.started: dict[str, threading.Event] = {}
        self.sizes: dict[str, int] = {}
        self.prepared_on: list[str] = []

    def prepare(self, key: str) -> Callable[[], Callable[[], str]]:
        def checks() -> Callable[[], str]:
            self.prepared_on.append(threading.current_thread().name)
            return lambda: self.build(key)

        return checks

    def build(self, key: str) -> str:
        self.calls.append(key)
        self.threads.append(threading.current_thread().name)
        self.started.setdefault(key, threading.Event()).set()
        gate = self.gates.get(key)
        if gate is not None:
            assert gate.wait(WAIT)
        if key.startswith("bad"):
            raise InvalidRequestError(f"cannot compile {key}", param="response_format")
        return f"value-{key}"

    def size_of(self, value: str) -> int:
        return self.sizes.get(value.removeprefix("value-"), 10)

    def gate(self, key: str) -> threading.Event:
        self.gates[key] = threading.Event()
        self.started[key] = threading.Event()
        return self.gates[key]


@pytest.fixture
def fake() -> FakeCompiles:
    return FakeCompiles()


@pytest.fixture
def make_cache(fake: FakeCompiles) -> Iterator[Callable[..., CompileCache[str]]]:
    caches: list[CompileCache[str]] = []

    def make(**limits: float) -> CompileCache[str]:
        cache = CompileCache(GrammarLimits(**limits), fake.size_of)  # type: ignore[arg-type]
        caches.append(cache)
        return cache

    yield make
    for gate in fake.gates.values():
        gate.set()
    for cache in caches:
        cache.close()


def get(cache: CompileCache[str], fake: FakeCompiles, key: str) -> str:
    return cache.get(key, fake.prepare(key), too_slow)


def idle(cache: CompileCache[str]) -> CacheStats:
    """Wait until no compile is running or queued (synchronisation, not a timing check)."""
    done = threading.Event()
    for _ in range(int(WAIT / 0.01)):
        stats = cache.stats()
        if stats.inflight == 0:
            return stats
        done.wait(0.01)
    raise AssertionError("compiles still running")


def in_thread(fn: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    out: list[object] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:
            out.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def test_hit_miss_and_bytes(
    make_cache: Callable[..., CompileCache[str]], fake: FakeCompiles
) -> None:
    cache = make_cache()
    fake.sizes["a"] = 123
    assert get(cache, fake, "a") == "value-a"
    assert get(cache, fake, "a") == "value-a"
    assert fake.calls == ["a"]
    assert cache.stats() == CacheStats(hits=1, misses=1, shared=0, timeouts=0, entries=1,
                                       bytes=123, inflight=0)  # fmt: skip


def test_compiles_run_on_the_named_pool_and_checks_on_the_caller(
    make_cache: Callable[..., CompileCache[str]], fake: FakeCompiles
) -> None:
    cache = make_cache()
    get(cache, fake, "a")
    assert fake.threads[0].startswith("grammar-compile")
    assert fake.prepared_on == [threading.current_thread().name]


def test_concurrent_requests_for_one_key_share_one_compile(
    make_cache: Callable[..., CompileCache[str]], fake: FakeCompiles
) -> None:
    cache = make_cache()
    gate = fake.gate("a")
    first, first_out = in_thread(lambda: get(cache, fake, "a"))
    assert fake.started["a"].wait(WAIT)
    second, second_out = in_thread(lambda: get(cache, fake, "a"))
    for _ in range(int(WAIT / 0.01)):  # until the second request has joined the flight
        if cache.stats().shared == 1:
            break
        threading.Event().wait(0.01)
    gate.set()
    first.join(WAIT)
    second.join(WAIT)
    assert first_out == second_out == ["value-a"]
    assert fake.calls == ["a"]
    assert len(fake.prepared_on) == 1  # the joiner did not re-run the checks either
    assert cache.stats() == CacheStats(hits=0, misses=1, shared=1, timeouts=0, entries=1,
                                       bytes=10, inflight=0)  # fmt: skip


def test_deadline_gives_the_waiter_a_400_and_the_compile_finishes_in_the_background(
    make_cache: Callable[..., CompileCache[str]], fake: FakeCompiles
) -> None:
    cache = make_cache(compile_timeout_s=0.05)
    gate = fake.gate("slow")
    with pytest.raises(Timeout) as info:
        get(cache, fake, "slow")
    assert info.value.param == "response_format"
    assert cache.stats().timeouts == 1
    gate.set()  # the native compile cannot be interrupted; it finishes and is cached
    assert idle(cache).entries == 1
    assert get(cache, fake, "slow") == "value-slow"
    assert fake.calls == ["slow"]


def test_a_queued_compile_nobody_waits_for_is_cancelled(
    make_cache: Callable[..., CompileCache[str]], fake: FakeCompiles
) -> None:
    cache = make_cache(compile_timeout_s=0.05, compile_threads=1)
    gate = fake.gate("running")
    with pytest.raises(Timeout):
        get(cache, fake, "running")  # holds the only thread
    with pytest.raises(Timeout):
        get(cache, fake, "queued")  # never started: dropped when its waiter gave up
    assert cache.stats().inflight == 1
    gate.set()
    stats = idle(cache)
    assert fake.calls == ["running"]
    assert (stats.entries, stats.timeouts, stats.misses) == (1, 2, 2)
    assert get(cache, fake, "queued") == "value-queued"  # a later request compiles it anew


def test_a_slow_compile_does_not_block_another_key(
    make_cache: Callable[..., CompileCache[str]], fake: FakeCompiles
) -> None:
    cache = make_cache(compile_threads=2)
    gate = fake.gate("huge-enum")
    slow, slow_out = in_thread(lambda: get(cache, fake, "huge-enum"))
    assert fake.started["huge-enum"].wait(WAIT)
    assert get(cache, fake, "small") == "value-small"  # done while the other still runs
    assert slow_out == []
    gate.set()
    slow.join(WAIT)
    assert slow_out == ["value-huge-enum"]


def test_errors_reach_every_waiter_and_are_not_cached(
    make_cache: Callable[..., CompileCache[str]], fake: FakeCompiles
) -> None:
    cache = make_cache()
    for _ in range(2):
        with pytest.raises(InvalidRequestError, match="cannot compile bad"):
            get(cache, fake, "bad")
    assert fake.calls == ["bad", "bad"]
    assert cache.stats().entries == 0


def test_a_failing_check_raises_on_the_caller_without_a_compile(
    make_cache: Callable[..., CompileCache[str]], fake: FakeCompiles
) -> None:
    cache = make_cache()

    def reject() -> Callable[[], str]:
        raise InvalidRequestError("unsatisfiable", param="tools.0.function.parameters")

    with pytest.raises(InvalidRequestError) as info:
        cache.get("x", reject, too_slow)
    assert info.value.param == "tools.0.function.parameters"
    assert cache.stats() == CacheStats(0, 0, 0, 0, 0, 0, 0)


def test_cache_is_bounded_by_bytes(
    make_cache: Callable[..., CompileCache[str]], fake: FakeCompiles
) -> None:
    cache = make_cache(cache_bytes=100)
    fake.sizes.update({"a": 60, "b": 50, "c": 30, "huge": 101})
    get(cache, fake, "a")
    get(cache, fake, "b")  # 110 bytes: evicts a
    assert (cache.stats().entries, cache.stats().bytes) == (1, 50)
    get(cache, fake, "c")
    assert (cache.stats().entries, cache.stats().bytes) == (2, 80)
    assert get(cache, fake, "huge") == "value-huge"  # returned, but bigger than the budget
    assert (cache.stats().entries, cache.stats().bytes) == (2, 80)
    get(cache, fake, "a")
    assert fake.calls == ["a", "b", "c", "huge", "a"]


def test_cache_is_bounded_by_entries_lru(
    make_cache: Callable[..., CompileCache[str]], fake: FakeCompiles
) -> None:
    cache = make_cache(cache_entries=2)
    for key in ("a", "b", "a", "c", "a", "b"):  # c evicts b (a was used last), b evicts c
        get(cache, fake, key)
    assert fake.calls == ["a", "b", "c", "b"]
    assert cache.stats().entries == 2


async def test_async_wait_holds_no_thread_and_shares_with_sync_callers(
    make_cache: Callable[..., CompileCache[str]], fake: FakeCompiles
) -> None:
    cache = make_cache(compile_timeout_s=0.05)
    gate = fake.gate("a")
    with pytest.raises(Timeout):
        await cache.get_async("a", fake.prepare("a"), too_slow)
    gate.set()
    assert idle(cache).entries == 1
    assert await cache.get_async("a", fake.prepare("a"), too_slow) == "value-a"
    assert get(cache, fake, "a") == "value-a"
    assert fake.calls == ["a"]
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.timeouts) == (2, 1, 1)


async def test_async_concurrent_waiters_share_one_compile(
    make_cache: Callable[..., CompileCache[str]], fake: FakeCompiles
) -> None:
    cache = make_cache()
    gate = fake.gate("a")
    waiters = [asyncio.ensure_future(cache.get_async("a", fake.prepare("a"), too_slow))
               for _ in range(3)]  # fmt: skip
    await asyncio.to_thread(fake.started["a"].wait, WAIT)
    gate.set()
    assert await asyncio.gather(*waiters) == ["value-a"] * 3
    assert fake.calls == ["a"]


def test_limits_are_checked_and_shared_caches_are_per_limits() -> None:
    with pytest.raises(ValueError, match="compile_timeout_s"):
        GrammarLimits(compile_timeout_s=0)
    with pytest.raises(ValueError, match="cache_bytes"):
        GrammarLimits(cache_bytes=0)
    limits = GrammarLimits(compile_timeout_s=3.5)
    assert shared_cache(limits, len) is shared_cache(GrammarLimits(compile_timeout_s=3.5), len)
    assert shared_cache(limits, len) is not shared_cache(GrammarLimits(compile_timeout_s=4), len)
    assert shared_cache(limits, len) is not shared_cache(limits, hash)  # another value type
