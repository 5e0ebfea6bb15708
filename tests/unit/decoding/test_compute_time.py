"""Compute time per choice: the engine's timer counts only the time spent producing events,
and ``collect`` sums it over choices. A fake clock makes every figure exact."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace

import pytest

import decoding.engine as engine
from decoding.backend import FinishEvent, collect
from decoding.types import TokenEvent


def tok(index: int, text: str) -> TokenEvent:
    return TokenEvent(index, ord(text), text, -0.1, 0.1, 1.0, False)


def test_collect_sums_compute_over_choices() -> None:
    events: list[TokenEvent | FinishEvent] = [
        tok(0, "a"), FinishEvent(0, "stop", prompt_tokens=3, compute_s=0.25),
        tok(1, "b"), FinishEvent(1, "length", prompt_tokens=3, compute_s=0.5),
    ]  # fmt: skip
    result = collect(events, "m")
    assert (result.compute_s, result.prompt_tokens, result.completion_tokens) == (0.75, 3, 2)
    assert collect([tok(0, "a"), FinishEvent(0, "stop")], "m").compute_s == 0.0


def test_timed_choice_counts_production_not_the_consumer(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter(range(100))  # every reading one second later
    monkeypatch.setattr(engine, "time", SimpleNamespace(perf_counter=lambda: float(next(clock))))
    closed: list[bool] = []

    def choice() -> Iterator[TokenEvent | FinishEvent]:
        try:
            yield tok(0, "a")
            yield tok(0, "b")
            yield FinishEvent(0, "stop", "", 4)
        finally:
            closed.append(True)

    seen = []
    for event in engine.timed_choice(choice()):
        engine.time.perf_counter()  # type: ignore[attr-defined]  # the consumer's: not counted
        seen.append(event)
    assert seen[:2] == [tok(0, "a"), tok(0, "b")]
    assert seen[2] == FinishEvent(0, "stop", "", 4, compute_s=3.0)  # three next() calls
    assert closed == [True]


def test_timed_choice_closes_the_choice_when_cut_off() -> None:
    closed: list[bool] = []

    def choice() -> Iterator[TokenEvent | FinishEvent]:
        try:
            yield tok(0, "a")
            yield tok(0, "b")
        finally:
            closed.append(True)

    timed = engine.timed_choice(choice())
    assert next(timed) == tok(0, "a")
    timed.close()  # type: ignore[attr-defined]
    assert closed == [True]
