"""Router policy logic with a scripted backend (failure and confidence injection only; the real
models run the same routes in tests/integration/test_routing.py)."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator
from typing import Any

import pytest

from decoding.backend import BackendInfo, FinishEvent
from decoding.constraint import JsonSchema, NoConstraint, ToolCalls, ToolSpec
from decoding.types import GenerationRequest, HintStats, SamplingParams, TokenEvent
from router.confidence import EarlyFallback
from router.deferral import DeferralRule, LogisticModel
from router.pre import PreRouter
from router.router import Route, Router, Trace, request_record
from schemas.errors import InvalidRequestError, RequestTimeoutError, UpstreamError

VOCAB: dict[str, int] = {}  # text -> token id, so repeated text repeats ids


class Scripted:
    """Emits ``pieces`` (text, probability) as tokens, or raises ``fail`` after ``fail_after``."""

    def __init__(
        self,
        name: str,
        tier: str,
        pieces: list[tuple[str, float]],
        price: float = 1.0,
        fail: Exception | None = None,
        fail_after: int = 0,
    ):
        self.info = BackendInfo(name, tier, f"scripted-{name}", 4096, True, True,
                                price_in_per_mtok=price, price_out_per_mtok=2 * price)  # fmt: skip
        self.pieces, self.fail, self.fail_after = pieces, fail, fail_after
        self.ready = True
        self.calls = 0
        self.closed_early = False
        self.seen: list[GenerationRequest] = []  # what prepare and generate were given

    def prepare(self, req: GenerationRequest) -> str:
        self.seen.append(req)
        return "prepared"

    async def generate(
        self, req: GenerationRequest, prepared: Any = None
    ) -> AsyncIterator[TokenEvent | FinishEvent]:
        self.calls += 1
        self.seen.append(req)
        emitted = 0
        try:
            for text, prob in self.pieces:
                if self.fail is not None and emitted == self.fail_after:
                    raise self.fail
                await asyncio.sleep(0)
                token_id = VOCAB.setdefault(text, len(VOCAB))
                yield TokenEvent(0, token_id, text, math.log(prob), 0.1, 1.0, prob == 1.0)
                emitted += 1
            if self.fail is not None:
                raise self.fail
            yield FinishEvent(0, "stop", "", 10)
        except GeneratorExit:
            self.closed_early = True
            raise


def tokens(text: str, prob: float) -> list[tuple[str, float]]:
    return [(ch, prob) for ch in text]


def req(constraint: Any = None, tools: tuple[dict[str, Any], ...] = ()) -> GenerationRequest:
    return GenerationRequest(
        ({"role": "user", "content": "hi"},), SamplingParams(temperature=0.0),
        constraint or NoConstraint(), tools, request_id="r1", task_id="t1",
    )  # fmt: skip


SCHEMA = JsonSchema({"type": "object", "properties": {"a": {"type": "integer"}},
                     "required": ["a"], "additionalProperties": False})  # fmt: skip
CASCADE = Route("auto", ("slm", "llm"), policy="cascade", threshold=0.5,
                early_fallback=EarlyFallback(enabled=False))  # fmt: skip


async def run(router: Router, route: Route, request: GenerationRequest) -> tuple[Any, Trace]:
    trace = Trace(request.request_id, route.name, request.task_id)
    plan = router.plan(route, request, trace)
    return await router.complete(plan, request, trace), trace


async def test_confident_valid_answer_stays_on_the_slm() -> None:
    slm = Scripted("slm", "slm", tokens('{"a": 1}', 0.9))
    llm = Scripted("llm", "llm", tokens('{"a": 2}', 0.99))
    answer, trace = await run(Router({"slm": slm, "llm": llm}, {}), CASCADE, req(SCHEMA))
    assert answer.backend.name == "slm"
    assert answer.result.choices[0].text == '{"a": 1}'
    assert answer.fallback_reason is None
    assert llm.calls == 0
    assert [a.outcome for a in trace.attempts] == ["accepted"]
    assert answer.confidence == pytest.approx(0.9)
    # cost: 10 prompt tokens at $1/M + 8 completion tokens at $2/M
    assert answer.cost_usd == pytest.approx((10 * 1 + 8 * 2) / 1e6)


async def test_low_confidence_escalates_to_the_llm() -> None:
    slm = Scripted("slm", "slm", tokens('{"a": 1}', 0.3))
    llm = Scripted("llm", "llm", tokens('{"a": 2}', 0.99), price=4.0)
    answer, trace = await run(Router({"slm": slm, "llm": llm}, {}), CASCADE, req(SCHEMA))
    assert answer.backend.name == "llm"
    assert answer.fallback_reason == "low_confidence"
    assert [(a.backend, a.outcome, a.fallback_reason) for a in trace.attempts] == [
        ("slm", "escalated", "low_confidence"), ("llm", "accepted", None)]
    slm_cost, llm_cost = (10 + 16) / 1e6, (40 + 64) / 1e6
    assert answer.cost_usd == pytest.approx(slm_cost + llm_cost)
    assert answer.counterfactual_cost_usd == pytest.approx(llm_cost)


async def test_invalid_json_escalates_even_when_confident() -> None:
    slm = Scripted("slm", "slm", tokens('{"a": "x"}', 0.99))
    llm = Scripted("llm", "llm", tokens('{"a": 2}', 0.99))
    answer, trace = await run(Router({"slm": slm, "llm": llm}, {}), CASCADE, req(SCHEMA))
    assert answer.backend.name == "llm"
    assert answer.fallback_reason == "invalid"
    assert trace.attempts[0].schema_valid is False
    assert trace.attempts[1].schema_valid is True


@pytest.mark.parametrize("error", [UpstreamError("upstream 500"), RequestTimeoutError("slow")])
async def test_retryable_backend_error_escalates(error: Exception) -> None:
    slm = Scripted("slm", "slm", tokens("hello", 0.9), fail=error, fail_after=2)
    llm = Scripted("llm", "llm", tokens("world", 0.9))
    answer, trace = await run(Router({"slm": slm, "llm": llm}, {}), CASCADE, req())
    assert answer.backend.name == "llm"
    assert answer.fallback_reason == "backend_error"
    assert trace.attempts[0].outcome == "error"
    assert str(error) in (trace.attempts[0].error or "")


async def test_caller_error_is_raised_not_escalated() -> None:
    bad = InvalidRequestError("bad schema", param="response_format")
    slm = Scripted("slm", "slm", [], fail=bad)
    llm = Scripted("llm", "llm", tokens("x", 0.9))
    with pytest.raises(InvalidRequestError):
        await run(Router({"slm": slm, "llm": llm}, {}), CASCADE, req())
    assert llm.calls == 0


async def test_last_tier_error_is_raised_and_recorded() -> None:
    slm = Scripted("slm", "slm", tokens("x", 0.1))
    llm = Scripted("llm", "llm", [], fail=UpstreamError("down"))
    router = Router({"slm": slm, "llm": llm}, {})
    trace = Trace("r1", "auto")
    request = req()
    plan = router.plan(CASCADE, request, trace)
    answer = await router.complete(plan, request, trace)
    # The SLM's (low-confidence but finished) answer is returned rather than a 502.
    assert answer.backend.name == "slm"
    assert [a.outcome for a in trace.attempts] == ["accepted", "error"]


async def test_llm_invalid_falls_back_to_the_valid_slm_answer() -> None:
    slm = Scripted("slm", "slm", tokens('{"a": 1}', 0.3))
    llm = Scripted("llm", "llm", tokens('{"a": "no"}', 0.9))
    answer, trace = await run(Router({"slm": slm, "llm": llm}, {}), CASCADE, req(SCHEMA))
    assert answer.backend.name == "slm"
    assert answer.valid
    assert [(a.backend, a.outcome) for a in trace.attempts] == [
        ("slm", "accepted"), ("llm", "escalated")]  # the ledger says which answer was used


async def test_early_fallback_aborts_a_looping_slm() -> None:
    loop = tokens("ab" * 40, 0.95)
    slm = Scripted("slm", "slm", loop)
    llm = Scripted("llm", "llm", tokens("done", 0.9))
    route = Route("auto", ("slm", "llm"), policy="cascade",
                  early_fallback=EarlyFallback(repeat_cycles=4))  # fmt: skip
    answer, trace = await run(Router({"slm": slm, "llm": llm}, {}), route, req())
    assert answer.result.choices[0].text == "done"
    first = trace.attempts[0]
    assert first.outcome == "aborted"
    assert first.fallback_reason == "repetition"
    assert first.completion_tokens == 8  # stopped at the 4th repetition of "ab"
    assert first.prompt_tokens == 0  # the scripted backend has no prompt ids
    assert slm.closed_early


async def test_early_fallback_on_confidence_collapse() -> None:
    pieces = tokens("abcdefgh", 0.9) + [(c, 0.01) for c in "ijklmnopqrstuvwx"]
    slm = Scripted("slm", "slm", pieces)
    llm = Scripted("llm", "llm", tokens("ok", 0.9))
    route = Route("auto", ("slm", "llm"), policy="cascade",
                  early_fallback=EarlyFallback(window=4, min_window_prob=0.05))  # fmt: skip
    answer, trace = await run(Router({"slm": slm, "llm": llm}, {}), route, req())
    assert trace.attempts[0].fallback_reason == "confidence_collapse"
    assert trace.attempts[0].completion_tokens == 8 + 3  # window mean first drops under 0.05
    assert answer.backend.name == "llm"


async def test_forced_tokens_do_not_count_towards_confidence() -> None:
    pieces = [("{", 1.0), ('"a"', 1.0), (": ", 1.0), ("1", 0.8), ("}", 1.0)]
    slm = Scripted("slm", "slm", pieces)
    llm = Scripted("llm", "llm", tokens('{"a": 2}', 0.99))
    answer, _ = await run(Router({"slm": slm, "llm": llm}, {}), CASCADE, req(SCHEMA))
    assert answer.confidence == pytest.approx(0.8)
    assert answer.signals["scored_tokens"] == 1.0


async def test_tool_call_naming_an_unknown_tool_is_escalated() -> None:
    tool = ToolSpec("get_weather", {"type": "object", "properties": {"city": {"type": "string"}},
                                    "required": ["city"]})  # fmt: skip
    constraint = ToolCalls((tool,), mode="required", parallel=False)
    bad = '<tool_call>{"name": "get_weather", "arguments": {}}</tool_call>'
    good = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    slm = Scripted("slm", "slm", tokens(bad, 0.99))
    llm = Scripted("llm", "llm", tokens(good, 0.99))
    answer, trace = await run(Router({"slm": slm, "llm": llm}, {}), CASCADE, req(constraint))
    assert answer.backend.name == "llm"
    assert answer.executable is True
    assert trace.attempts[0].executable is False
    call = answer.checks[0].parsed.tool_calls[0]
    assert json.loads(call.arguments) == {"city": "Paris"}


async def test_pre_router_sends_a_heavy_request_straight_to_the_llm() -> None:
    slm = Scripted("slm", "slm", tokens("small", 0.9))
    llm = Scripted("llm", "llm", tokens("large", 0.9))
    pre = PreRouter({"bias": 1.0, "tools": -1.0}, threshold=0.5)
    route = Route("pre", ("slm", "llm"), policy="pre", pre=pre)
    router = Router({"slm": slm, "llm": llm}, {})
    tools = tuple({"type": "function", "function": {"name": f"f{i}"}} for i in range(3))
    answer, trace = await run(router, route, req(tools=tools))
    assert answer.backend.name == "llm"
    assert answer.fallback_reason == "pre_router"
    assert slm.calls == 0
    assert trace.pre_score == pytest.approx(1 / (1 + math.exp(2)))
    answer, _ = await run(router, route, req())
    assert answer.backend.name == "slm"


async def test_free_text_stream_switches_tiers_inside_the_commit_window() -> None:
    slm = Scripted("slm", "slm", tokens("xy" * 10, 0.95))
    llm = Scripted("llm", "llm", tokens("fine", 0.9))
    route = Route("auto", ("slm", "llm"), policy="cascade", stream_commit_tokens=16,
                  early_fallback=EarlyFallback(repeat_cycles=4))  # fmt: skip
    router = Router({"slm": slm, "llm": llm}, {})
    request, trace = req(), Trace("r1", "auto")
    plan = router.plan(route, request, trace)
    assert router.streams_tokens(plan, request)
    seen = [e.text for e in [e async for e in router.stream(plan, request, trace)]]
    assert "".join(seen) == "fine"  # nothing of the aborted SLM attempt reached the client
    assert trace.streaming_from == "llm"  # whose vocabulary renders the streamed logprobs
    assert trace.answer is not None
    assert trace.answer.fallback_reason == "repetition"


async def test_json_on_a_cascade_is_not_streamed_token_by_token() -> None:
    router = Router({"slm": Scripted("slm", "slm", []), "llm": Scripted("llm", "llm", [])}, {})
    request = req(SCHEMA)
    plan = router.plan(CASCADE, request)
    assert not router.streams_tokens(plan, request)
    single = router.plan(Route("slm", ("slm",)), request)
    assert router.streams_tokens(single, request)


@pytest.mark.parametrize("guided", [True, False])
async def test_route_guided_decoding_reaches_every_tier_and_output_is_still_parsed(
    guided: bool,
) -> None:
    call = '{"name": "f", "arguments": {"x": 1}}'
    slm = Scripted("slm", "slm", tokens("no", 0.1))
    llm = Scripted("llm", "llm", tokens(call, 0.99))
    route = Route("auto", ("slm", "llm"), policy="cascade", threshold=0.5, guided_decoding=guided,
                  early_fallback=EarlyFallback(enabled=False))  # fmt: skip
    tool = ToolSpec("f", {"type": "object", "properties": {"x": {"type": "integer"}}})
    answer, _ = await run(Router({"slm": slm, "llm": llm}, {}), route, req(ToolCalls((tool,))))
    assert [r.guided for r in slm.seen + llm.seen] == [guided] * 4
    parsed = answer.checks[0].parsed
    assert parsed is not None
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == [("f", '{"x": 1}')]


def provenance_rule(threshold: float) -> DeferralRule:
    """P(success) rises with provenance only: calls with invented values defer."""
    model = LogisticModel(("provenance",), (0.5,), (0.25,), (4.0,), 0.0, (0.0,), (1.0,),
                          threshold=threshold)  # fmt: skip
    return DeferralRule({"tools": model})


@pytest.mark.parametrize(("city", "escalated"), [("Paris", False), ("Atlantis", True)])
async def test_learned_rule_defers_a_call_with_invented_arguments(
    city: str, escalated: bool
) -> None:
    call = json.dumps({"name": "f", "arguments": {"city": city}})
    slm = Scripted("slm", "slm", tokens(call, 0.99))
    llm = Scripted("llm", "llm", tokens('{"name": "f", "arguments": {"city": "Paris"}}', 0.99))
    route = Route("auto", ("slm", "llm"), policy="cascade", deferral=provenance_rule(0.5),
                  early_fallback=EarlyFallback(enabled=False))  # fmt: skip
    tool = ToolSpec("f", {"type": "object", "properties": {"city": {"type": "string"}}})
    request = GenerationRequest(
        ({"role": "user", "content": "Weather in Paris?"},), SamplingParams(temperature=0.0),
        ToolCalls((tool,)), request_id="r1", task_id="t1",
    )  # fmt: skip
    answer, trace = await run(Router({"slm": slm, "llm": llm}, {}), route, request)
    first = trace.attempts[0]
    assert first.signals["provenance"] == (0.0 if escalated else 1.0)
    assert (first.fallback_reason == "low_confidence") is escalated
    assert answer.backend.name == ("llm" if escalated else "slm")
    assert first.confidence == pytest.approx(first.signals["deferral"])


async def test_a_rule_without_a_model_for_the_kind_keeps_the_route_signal() -> None:
    slm = Scripted("slm", "slm", tokens('{"a": 1}', 0.3))
    llm = Scripted("llm", "llm", tokens('{"a": 2}', 0.99))
    route = Route("auto", ("slm", "llm"), policy="cascade", threshold=0.5,
                  deferral=provenance_rule(0.5), early_fallback=EarlyFallback(enabled=False))
    answer, _ = await run(Router({"slm": slm, "llm": llm}, {}), route, req(SCHEMA))
    assert answer.fallback_reason == "low_confidence"  # mean_prob 0.3 < 0.5, as without a rule


async def test_request_record_sums_attempts() -> None:
    slm = Scripted("slm", "slm", tokens('{"a": 1}', 0.3))
    llm = Scripted("llm", "llm", tokens('{"a": 2}', 0.99), price=4.0)
    request = req(SCHEMA)
    answer, trace = await run(Router({"slm": slm, "llm": llm}, {}), CASCADE, request)
    record = request_record(trace, request, answer=answer)
    assert record.status == 200
    assert record.tier == "llm"
    assert record.task_id == "t1"
    assert record.fallback
    assert record.fallback_reason == "low_confidence"
    assert record.cost_usd == pytest.approx(answer.cost_usd)
    assert record.schema_valid is True
    assert record.expects_json
    assert not record.expects_tools
    assert [a.attempt_no for a in record.attempts] == [0, 1]
    failed = request_record(trace, request, error=UpstreamError("x"))
    assert failed.status == 502
    assert failed.error_type == "upstream_error"
    assert not failed.succeeded


class Verifying(Scripted):
    """A tier that verifies draft hints: it reports the hint's leading characters it shares."""

    supports_draft_hint = True

    async def generate(
        self, req: GenerationRequest, prepared: Any = None
    ) -> AsyncIterator[TokenEvent | FinishEvent]:
        async for event in super().generate(req, prepared):
            if isinstance(event, FinishEvent) and req.draft_hint:
                own = "".join(text for text, _ in self.pieces)
                shared = next((i for i, (a, b) in enumerate(zip(own, req.draft_hint, strict=False))
                               if a != b), min(len(own), len(req.draft_hint)))  # fmt: skip
                event = FinishEvent(0, "stop", "", 10, hint=HintStats(len(req.draft_hint),
                                                                      shared, 1))  # fmt: skip
            yield event


