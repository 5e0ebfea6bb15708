"""The one tier loop: ``complete`` and ``stream`` take the same decisions, and every attempt is
booked with what it consumed however it ends (cancelled task, closed stream, deadline). A
scripted backend injects confidence, failures and stalls; no model runs here."""

from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

import pytest

from decoding.backend import BackendInfo, FinishEvent
from decoding.constraint import JsonSchema, NoConstraint
from decoding.types import GenerationRequest, SamplingParams, TokenEvent
from router.answer import Answer, booked_attempt
from router.confidence import EarlyFallback
from router.energy import EnergyMeter
from router.records import AttemptRecord
from router.router import Route, Router, Trace, request_record
from router.tier_loop import after_error, after_finish, commit_window
from schemas.errors import (
    GenerationCancelled,
    OverloadedError,
    RequestTimeoutError,
    UpstreamError,
)

Mode = Literal["complete", "stream"]
MODES: tuple[Mode, ...] = ("complete", "stream")


@dataclass(frozen=True)
class Prepared:
    prompt_ids: list[int]


class Tier:
    """Emits ``text`` one character per token at probability ``prob``; may raise ``fail`` once
    ``fail_after`` tokens are out, or stall (wait forever) once ``stall_after`` are."""

    def __init__(
        self,
        name: str,
        text: str,
        prob: float = 0.9,
        *,
        price: float = 1.0,
        prompt: int = 0,
        fail: Exception | None = None,
        fail_after: int = 0,
        stall_after: int | None = None,
    ):
        self.info = BackendInfo(name, name, f"scripted-{name}", 4096, True, True,
                                price_in_per_mtok=price, price_out_per_mtok=2 * price)  # fmt: skip
        self.text, self.prob, self.prompt = text, prob, prompt
        self.fail, self.fail_after, self.stall_after = fail, fail_after, stall_after
        self.ready = True
        self.calls = 0
        self.closed_early = False
        self.stalled = asyncio.Event()  # set when it starts waiting forever

    def prepare(self, req: GenerationRequest) -> Prepared:
        return Prepared(list(range(self.prompt)))

    async def generate(
        self, req: GenerationRequest, prepared: Any = None
    ) -> AsyncIterator[TokenEvent | FinishEvent]:
        self.calls += 1
        try:
            for i, ch in enumerate(self.text):
                if i == self.stall_after:
                    self.stalled.set()
                    await asyncio.Event().wait()
                if self.fail is not None and i == self.fail_after:
                    raise self.fail
                await asyncio.sleep(0)
                yield TokenEvent(0, ord(ch), ch, math.log(self.prob), 0.1, 1.0, False)
            if self.fail is not None:
                raise self.fail
            yield FinishEvent(0, "stop", "", self.prompt)
        except GeneratorExit:
            self.closed_early = True
            raise


SCHEMA = JsonSchema({"type": "object", "properties": {"a": {"type": "integer"}},
                     "required": ["a"], "additionalProperties": False})  # fmt: skip
CASCADE = Route("auto", ("slm", "llm"), policy="cascade", threshold=0.5,
                early_fallback=EarlyFallback(enabled=False), stream_commit_tokens=16)  # fmt: skip
SINGLE = Route("slm", ("slm",))


def request(constraint: Any = None) -> GenerationRequest:
    return GenerationRequest(
        ({"role": "user", "content": "hi"},), SamplingParams(temperature=0.0),
        constraint or NoConstraint(), request_id="r1", task_id="t1",
    )  # fmt: skip


def meter() -> EnergyMeter:
    """An estimate whose busy clock advances one second per reading: 10 J per attempt."""
    return EnergyMeter(prefer="estimate", watts=10.0, busy_clock=itertools.count().__next__)


async def decide(
    mode: Mode, route: Route, *tiers: Tier, req: GenerationRequest | None = None
) -> tuple[Answer, str, Trace]:
    """Run one request through ``complete`` or ``stream``: the answer, the text the caller saw
    (a whole answer's text for ``complete``), and the trace."""
    router = Router({t.info.name: t for t in tiers}, {})
    req = req or request()
    trace = Trace("r1", route.name, "t1")
    plan = router.plan(route, req, trace)
    if mode == "complete":
        answer = await router.complete(plan, req, trace)
        return answer, answer.result.choices[0].text, trace
    text = "".join([e.text async for e in router.stream(plan, req, trace)])
    assert trace.answer is not None
    return trace.answer, text, trace


def rows(trace: Trace) -> list[tuple[str, str, str | None]]:
    return [(a.backend, a.outcome, a.fallback_reason) for a in trace.attempts]


