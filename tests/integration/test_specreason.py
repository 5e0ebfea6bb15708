"""SpecReason on real models: SmolLM2 (float32) writes steps, Qwen2.5-Coder-0.5B scores them with
a digit under a grammar, and rewrites those it scores low. The answer is the kept steps in
order, each continuing the ones before; every judgement's score is an expected digit."""

from __future__ import annotations

import pytest

from decoding.engine import EmbeddedEngine
from decoding.types import GenerationRequest, SamplingParams
from router.router import Route, Router, Trace, request_record
from spec.specreason import SpecReasonConfig

pytestmark = pytest.mark.slow

PROBLEM = (
    "A shop sells pens at 3 dollars each. Tom buys 4 pens and pays with a 20 dollar bill. "
    "How much change does he get?"
)
SYSTEM = (
    "Solve the math problem step by step. Write each step on its own line, with a blank line "
    "between steps. Finish with a last line of the form '#### <number>'."
)


@pytest.mark.parametrize("threshold", [0.0, 9.0])
async def test_specreason_answers_from_kept_steps(
    slm: EmbeddedEngine, llm: EmbeddedEngine, threshold: float
) -> None:
    route = Route("reason", ("small", "big"), policy="specreason",
                  specreason=SpecReasonConfig(threshold=threshold, step_tokens=48, max_steps=64,
                                              final_by="slm"))  # fmt: skip
    router = Router({"small": slm, "big": llm}, {"reason": route})
    req = GenerationRequest(
        ({"role": "system", "content": SYSTEM}, {"role": "user", "content": PROBLEM}),
        SamplingParams(temperature=0.0, max_tokens=160), request_id="r", task_id="t",
    )  # fmt: skip
    trace = Trace("r", "reason", "t")
    answer = await router.complete(router.plan(route, req, trace), req, trace)

    reasoning = answer.reasoning
    assert reasoning is not None
    steps = reasoning["steps"]
    assert steps
    judges = [a for a in trace.attempts if a.outcome == "judge"]
    assert len(judges) == reasoning["judged"]
    for judge in judges:
        assert judge.backend == llm.info.name
        assert judge.completion_tokens == 1
        assert 0.0 <= judge.signals["step_score"] <= 9.0  # read from the digits' distribution
    if threshold == 0.0:  # every readable score clears 0: the small model writes everything
        assert all(s["author"] == "slm" for s in steps)
        assert answer.backend.name == slm.info.name
    else:  # nothing short of a certain 9 is kept: the large model rewrites every judged step
        assert reasoning["kept"] <= sum(1 for j in judges if j.signals["step_score"] >= 9.0)
        assert any(s["author"] == "llm" for s in steps)
    kept_texts = [a for a in trace.attempts if a.outcome == "accepted"]
    assert len(kept_texts) == len(steps)
    text = answer.result.choices[0].text
    assert text.count(route.specreason.separator) >= len(steps) - 1
    assert answer.result.completion_tokens == sum(s["tokens"] for s in steps)
    record = request_record(trace, req, answer=answer)
    assert record.completion_tokens == answer.result.completion_tokens
    assert record.cost_usd == pytest.approx(sum(a.cost_usd for a in trace.attempts))