async def test_escalation_hands_the_slm_answer_to_the_llm_as_a_draft() -> None:
    slm = Scripted("slm", "slm", tokens('{"a": 1}', 0.3))
    llm = Verifying("llm", "llm", tokens('{"a": 2}', 0.99))
    request = req(SCHEMA)
    answer, trace = await run(Router({"slm": slm, "llm": llm}, {}), CASCADE, request)
    assert answer.backend.name == "llm"
    assert llm.seen[-1].draft_hint == '{"a": 1}'
    assert not slm.seen[-1].draft_hint  # the first tier has nothing to verify
    first, second = trace.attempts
    assert (first.hint_mode, first.hint_reused) == (None, None)
    assert (second.hint_mode, second.hint_drafted, second.hint_reused) == ("verified", 8, 6)
    record = request_record(trace, request, answer=answer)
    assert record.attempts[1].hint_reused == 6


async def test_a_tier_that_cannot_verify_regenerates_and_says_so() -> None:
    slm = Scripted("slm", "slm", tokens('{"a": 1}', 0.3))
    llm = Scripted("llm", "llm", tokens('{"a": 2}', 0.99))  # no supports_draft_hint
    _, trace = await run(Router({"slm": slm, "llm": llm}, {}), CASCADE, req(SCHEMA))
    assert not llm.seen[-1].draft_hint
    assert trace.attempts[1].hint_mode == "regenerated"
    assert trace.attempts[1].hint_reused is None