# ---- the same decisions, whole or streamed ---------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_invalid_last_tier_falls_back_to_the_valid_earlier_answer(mode: Mode) -> None:
    slm = Tier("slm", '{"a": 1}', 0.3)  # valid, unsure: escalates
    llm = Tier("llm", '{"a": "no"}', 0.9)  # sure, invalid
    answer, seen, trace = await decide(mode, CASCADE, slm, llm, req=request(SCHEMA))
    assert (answer.backend.name, seen, answer.valid) == ("slm", '{"a": 1}', True)
    assert answer.fallback_reason == "low_confidence"
    assert rows(trace) == [("slm", "accepted", "low_confidence"), ("llm", "escalated", "invalid")]


@pytest.mark.parametrize("mode", MODES)
async def test_output_finished_inside_the_window_escalates_on_low_confidence(mode: Mode) -> None:
    slm, llm = Tier("slm", "maybe", 0.3), Tier("llm", "surely", 0.9)
    answer, seen, trace = await decide(mode, CASCADE, slm, llm)
    assert (answer.backend.name, seen) == ("llm", "surely")
    assert answer.fallback_reason == "low_confidence"
    assert rows(trace) == [("slm", "escalated", "low_confidence"), ("llm", "accepted", None)]


@pytest.mark.parametrize("mode", MODES)
async def test_last_tier_failing_before_any_token_returns_the_earlier_answer(mode: Mode) -> None:
    slm = Tier("slm", "maybe", 0.3)
    llm = Tier("llm", "never", fail=UpstreamError("down"))
    answer, seen, trace = await decide(mode, CASCADE, slm, llm)
    assert (answer.backend.name, seen) == ("slm", "maybe")
    assert rows(trace) == [("slm", "accepted", "low_confidence"), ("llm", "error", None)]
    assert trace.attempts[1].error == "UpstreamError: down"
    if mode == "stream":
        assert trace.streaming_from == "slm"  # whose vocabulary renders the replayed logprobs


@pytest.mark.parametrize("mode", MODES)
async def test_confident_answer_stays_on_the_first_tier(mode: Mode) -> None:
    slm, llm = Tier("slm", "fine", 0.9), Tier("llm", "other")
    answer, seen, trace = await decide(mode, CASCADE, slm, llm)
    assert (answer.backend.name, seen, llm.calls) == ("slm", "fine", 0)
    assert rows(trace) == [("slm", "accepted", None)]


async def test_committed_stream_is_final_where_complete_would_escalate() -> None:
    text = "a long and unsure answer"  # 24 tokens: past the 16-token window
    answer, seen, trace = await decide("stream", CASCADE, Tier("slm", text, 0.3), Tier("llm", "x"))
    assert (answer.backend.name, seen) == ("slm", text)
    assert rows(trace) == [("slm", "accepted", None)]  # confidence recorded, not acted on
    assert trace.attempts[0].confidence == pytest.approx(0.3)
    answer, _, trace = await decide("complete", CASCADE, Tier("slm", text, 0.3), Tier("llm", "x"))
    assert answer.backend.name == "llm"


async def test_last_tier_failing_after_its_window_cannot_fall_back_in_a_stream() -> None:
    slm = Tier("slm", "maybe", 0.3)
    llm = Tier("llm", "x" * 20, fail=UpstreamError("cut"), fail_after=18)
    router = Router({"slm": slm, "llm": llm}, {})
    req, trace = request(), Trace("r1", "auto")
    seen: list[str] = []

    async def consume() -> None:
        async for event in router.stream(router.plan(CASCADE, req, trace), req, trace):
            seen.append(event.text)

    with pytest.raises(UpstreamError):
        await consume()
    assert "".join(seen) == "x" * 18  # already sent: nothing can replace it
    assert rows(trace) == [("slm", "escalated", "low_confidence"), ("llm", "error", None)]
    assert trace.attempts[1].completion_tokens == 18
    llm = Tier("llm", "x" * 20, fail=UpstreamError("cut"), fail_after=18)
    answer, _, _ = await decide("complete", CASCADE, Tier("slm", "maybe", 0.3), llm)
    assert answer.backend.name == "slm"


@pytest.mark.parametrize("mode", MODES)
async def test_early_fallback_switches_unseen_for_both(mode: Mode) -> None:
    route = Route("auto", ("slm", "llm"), policy="cascade", stream_commit_tokens=16,
                  early_fallback=EarlyFallback(repeat_cycles=4))  # fmt: skip
    answer, seen, trace = await decide(mode, route, Tier("slm", "xy" * 10), Tier("llm", "fine"))
    assert (answer.backend.name, seen, answer.fallback_reason) == ("llm", "fine", "repetition")
    assert rows(trace) == [("slm", "aborted", "repetition"), ("llm", "accepted", None)]
    assert trace.attempts[0].completion_tokens == 8


