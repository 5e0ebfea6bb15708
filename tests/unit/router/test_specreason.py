"""The ``specreason`` policy with scripted tiers: who writes each step, what the judge's digits
decide, what the caller receives, and what the trace books."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from typing import Any

import pytest

from decoding.backend import BackendInfo, FinishEvent
from decoding.constraint import JsonObject, Regex
from decoding.types import GenerationRequest, SamplingParams, TokenEvent, TopLogprob
from router.router import Route, Router, Trace, request_record
from spec.specreason import SpecReasonConfig, digit_score, judge_messages

SEP = SpecReasonConfig().separator


class StepWriter:
    """Writes ``steps[k]`` when the answer so far holds ``k`` steps (one token per word); the
    last step ends the turn. As a judge (a digits grammar) it answers with ``scores[k]``'s
    distribution for the ``k``-th step it is shown."""

    supports_continuation = True

    def __init__(self, name: str, steps: list[str], scores: list[dict[str, float]] | None = None):
        self.info = BackendInfo(name, name, f"scripted-{name}", 4096, True, True,
                                price_in_per_mtok=1.0, price_out_per_mtok=2.0)  # fmt: skip
        self.steps, self.scores = steps, scores or []
        self.ready = True
        self.written: list[str] = []  # continue_text of every step request
        self.judged = 0

    def prepare(self, req: GenerationRequest) -> str:
        return "prepared"

    async def generate(
        self, req: GenerationRequest, prepared: Any = None
    ) -> AsyncIterator[TokenEvent | FinishEvent]:
        await asyncio.sleep(0)
        if isinstance(req.constraint, Regex):  # judging
            dist = self.scores[self.judged]
            self.judged += 1
            top = tuple(TopLogprob(ord(d), d, math.log(p)) for d, p in dist.items())
            best = max(dist, key=lambda d: dist[d])
            yield TokenEvent(0, ord(best), best, math.log(dist[best]), 0.5, 1.0, False, top)
            yield FinishEvent(0, "stop", "", 30)
            return
        self.written.append(req.continue_text)
        done = req.continue_text.count(SEP)
        final = done + 1 >= len(self.steps) or SEP not in req.params.stop
        text = self.steps[min(done, len(self.steps) - 1)] if not final else " ".join(
            self.steps[done:])  # fmt: skip
        words = text.split(" ")
        for i, word in enumerate(words[: req.params.max_tokens]):
            yield TokenEvent(0, i, word if i == 0 else " " + word, -0.1, 0.1, 1.0, False)
        cut = len(words) > (req.params.max_tokens or 10**9)
        stop = None if final or cut else SEP
        yield FinishEvent(0, "length" if cut else "stop", "", 20, stop_string=stop)


def request(max_tokens: int | None = 200, constraint: Any = None, n: int = 1) -> GenerationRequest:
    from decoding.constraint import NoConstraint

    return GenerationRequest(
        ({"role": "user", "content": "What is 2 + 3 * 4?"},),
        SamplingParams(temperature=0.0, max_tokens=max_tokens, n=n),
        constraint or NoConstraint(), request_id="r1", task_id="t1",
    )  # fmt: skip


def route(**config: Any) -> Route:
    return Route("reason", ("slm", "llm"), policy="specreason",
                 specreason=SpecReasonConfig(**config))  # fmt: skip


async def run(router: Router, rt: Route, req: GenerationRequest) -> tuple[Any, Trace]:
    trace = Trace(req.request_id, rt.name, req.task_id)
    plan = router.plan(rt, req, trace)
    return await router.complete(plan, req, trace), trace


SLM_STEPS = ["3 * 4 = 12.", "2 + 12 = 15.", "The answer is 15."]
LLM_STEPS = ["3 * 4 = 12.", "2 + 12 = 14.", "The answer is 14."]
SURE, UNSURE = {"9": 0.9, "8": 0.1}, {"2": 0.7, "9": 0.3}


async def test_kept_and_rewritten_steps_make_the_answer() -> None:
    slm = StepWriter("slm", SLM_STEPS)
    llm = StepWriter("llm", LLM_STEPS, scores=[SURE, UNSURE])
    answer, trace = await run(Router({"slm": slm, "llm": llm}, {}), route(), request())
    # step 1 kept (8.9), step 2 rewritten (2*0.7 + 9*0.3 = 4.1 < 7), the final one by the LLM
    assert answer.result.choices[0].text == "3 * 4 = 12.\n2 + 12 = 14.\nThe answer is 14."
    assert answer.backend.name == "llm"
    steps = answer.reasoning["steps"]
    assert [s["author"] for s in steps] == ["slm", "llm", "llm"]
    assert steps[0]["score"] == pytest.approx(8.9)
    assert steps[1]["score"] == pytest.approx(4.1)
    assert (answer.reasoning["judged"], answer.reasoning["kept"]) == (2, 1)
    outcomes = [(a.backend, a.outcome, a.fallback_reason) for a in trace.attempts]
    assert outcomes == [
        ("slm", "accepted", None), ("llm", "judge", None),
        ("slm", "escalated", "low_score"), ("llm", "judge", None), ("llm", "accepted", None),
        ("slm", "escalated", "final_step"), ("llm", "accepted", None),
    ]
    assert trace.attempts[1].signals["step_score"] == pytest.approx(8.9)
    # each step continues the steps kept before it
    assert llm.written == ["3 * 4 = 12.\n", "3 * 4 = 12.\n2 + 12 = 14.\n"]
    record = request_record(trace, request(), answer=answer)
    assert record.completion_tokens == 5 + 5 + 4  # the kept steps' tokens (one per word)
    assert record.cost_usd == pytest.approx(sum(a.cost_usd for a in trace.attempts))


async def test_final_by_slm_keeps_a_well_scored_last_step() -> None:
    slm = StepWriter("slm", SLM_STEPS)
    llm = StepWriter("llm", LLM_STEPS, scores=[SURE, SURE, SURE])
    answer, trace = await run(Router({"slm": slm, "llm": llm}, {}), route(final_by="slm"),
                              request())  # fmt: skip
    assert answer.result.choices[0].text == SEP.join(SLM_STEPS)
    assert answer.backend.name == "slm"  # every step was the small tier's
    assert answer.fallback_reason is None
    assert [a.outcome for a in trace.attempts].count("judge") == 3
    assert llm.written == []


async def test_step_budget_spent_the_top_tier_finishes_alone() -> None:
    slm = StepWriter("slm", SLM_STEPS)
    llm = StepWriter("llm", LLM_STEPS, scores=[SURE])
    answer, _ = await run(Router({"slm": slm, "llm": llm}, {}), route(max_steps=1), request())
    assert answer.result.choices[0].text == "3 * 4 = 12.\n2 + 12 = 14. The answer is 14."
    assert [s["author"] for s in answer.reasoning["steps"]] == ["slm", "llm"]


async def test_max_tokens_ends_the_answer_with_length() -> None:
    slm = StepWriter("slm", SLM_STEPS)
    llm = StepWriter("llm", LLM_STEPS, scores=[SURE, SURE])
    answer, _ = await run(Router({"slm": slm, "llm": llm}, {}), route(), request(max_tokens=6))
    assert answer.result.choices[0].finish_reason == "length"
    assert answer.result.completion_tokens <= 6


async def test_streaming_sends_each_kept_step_and_ends_once() -> None:
    slm = StepWriter("slm", SLM_STEPS)
    llm = StepWriter("llm", LLM_STEPS, scores=[SURE, SURE])
    router = Router({"slm": slm, "llm": llm}, {})
    req = request()
    trace = Trace(req.request_id, "reason", req.task_id)
    plan = router.plan(route(), req, trace)
    events = [e async for e in router.stream(plan, req, trace)]
    text = "".join(e.text for e in events)
    assert text == "3 * 4 = 12.\n2 + 12 = 15.\nThe answer is 14."
    assert sum(isinstance(e, FinishEvent) for e in events) == 1
    assert trace.answer is not None
    assert trace.answer.result.choices[0].text == text


async def test_structured_requests_go_to_the_top_tier_alone() -> None:
    slm = StepWriter("slm", SLM_STEPS)
    llm = StepWriter("llm", ['{"a": 1}'])
    answer, trace = await run(Router({"slm": slm, "llm": llm}, {}), route(),
                              request(constraint=JsonObject()))  # fmt: skip
    assert answer.backend.name == "llm"
    assert [a.backend for a in trace.attempts] == ["llm"]


def test_a_route_over_a_tier_that_cannot_continue_is_refused() -> None:
    class Remote(StepWriter):
        supports_continuation = False

    with pytest.raises(ValueError, match="specreason needs tiers"):
        Router({"slm": Remote("slm", []), "llm": StepWriter("llm", [])}, {"reason": route()})


def test_digit_score_reads_the_expected_digit_and_ignores_other_tokens() -> None:
    assert digit_score([("9", math.log(0.9)), ("8", math.log(0.1))]) == pytest.approx(8.9)
    assert digit_score([(" 7", 0.0), ("seven", 0.0)]) == pytest.approx(7.0)
    assert digit_score([]) is None


def test_judge_prompt_holds_the_problem_the_steps_and_the_new_step() -> None:
    messages = judge_messages([{"role": "system", "content": "be brief"},
                               {"role": "user", "content": "What is 2 + 3 * 4?"}],
                              ["3 * 4 = 12."], "2 + 12 = 15.", "\n")  # fmt: skip
    assert messages[0]["role"] == "system"
    user = messages[1]["content"]
    assert "What is 2 + 3 * 4?" in user
    assert "Solution so far:\n3 * 4 = 12." in user
    assert "New step:\n2 + 12 = 15." in user


def test_config_is_checked() -> None:
    with pytest.raises(ValueError, match="threshold"):
        SpecReasonConfig(threshold=12)
    with pytest.raises(ValueError, match="separator"):
        SpecReasonConfig(separator="")
    with pytest.raises(ValueError, match="final_by"):
        SpecReasonConfig(final_by="nobody")  # type: ignore[arg-type]


async def test_a_step_cut_at_step_tokens_is_a_long_step_not_the_end() -> None:
    slm = StepWriter("slm", SLM_STEPS)
    llm = StepWriter("llm", LLM_STEPS, scores=[SURE, SURE, SURE])
    answer, _ = await run(Router({"slm": slm, "llm": llm}, {}),
                          route(step_tokens=2, final_by="slm"), request())  # fmt: skip
    # each cut step was judged and the next went on from it; the writer then ended its turn
    # with an empty last step, kept without a judgement
    assert answer.result.choices[0].text == "3 *\n2 +\nThe answer\n"
    assert answer.result.choices[0].finish_reason == "stop"
    assert answer.reasoning["judged"] == 3


async def test_a_rewritten_step_verifies_the_small_step_as_its_draft() -> None:
    class Verifying(StepWriter):
        supports_draft_hint = True

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.hints: list[str] = []

        async def generate(self, req: GenerationRequest, prepared: Any = None
                           ) -> AsyncIterator[TokenEvent | FinishEvent]:  # fmt: skip
            if not isinstance(req.constraint, Regex):
                self.hints.append(req.draft_hint)
            async for event in super().generate(req, prepared):
                yield event

    slm = StepWriter("slm", SLM_STEPS)
    llm = Verifying("llm", LLM_STEPS, scores=[SURE, UNSURE])
    _, trace = await run(Router({"slm": slm, "llm": llm}, {}), route(), request())
    assert llm.hints == ["2 + 12 = 15.", "The answer is 15."]  # the rejected and the final step
    rewrites = [a for a in trace.attempts if a.backend == "llm" and a.outcome == "accepted"]
    assert [a.hint_mode for a in rewrites] == ["verified", "verified"]

    plain = StepWriter("llm", LLM_STEPS, scores=[SURE, UNSURE])  # cannot verify: says so
    _, trace = await run(Router({"slm": StepWriter("slm", SLM_STEPS), "llm": plain}, {}),
                         route(), request())  # fmt: skip
    rewrites = [a for a in trace.attempts if a.backend == "llm" and a.outcome == "accepted"]
    assert [a.hint_mode for a in rewrites] == ["regenerated", "regenerated"]


async def test_a_judge_that_fails_keeps_the_step_and_books_the_error() -> None:
    from schemas.errors import UpstreamError

    class FailingJudge(StepWriter):
        async def generate(self, req: GenerationRequest, prepared: Any = None
                           ) -> AsyncIterator[TokenEvent | FinishEvent]:  # fmt: skip
            if isinstance(req.constraint, Regex):
                raise UpstreamError("judge down")
            async for event in super().generate(req, prepared):
                yield event

    slm = StepWriter("slm", SLM_STEPS)
    llm = FailingJudge("llm", LLM_STEPS)
    answer, trace = await run(Router({"slm": slm, "llm": llm}, {}), route(final_by="slm"),
                              request())  # fmt: skip
    assert answer.result.choices[0].text == SEP.join(SLM_STEPS)
    errors = [a for a in trace.attempts if a.outcome == "error"]
    assert len(errors) == 3
    assert all("judge down" in (a.error or "") for a in errors)