async def test_verify_escalation_off_hands_nothing_over() -> None:
    slm = Scripted("slm", "slm", tokens('{"a": 1}', 0.3))
    llm = Verifying("llm", "llm", tokens('{"a": 2}', 0.99))
    route = Route("auto", ("slm", "llm"), policy="cascade", threshold=0.5,
                  early_fallback=EarlyFallback(enabled=False), verify_escalation=False)  # fmt: skip
    _, trace = await run(Router({"slm": slm, "llm": llm}, {}), route, req(SCHEMA))
    assert not llm.seen[-1].draft_hint
    assert trace.attempts[1].hint_mode is None


async def test_a_resampled_last_tier_gets_no_hint_of_its_own() -> None:
    slm = Scripted("slm", "slm", tokens('{"a": "y"}', 0.9))  # invalid: escalated
    llm = Verifying("llm", "llm", tokens('{"a": "x"}', 0.99))  # invalid: resampled
    route = Route("auto", ("slm", "llm"), policy="cascade", threshold=0.5, max_resamples=1,
                  early_fallback=EarlyFallback(enabled=False))  # fmt: skip
    _, trace = await run(Router({"slm": slm, "llm": llm}, {}), route, req(SCHEMA))
    assert [(a.backend, a.outcome, a.hint_mode) for a in trace.attempts] == [
        ("slm", "escalated", None), ("llm", "resampled", "verified"), ("llm", "accepted", None)]
    assert llm.seen[0].draft_hint == '{"a": "y"}'  # the escalation verified the SLM's answer
    assert llm.seen[-1].draft_hint == ""  # the resample draws afresh