@pytest.mark.parametrize("mode", MODES)
async def test_cut_short_tier_reruns_when_the_next_one_is_down(mode: Mode) -> None:
    route = Route("auto", ("slm", "llm"), policy="cascade", stream_commit_tokens=16,
                  early_fallback=EarlyFallback(repeat_cycles=4))  # fmt: skip
    down = Tier("llm", "never", fail=OverloadedError("circuit open for backend llm"))
    answer, seen, trace = await decide(mode, route, Tier("slm", "xy" * 10), down)
    assert (answer.backend.name, seen, answer.fallback_reason) == ("slm", "xy" * 10,
                                                                   "backend_error")
    assert rows(trace) == [("slm", "aborted", "repetition"), ("llm", "error", "backend_error"),
                           ("slm", "accepted", None)]  # fmt: skip


# ---- cut-off attempts are booked with what they consumed --------------------------------------


def assert_cancelled(rec: AttemptRecord, prompt: int, completion: int, error: str) -> None:
    assert (rec.outcome, rec.prompt_tokens, rec.completion_tokens) == (
        "cancelled", prompt, completion)  # fmt: skip
    assert rec.cost_usd == pytest.approx((prompt * 1.0 + completion * 2.0) / 1e6)
    assert (rec.error or "").startswith(error)
    assert rec.latency_s >= 0
    assert (rec.energy_j, rec.energy_measured) == (10.0, False)


async def cancel_complete_when_stalled(slm: Tier) -> tuple[AttemptRecord, Trace, GenerationRequest]:
    """Run ``complete`` on ``slm`` alone, cancel it once the tier stalls: its one booking."""
    router = Router({"slm": slm}, {}, meter())
    req, trace = request(), Trace("r1", "slm")
    task = asyncio.create_task(router.complete(router.plan(SINGLE, req, trace), req, trace))
    await slm.stalled.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    [rec] = trace.attempts
    return rec, trace, req


async def test_cancelling_complete_mid_attempt_books_it() -> None:
    rec, _, _ = await cancel_complete_when_stalled(
        Tier("slm", "x" * 30, prompt=40, stall_after=15)
    )
    assert_cancelled(rec, 40, 15, "CancelledError")
    assert rec.ttft_s is not None


async def test_cancelling_the_task_that_consumes_a_stream_books_the_attempt() -> None:
    slm = Tier("slm", "x" * 30, prompt=40, stall_after=15)
    router = Router({"slm": slm}, {}, meter())
    req, trace = request(), Trace("r1", "slm")
    seen: list[str] = []

    async def consume() -> None:
        async for event in router.stream(router.plan(SINGLE, req, trace), req, trace):
            seen.append(event.text)

    task = asyncio.create_task(consume())
    await slm.stalled.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(seen) == 15
    [rec] = trace.attempts
    assert_cancelled(rec, 40, 15, "CancelledError")


async def test_closing_a_stream_books_the_attempt_once_and_the_request_under_its_tier() -> None:
    slm = Tier("slm", "x" * 30, prompt=40)
    router = Router({"slm": slm}, {}, meter())
    req, trace = request(), Trace("r1", "slm")
    stream = router.stream(router.plan(SINGLE, req, trace), req, trace)
    for _ in range(15):
        await anext(stream)
    await stream.aclose()  # what the gateway does when the client goes away
    assert slm.closed_early
    [rec] = trace.attempts
    assert_cancelled(rec, 40, 15, "GeneratorExit")
    record = request_record(trace, req, error=GenerationCancelled("stream closed"), stream=True)
    assert (record.status, record.error_type) == (499, "cancelled")
    assert (record.tier, record.backend) == ("slm", "slm")
    assert (record.prompt_tokens, record.completion_tokens) == (40, 15)
    assert record.cost_usd == pytest.approx(rec.cost_usd)


async def test_cancel_before_the_first_event_books_the_prompt_from_the_prepared_request() -> None:
    slow_prefill = Tier("slm", "never sent", prompt=16_700, stall_after=0)
    rec, trace, req = await cancel_complete_when_stalled(slow_prefill)
    assert_cancelled(rec, 16_700, 0, "CancelledError")
    assert rec.ttft_s is None
    record = request_record(trace, req, error=RequestTimeoutError("the request timed out"))
    assert (record.status, record.tier, record.prompt_tokens) == (504, "slm", 16_700)


