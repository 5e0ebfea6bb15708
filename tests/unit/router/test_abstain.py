"""Abstaining when the model wanted a tool nobody offered (``router.abstain``): the probe's pure
parts, and the tier loop with a scripted backend."""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import AsyncIterator
from typing import Any

import pytest

from decoding.backend import BackendInfo, FinishEvent
from decoding.constraint import NoConstraint, ToolCalls, ToolSpec
from decoding.types import Choice, GenerationRequest, SamplingParams, TokenEvent
from router.abstain import (
    TEXT_ONLY,
    name_boundary,
    probe_due,
    probe_request,
    wanted_name,
    wants_unoffered,
)
from router.deferral import DeferralRule, LogisticModel
from router.router import Route, Router, Trace

WEATHER = ToolSpec("get_weather", {"type": "object", "properties": {"city": {"type": "string"}}})
CALL = '{"name": "get_weather", "arguments": {"city": "Paris"}}'


def choice_of(pieces: list[str]) -> Choice:
    events = [TokenEvent(0, 100 + i, p, 0.0, 0.0, 1.0, False) for i, p in enumerate(pieces)]
    return Choice(0, "".join(pieces), [e.token_id for e in events], events, "stop")


def request(constraint: Any = None, guided: bool = True) -> GenerationRequest:
    return GenerationRequest(
        ({"role": "user", "content": "area of a 3x4 triangle?"},),
        SamplingParams(temperature=0.0), constraint or ToolCalls((WEATHER,)),
        request_id="r1", guided=guided,
    )  # fmt: skip


def test_the_boundary_is_the_last_token_edge_before_the_name() -> None:
    merged = choice_of(['{"', 'name": "', "get", "_weather", '", ...'])
    assert name_boundary(merged) == (2, len('{"name": "'))
    straddling = choice_of(['{"name', '": "get', "_weather"])  # a token holds quote and name
    assert name_boundary(straddling) == (1, len('{"name'))
    assert name_boundary(choice_of(["plain text"])) is None


def test_the_probe_continues_the_output_greedily_without_a_grammar() -> None:
    choice = choice_of(['{"', 'name": "', "get"])
    probe = probe_request(request(), choice, 2)
    assert probe.continue_ids == (100, 101)
    assert isinstance(probe.constraint, NoConstraint)
    assert probe.params.temperature == 0.0
    assert probe.params.stop == ('",', '"}')
    assert probe.request_id == "r1~probe"
    assert probe.messages == request().messages


def test_the_name_the_model_wanted() -> None:
    assert wanted_name('{"name', '": "calc_area') == "calc_area"
    assert wanted_name('```json\n{"name": "', "get_weather") == "get_weather"
    assert wanted_name("{", "oops") is None
    assert wants_unoffered("calc_area", ["get_weather"])
    assert not wants_unoffered("get_weather", ["get_weather"])
    assert not wants_unoffered("get_wea", ["get_weather"])  # cut at the probe's budget
    assert not wants_unoffered(None, ["get_weather"])


def test_only_auto_calls_through_the_grammar_are_probed() -> None:
    assert probe_due(request(), 1, True)
    assert not probe_due(request(), 0, True)  # it answered in text already
    assert not probe_due(request(), 1, False)  # the backend cannot continue an output
    assert not probe_due(request(guided=False), 1, True)
    assert not probe_due(request(ToolCalls((WEATHER,), mode="required")), 1, True)
    assert not probe_due(request(NoConstraint()), 1, True)


def test_text_only_cannot_start_a_call() -> None:
    import re

    pattern = re.compile(TEXT_ONLY.pattern)
    assert pattern.fullmatch("I can't compute areas with these tools.")
    assert not pattern.fullmatch(CALL)
    assert not pattern.fullmatch("```json\n" + CALL)


class Continuable:
    """Answers a call, then (asked to continue an output) writes ``wanted`` as the name, then
    (asked for text) writes ``text``."""

    supports_continuation = True

    def __init__(self, wanted: str, text: str = "I cannot do that with these tools."):
        self.info = BackendInfo("llm", "llm", "scripted", 4096, True, True,
                                price_in_per_mtok=1.0, price_out_per_mtok=2.0)  # fmt: skip
        self.wanted, self.text = wanted, text
        self.ready = True
        self.seen: list[GenerationRequest] = []

    def prepare(self, req: GenerationRequest) -> GenerationRequest:
        return req

    async def generate(
        self, req: GenerationRequest, prepared: Any = None
    ) -> AsyncIterator[TokenEvent | FinishEvent]:
        req = prepared if prepared is not None else req  # decodes what was prepared, as engines do
        self.seen.append(req)
        if req.continue_ids:  # the model's own call, from the kept 3-character tokens on
            wanted_call = CALL.replace("get_weather", self.wanted)
            out = wanted_call[3 * len(req.continue_ids) : wanted_call.index('",')]
        elif isinstance(req.constraint, ToolCalls):
            out = CALL
        else:
            out = self.text
        for i, piece in enumerate([out[j : j + 3] for j in range(0, len(out), 3)]):
            await asyncio.sleep(0)
            yield TokenEvent(0, i, piece, math.log(0.9), 0.1, 1.0, False)
        yield FinishEvent(0, "stop", "", 10)


