"""Invalid outputs: resampled, escalated, refused or flagged (``router.invalid``), with a
scripted backend whose outputs are chosen per call."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from typing import Any

import pytest

from decoding.backend import BackendInfo, FinishEvent
from decoding.constraint import JsonObject, JsonSchema, NoConstraint, Regex, ToolCalls, ToolSpec
from decoding.types import FinishReason, GenerationRequest, SamplingParams, TokenEvent
from router.invalid import (
    RESAMPLE_TEMPERATURE,
    invalid_policy,
    parse_on_invalid,
    promised_strict,
    resample_request,
)
from router.pre import PreRouter
from router.router import Route, Router, Trace
from router.tier_loop import commit_window
from schemas.errors import InvalidOutputError, InvalidRequestError

UNIQUE = {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}


class PerCall:
    """Emits ``outputs[i]`` on its i-th call (the last one repeats), one token per character."""

    def __init__(self, name: str, tier: str, outputs: list[str], finish: FinishReason = "stop"):
        self.info = BackendInfo(name, tier, f"scripted-{name}", 4096, True, True,
                                price_in_per_mtok=1.0, price_out_per_mtok=2.0)  # fmt: skip
        self.outputs, self.finish = outputs, finish
        self.ready = True
        self.seen: list[GenerationRequest] = []

    def prepare(self, req: GenerationRequest) -> GenerationRequest:
        return req

    async def generate(
        self, req: GenerationRequest, prepared: Any = None
    ) -> AsyncIterator[TokenEvent | FinishEvent]:
        req = prepared if prepared is not None else req  # decodes what was prepared, as engines do
        text = self.outputs[min(len(self.seen), len(self.outputs) - 1)]
        self.seen.append(req)
        for i, ch in enumerate(text):
            await asyncio.sleep(0)
            yield TokenEvent(0, i, ch, math.log(0.9), 0.1, 1.0, False)
        yield FinishEvent(0, self.finish, "", 10)


def request(constraint: Any, on_invalid: Any = None) -> GenerationRequest:
    return GenerationRequest(
        ({"role": "user", "content": "numbers"},), SamplingParams(temperature=0.0, seed=5),
        constraint, request_id="r1", task_id="t1", on_invalid=on_invalid,
    )  # fmt: skip


async def run(route: Route, backends: dict[str, Any], req: GenerationRequest) -> tuple[Any, Trace]:
    router = Router(backends, {})
    trace = Trace(req.request_id, route.name, req.task_id)
    plan = router.plan(route, req, trace)
    try:
        return await router.complete(plan, req, trace), trace
    except InvalidOutputError as exc:
        return exc, trace


SINGLE = Route("one", ("llm",))


async def test_an_invalid_output_is_resampled_with_another_seed_and_warmer_sampling() -> None:
    llm = PerCall("llm", "llm", ["[1, 1]", "[1, 2]"])
    answer, trace = await run(SINGLE, {"llm": llm}, request(JsonSchema(UNIQUE, strict=True)))
    assert answer.result.choices[0].text == "[1, 2]"
    assert answer.valid
    assert [(a.outcome, a.fallback_reason) for a in trace.attempts] == [
        ("resampled", "invalid"), ("accepted", None)]  # fmt: skip
    first, second = llm.seen
    assert first.params.temperature == 0.0
    assert second.params.temperature == RESAMPLE_TEMPERATURE
    assert second.params.seed != first.params.seed


async def test_strict_request_never_gets_an_invalid_200() -> None:
    llm = PerCall("llm", "llm", ["[1, 1]"])
    error, trace = await run(SINGLE, {"llm": llm}, request(JsonSchema(UNIQUE, strict=True)))
    assert isinstance(error, InvalidOutputError)
    assert (error.status, error.type, error.code) == (502, "server_error", "invalid_output")
    assert error.param == "response_format"
    assert "no valid output after 3 sample(s)" in error.message
    assert "non-unique" in error.message  # the validator's own words
    assert [a.outcome for a in trace.attempts] == ["resampled", "resampled", "rejected"]
    assert len({r.params.seed for r in llm.seen}) == 3  # every sample drew differently
    assert all(a.completion_tokens == 6 for a in trace.attempts)  # each one booked


async def test_non_strict_invalid_output_is_flagged_after_its_resamples() -> None:
    llm = PerCall("llm", "llm", ["[1, 1]"])
    answer, trace = await run(SINGLE, {"llm": llm}, request(JsonSchema(UNIQUE)))
    assert not answer.valid
    assert answer.checks[0].errors
    assert [a.outcome for a in trace.attempts] == ["resampled", "resampled", "accepted"]


async def test_request_and_route_settings_choose_the_behaviour() -> None:
    llm = PerCall("llm", "llm", ["[1, 1]"])
    no_retry = Route("one", ("llm",), max_resamples=0, on_invalid="error")
    error, trace = await run(no_retry, {"llm": llm}, request(JsonSchema(UNIQUE)))
    assert isinstance(error, InvalidOutputError)
    assert [a.outcome for a in trace.attempts] == ["rejected"]
    answer, _ = await run(no_retry, {"llm": llm}, request(JsonSchema(UNIQUE, strict=True), "flag"))
    assert not answer.valid  # the request's own on_invalid wins over the route's


async def test_escalate_goes_to_the_next_tier_even_when_the_plan_stopped_earlier() -> None:
    """A pre-router sent the request to the SLM only; its invalid output goes up a tier."""
    slm = PerCall("slm", "slm", ["[1, 1]"])
    llm = PerCall("llm", "llm", ["[3, 4]"])
    pre = PreRouter({"bias": 5.0}, threshold=0.5)  # always confident in the SLM
    route = Route("pre", ("slm", "llm"), policy="pre", pre=pre, max_resamples=1)
    answer, trace = await run(route, {"slm": slm, "llm": llm},
                              request(JsonSchema(UNIQUE), on_invalid="escalate"))  # fmt: skip
    assert answer.backend.name == "llm"
    assert answer.valid
    assert [(a.backend, a.outcome) for a in trace.attempts] == [
        ("slm", "resampled"), ("slm", "escalated"), ("llm", "accepted")]  # fmt: skip


async def test_escalate_with_no_tier_left_fails_like_error() -> None:
    llm = PerCall("llm", "llm", ["[1, 1]"])
    error, _ = await run(SINGLE, {"llm": llm}, request(JsonSchema(UNIQUE), "escalate"))
    assert isinstance(error, InvalidOutputError)


async def test_an_output_cut_at_max_tokens_is_returned_as_openai_does() -> None:
    llm = PerCall("llm", "llm", ["[1, "], finish="length")
    answer, trace = await run(SINGLE, {"llm": llm}, request(JsonSchema(UNIQUE, strict=True)))
    assert not answer.valid
    assert answer.result.choices[0].finish_reason == "length"
    assert [a.outcome for a in trace.attempts] == ["accepted"]


async def test_free_text_is_never_resampled() -> None:
    llm = PerCall("llm", "llm", ["anything"])
    answer, trace = await run(SINGLE, {"llm": llm}, request(NoConstraint(), "error"))
    assert answer.valid
    assert len(trace.attempts) == 1


async def test_a_strict_tool_call_that_breaks_its_schema_is_refused_naming_tools() -> None:
    tool = ToolSpec("f", {"type": "object", "properties": {"x": UNIQUE}, "required": ["x"]},
                    strict=True)  # fmt: skip
    bad = '{"name": "f", "arguments": {"x": [2, 2]}}'
    llm = PerCall("llm", "llm", [bad])
    error, _ = await run(SINGLE, {"llm": llm}, request(ToolCalls((tool,), mode="required")))
    assert isinstance(error, InvalidOutputError)
    assert error.param == "tools"


# ---- pure parts -------------------------------------------------------------------------------


def test_policy_defaults_to_error_only_for_strict_requests() -> None:
    strict, loose = JsonSchema(UNIQUE, strict=True), JsonSchema(UNIQUE)
    assert invalid_policy(strict, None, None) == "error"
    assert invalid_policy(loose, None, None) == "flag"
    assert invalid_policy(loose, None, "escalate") == "escalate"
    assert invalid_policy(strict, "flag", "escalate") == "flag"


def test_strictness_of_each_constraint() -> None:
    strict_tool = ToolSpec("f", strict=True)
    assert promised_strict(ToolCalls((ToolSpec("g"), strict_tool)))
    assert not promised_strict(ToolCalls((ToolSpec("g"),)))
    assert promised_strict(ToolCalls((ToolSpec("g"),), final=JsonSchema(UNIQUE, strict=True)))
    assert not promised_strict(JsonObject())
    assert not promised_strict(Regex("a+"))


def test_resample_request_changes_only_seed_and_temperature() -> None:
    base = request(JsonSchema(UNIQUE))
    warm = replace_params(base, temperature=1.2)
    assert resample_request(warm, 1).params.temperature == 1.2  # already warm enough
    first, second = resample_request(base, 1), resample_request(base, 2)
    assert first.params.seed != second.params.seed != base.params.seed
    assert first.messages == base.messages
    assert first.constraint is base.constraint
    unseeded = replace_params(base, seed=None)
    assert resample_request(unseeded, 1).params.seed == resample_request(unseeded, 1).params.seed


def replace_params(req: GenerationRequest, **changes: Any) -> GenerationRequest:
    from dataclasses import replace

    return replace(req, params=replace(req.params, **changes))


def test_bad_on_invalid_is_a_400_naming_the_field() -> None:
    with pytest.raises(InvalidRequestError, match="on_invalid must be one of flag, error"):
        parse_on_invalid("retry")


def test_a_held_output_is_decided_whole_even_when_streaming() -> None:
    route = Route("auto", ("slm", "llm"), policy="cascade")
    assert commit_window(route, final=True, fallback=False, streaming=True) == 0
    assert commit_window(route, final=True, fallback=False, streaming=True, hold=True) is None
    assert commit_window(route, final=False, fallback=False, streaming=True, hold=True) is None


def test_route_checks_its_structured_output_settings() -> None:
    with pytest.raises(ValueError, match="on_invalid"):
        Route("r", ("a",), on_invalid="retry")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="grammar_engine"):
        Route("r", ("a",), grammar_engine="outlines")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_resamples"):
        Route("r", ("a",), max_resamples=99)


async def test_a_resample_is_not_counted_as_a_fallback() -> None:
    from router.router import request_record

    llm = PerCall("llm", "llm", ["[1, 1]", "[1, 2]"])
    req = request(JsonSchema(UNIQUE, strict=True))
    answer, trace = await run(SINGLE, {"llm": llm}, req)
    assert answer.fallback_reason is None
    record = request_record(trace, req, answer=answer)
    assert (record.fallback, record.fallback_reason) == (False, None)
    assert record.schema_valid is True
    assert record.cost_usd == pytest.approx(sum(a.cost_usd for a in trace.attempts))