async def test_a_deadline_books_the_attempt_and_the_timeout_propagates_unchanged() -> None:
    slm = Tier("slm", "maybe", 0.3)
    llm = Tier("llm", "x" * 30, prompt=40, stall_after=5)
    router = Router({"slm": slm, "llm": llm}, {}, meter())
    req, trace = request(), Trace("r1", "auto")
    plan = router.plan(CASCADE, req, trace)

    async def expire(deadline: asyncio.Timeout) -> None:  # once the LLM is mid-attempt
        await llm.stalled.wait()
        deadline.reschedule(asyncio.get_running_loop().time())

    async def run_until_deadline() -> None:
        async with asyncio.timeout(None) as deadline:
            expiry = asyncio.create_task(expire(deadline))
            await router.complete(plan, req, trace)
        await expiry

    with pytest.raises(TimeoutError):
        await run_until_deadline()
    assert [(a.backend, a.outcome) for a in trace.attempts] == [
        ("slm", "escalated"), ("llm", "cancelled")]  # fmt: skip
    assert_cancelled(trace.attempts[1], 40, 5, "CancelledError")
    assert [a.attempt_no for a in trace.attempts] == [0, 1]


@pytest.mark.parametrize("mode", MODES)
async def test_backend_cancellation_is_booked_and_never_escalated(mode: Mode) -> None:
    slm = Tier("slm", "abcdef", fail=GenerationCancelled("client went away"), fail_after=3)
    llm = Tier("llm", "other")
    with pytest.raises(GenerationCancelled):
        await decide(mode, CASCADE, slm, llm)
    assert llm.calls == 0


async def test_backend_cancellation_keeps_the_tokens_it_consumed() -> None:
    slm = Tier("slm", "abcdef", prompt=7, fail=GenerationCancelled("gone"), fail_after=3)
    router = Router({"slm": slm}, {}, meter())
    req, trace = request(), Trace("r1", "slm")
    with pytest.raises(GenerationCancelled):
        await router.complete(router.plan(SINGLE, req, trace), req, trace)
    [rec] = trace.attempts
    assert_cancelled(rec, 7, 3, "GenerationCancelled: gone")


async def test_failed_request_is_booked_under_the_last_attempt_that_used_tokens() -> None:
    slm = Tier("slm", "abcdef", fail=UpstreamError("slm died"), fail_after=4)
    llm = Tier("llm", "other", fail=UpstreamError("llm down"))
    router = Router({"slm": slm, "llm": llm}, {})
    req, trace = request(), Trace("r1", "auto")
    with pytest.raises(UpstreamError, match="llm down"):
        await router.complete(router.plan(CASCADE, req, trace), req, trace)
    assert rows(trace) == [("slm", "error", "backend_error"), ("llm", "error", None)]
    record = request_record(trace, req, error=UpstreamError("llm down"))
    assert (record.status, record.tier, record.completion_tokens) == (502, "slm", 4)
    assert record.cost_usd == pytest.approx(4 * 2.0 / 1e6)


# ---- the pure decisions ------------------------------------------------------------------------


def test_commit_window() -> None:
    assert commit_window(CASCADE, final=False, fallback=False, streaming=False) is None
    assert commit_window(CASCADE, final=False, fallback=False, streaming=True) == 16
    assert commit_window(CASCADE, final=True, fallback=True, streaming=True) == 16
    assert commit_window(CASCADE, final=True, fallback=False, streaming=True) == 0
    assert commit_window(SINGLE, final=True, fallback=False, streaming=True) == 0


def test_after_finish_and_after_error() -> None:
    assert after_finish("low_confidence", sent=False, valid=True, kept_valid=False) == "next"
    assert after_finish("low_confidence", sent=True, valid=True, kept_valid=False) == "accept"
    assert after_finish(None, sent=False, valid=False, kept_valid=True) == "fall_back"
    assert after_finish(None, sent=False, valid=False, kept_valid=False) == "accept"
    assert after_error(final=False, caller=False, sent=False, kept=False) == "next"
    assert after_error(final=True, caller=False, sent=False, kept=True) == "fall_back"
    assert after_error(final=True, caller=False, sent=False, kept=False) == "raise"
    assert after_error(final=False, caller=True, sent=False, kept=False) == "raise"
    assert after_error(final=True, caller=False, sent=True, kept=True) == "raise"


def test_booked_attempt_prefers_the_last_one_that_used_tokens() -> None:
    def att(no: int, tokens: int) -> AttemptRecord:
        return AttemptRecord("r", no, "auto", f"t{no}", f"b{no}", "m", 0.0, 0.0,
                             completion_tokens=tokens)  # fmt: skip

    assert booked_attempt([]) is None
    assert booked_attempt([att(0, 5), att(1, 0)]).tier == "t0"  # type: ignore[union-attr]
    assert booked_attempt([att(0, 0), att(1, 0)]).tier == "t1"  # type: ignore[union-attr]