async def run(backend: Continuable, route: Route) -> tuple[Any, Trace]:
    router = Router({"llm": backend}, {})
    req = request()
    trace = Trace(req.request_id, route.name)
    plan = router.plan(route, req, trace)
    return await router.complete(plan, req, trace), trace


async def test_a_model_that_wanted_another_tool_answers_in_text() -> None:
    backend = Continuable("calc_area")
    answer, trace = await run(backend, Route("one", ("llm",)))
    assert answer.result.choices[0].text == backend.text
    assert answer.checks[0].parsed is None  # content, no tool_calls
    assert [(a.outcome, a.fallback_reason) for a in trace.attempts] == [
        ("probe", None), ("resampled", "unoffered_tool"), ("accepted", None)]  # fmt: skip
    assert all(a.cost_usd > 0 for a in trace.attempts)  # the probe is paid for, and booked
    _, probe, text = backend.seen
    assert probe.continue_ids  # it continued the call's own tokens
    assert text.constraint == TEXT_ONLY


async def test_a_model_that_wanted_the_offered_tool_keeps_its_call() -> None:
    backend = Continuable("get_weather")
    answer, trace = await run(backend, Route("one", ("llm",)))
    assert answer.checks[0].parsed.tool_calls[0].name == "get_weather"
    assert [a.outcome for a in trace.attempts] == ["probe", "accepted"]


async def test_the_probe_can_be_turned_off_per_route() -> None:
    backend = Continuable("calc_area")
    answer, trace = await run(backend, Route("one", ("llm",), abstain_probe=False))
    assert answer.checks[0].parsed.tool_calls
    assert [a.outcome for a in trace.attempts] == ["accepted"]


async def test_a_streamed_call_is_probed_too() -> None:
    """Tool calls are sent whole, so a stream holds them and the probe still decides."""
    backend = Continuable("calc_area")
    router = Router({"llm": backend}, {})
    req = request()
    route = Route("one", ("llm",))
    trace = Trace(req.request_id, route.name)
    plan = router.plan(route, req, trace)
    events = [e async for e in router.stream(plan, req, trace)]
    assert "".join(e.text for e in events if isinstance(e, TokenEvent)) == backend.text
    assert [a.outcome for a in trace.attempts] == ["probe", "resampled", "accepted"]


async def test_an_abstention_is_judged_by_the_tools_rule_not_as_free_text() -> None:
    """On a cascade, the text a tier writes after its probe is its answer to a tool request: the
    rule for tool calls judges it (here: an abstention is likely right, so it is kept), not the
    route's free-text signal (mean probability 0.9 under a 0.95 bar would escalate it)."""
    slm, llm = Continuable("calc_area"), Continuable("calc_area")
    slm.info = dataclasses.replace(slm.info, name="slm", tier="slm")
    # P(success) 0.73 for a call (kept), 0.999 for an abstention
    abstaining_is_right = LogisticModel(("abstained",), (0.5,), (0.5,), (3.0,), 4.0, (0.0,),
                                        (1.0,), threshold=0.5)  # fmt: skip
    route = Route("auto", ("slm", "llm"), policy="cascade", signal="mean_prob", threshold=0.95,
                  deferral=DeferralRule({"tools": abstaining_is_right}))  # fmt: skip
    router = Router({"slm": slm, "llm": llm}, {})
    req = request()
    trace = Trace(req.request_id, route.name)
    answer = await router.complete(router.plan(route, req, trace), req, trace)
    assert answer.backend.name == "slm"
    assert answer.result.choices[0].text == slm.text
    assert [(a.backend, a.outcome) for a in trace.attempts] == [
        ("slm", "probe"), ("slm", "resampled"), ("slm", "accepted")]  # fmt: skip
    assert answer.signals["abstained"] == 1.0
    assert answer.confidence == pytest.approx(1 / (1 + math.exp(-7.0)))
    assert llm.seen == []  # never reached
