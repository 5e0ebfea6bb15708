"""The ``specreason`` policy: the small tier writes each reasoning step, the top tier scores it.

Per step: the first tier continues the answer so far up to the route's step ``separator`` (a
new line by default) or ``step_tokens``; the top tier reads a judging prompt and answers one
digit under a grammar that allows only digits, and the expected digit under its distribution
is the step's score
(``spec.specreason.digit_score``); a step scoring under the route's threshold is written again
by the top tier, from the same point (verifying the small step as its draft, as a verified
escalation does: the step is still the top tier's own, and what it shares with the small one
costs one pass). The step the small tier ends its answer with (an
end-of-turn rather than a blank line) is the final one: with ``final_by: llm`` the top tier
writes it instead. Every call is an attempt in the trace (outcome ``judge`` for the scoring
ones, the score in its signals); the kept steps' tokens are the answer, streamed as each step
is kept.

Requests this policy does not fit (structured outputs, ``n`` > 1) are answered by the top tier
alone; the router sends them there (``Router._first_tier``).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from dataclasses import replace
from typing import Any, Literal

from decoding.backend import FinishEvent, collect
from decoding.constraint import NoConstraint, Regex
from decoding.types import Choice, FinishReason, GenerationRequest, SamplingParams, TokenEvent
from decoding.validate import check_output
from router.answer import Answer, Plan, Trace
from router.attempt import Attempt, Event, is_cancellation
from router.cost import ComputeRate, compute_priced, counterfactual_cost
from router.energy import EnergyMeter
from router.records import AttemptOutcome
from router.tier_loop import hint_mode_of, observe_rate
from spec.specreason import (
    ReasoningTrace,
    Step,
    digit_score,
    joined,
    judge_messages,
)

DIGITS = Regex("[0-9]")


def fits(req: GenerationRequest) -> bool:
    """Whether a request is free-text reasoning this policy can run (one choice, no schema)."""
    return isinstance(req.constraint, NoConstraint) and req.params.n == 1 and not req.tools


def step_request(req: GenerationRequest, steps: Sequence[str], budget: int, final: bool,
                 separator: str) -> GenerationRequest:  # fmt: skip
    """The caller's request continuing the answer after ``steps``: one step (up to the
    ``separator``) within ``budget`` tokens, or with ``final`` the rest of the answer."""
    prefix = joined(steps, separator) + separator if steps else ""
    stops = req.params.stop if final else (*req.params.stop[:3], separator)
    params = replace(req.params, max_tokens=budget, stop=tuple(stops), n=1, token_budget=None)
    return replace(req, params=params, continue_text=prefix, draft_hint="")


def judge_request(req: GenerationRequest, steps: Sequence[str], step: str, separator: str
                  ) -> GenerationRequest:  # fmt: skip
    """One digit from the top tier, its distribution over the digits returned."""
    params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=True, top_logprobs=10)
    return GenerationRequest(
        judge_messages(req.messages, steps, step, separator), params, DIGITS,
        request_id=req.request_id, task_id=req.task_id, speculation="none",
    )  # fmt: skip


async def run_specreason(
    plan: Plan,
    req: GenerationRequest,
    trace: Trace,
    backends: Sequence[Any],
    energy: EnergyMeter | None = None,
    *,
    streaming: bool,
    rates: dict[str, ComputeRate] | None = None,
) -> AsyncGenerator[Event | Answer, None]:
    """Run the policy to an answer (the last item); streaming, each kept step's token events
    come first, as it is kept."""
    route = plan.route
    small, top = backends[0], backends[-1]
    reasoning = ReasoningTrace(route.specreason)
    budget = req.params.max_tokens or req.params.token_budget or top.info.context_length
    kept_events: list[TokenEvent] = []
    prompt_tokens = 0
    finish: FinishReason = "stop"

    async def call(backend: Any, sub: GenerationRequest,
                   hint_mode: Literal["verified", "regenerated"] | None = None) -> Attempt:
        return await _attempt(route, backend, sub, trace, energy, final=backend is top,
                              hint_mode=hint_mode)  # fmt: skip

    cfg = route.specreason
    pending = 0  # separators owed before the next kept text (the step requests stop at them)
    while True:
        left = budget - sum(s.tokens for s in reasoning.steps)
        if left <= 0:
            finish = "length"
            break
        steps = reasoning.texts
        by_top = reasoning.finishing
        draft_req = step_request(req, steps, min(cfg.step_tokens, left), by_top, cfg.separator)
        writer = await call(top if by_top else small, draft_req)
        choice = _only_choice(writer)
        last = ends(choice, left, cfg.separator)
        score: float | None = None
        kept = True
        if by_top or not choice.text.strip():  # the top tier's own, or a blank line: kept
            writer.book("accepted", draft_req)
        elif last and cfg.final_by == "llm":
            writer.book("escalated", draft_req, reason="final_step")
            kept = False
        else:
            step = writer.book("accepted", draft_req)  # booked in the order run; judged next
            score, kept = await judge_step(call, top, judge_request(req, steps, choice.text,
                                                                    cfg.separator), reasoning)
            step.signals["step_score"] = -1.0 if score is None else score
            if not kept:
                step.outcome, step.fallback_reason = "escalated", "low_score"
        observe_rate(rates, writer)
        if not kept:  # the top tier writes this step (the final one: to the end)
            final = last and cfg.final_by == "llm"
            tokens = min(cfg.step_tokens * (8 if final else 1), left)
            rewrite_req = step_request(req, steps, tokens, final, cfg.separator)
            hint_mode = hint_mode_of(choice.text if route.verify_escalation else "", top)
            if hint_mode == "verified":  # the small step as its draft: same step, fewer passes
                rewrite_req = replace(rewrite_req, draft_hint=choice.text)
            writer = await call(top, rewrite_req, hint_mode)
            writer.book("accepted", rewrite_req)
            observe_rate(rates, writer)
            choice = _only_choice(writer)
            last = ends(choice, left, cfg.separator)
        events = list(choice.events)
        pending += 1 if reasoning.steps else 0
        if pending and events:
            events[0] = replace(events[0], text=cfg.separator * pending + events[0].text)
            pending = 0
        prompt_tokens = prompt_tokens or _prompt_tokens(writer)
        reasoning.steps.append(Step("llm" if writer.backend is top else "slm", choice.text,
                                    len(choice.token_ids), score))  # fmt: skip
        kept_events.extend(events)
        if streaming:
            for event in events:
                yield event
        if last:
            finish = choice.finish_reason
            break
    end = FinishEvent(0, finish, "", prompt_tokens)
    if streaming:
        yield end
    yield answer_of(reasoning, [*kept_events, end], req, trace, (small, top), rates)


async def _attempt(
    route: Any, backend: Any, sub: GenerationRequest, trace: Trace, energy: EnergyMeter | None,
    *, final: bool, hint_mode: Literal["verified", "regenerated"] | None,
) -> Attempt:  # fmt: skip
    """One call run to its end; a failed or cut-off one is booked before the error goes on."""
    att = Attempt(route, backend, trace, final, energy)
    att.hint_mode = hint_mode
    try:
        async with aclosing(att.run(sub, None, prepare=True)) as events:
            async for _ in events:
                pass
    except BaseException as exc:
        outcome: AttemptOutcome = "cancelled" if is_cancellation(exc) else "error"
        att.book(outcome, sub, error=exc)
        raise
    return att


async def judge_step(
    call: Any, top: Any, judge: GenerationRequest, reasoning: ReasoningTrace
) -> tuple[float | None, bool]:
    """(score, kept) of one step. A top tier that fails to judge keeps the step unjudged (an
    answer beats an error; the failed attempt is in the ledger); a cancellation goes on."""
    try:
        judged = await call(top, judge)
    except Exception as exc:
        if is_cancellation(exc):
            raise
        return None, True
    score = digit_score(_top_digits(judged))
    judged.signals["step_score"] = -1.0 if score is None else score
    judged.book("judge", judge)
    return score, reasoning.keeps(score)


def ends(choice: Choice, left: int, separator: str) -> bool:
    """Whether a step ends the answer: it stopped at an end of turn or a caller's stop string,
    or used up the request's tokens. A step cut at ``step_tokens`` is a long step, not the end."""
    if choice.finish_reason == "length":
        return len(choice.token_ids) >= left
    return choice.stop_string != separator


def _only_choice(att: Attempt) -> Choice:
    assert att.result is not None, "a finished attempt has its result"
    return att.result.choices[0]


def _prompt_tokens(att: Attempt) -> int:
    return att.result.prompt_tokens if att.result is not None else 0


def _top_digits(att: Attempt) -> list[tuple[str, float]]:
    """The judge's top tokens (text, log-probability) at its one position."""
    if att.result is None or not att.result.choices or not att.result.choices[0].events:
        return []
    event = att.result.choices[0].events[0]
    top = [(t.token, t.logprob) for t in event.top_logprobs]
    return top or [(att.result.choices[0].text, event.logprob)]


def answer_of(
    reasoning: ReasoningTrace, events: list[Event], req: GenerationRequest, trace: Trace,
    tiers: tuple[Any, Any], rates: dict[str, ComputeRate] | None,
) -> Answer:  # fmt: skip
    """The kept steps as one answer, attributed to the top tier when it wrote any of it, else to
    the small one (its counterfactual: the same tokens priced at the top tier)."""
    small, top = tiers
    result = collect(events, top.info.name)
    cost = sum(a.cost_usd for a in trace.attempts)
    wrote = any(s.author == "llm" for s in reasoning.steps)
    rate = None if rates is None else rates.get(top.info.name)
    known = counterfactual_cost(top.info, result.prompt_tokens, result.completion_tokens, None,
                                rate)  # fmt: skip
    summary = reasoning.summary()
    scores = [s for s, _ in reasoning.judged if s is not None]
    signals = {"steps": float(len(reasoning.steps)),
               "step_acceptance": summary["acceptance_rate"] or 0.0}  # fmt: skip
    if scores:
        signals["mean_step_score"] = sum(scores) / len(scores)
    backend = top.info if wrote else small.info
    answer = Answer(
        result, [check_output(req.constraint, result.choices[0].text)], backend,
        trace.route, cost, cost if known is None else known, None, signals,
        "low_score" if any(not k for _, k in reasoning.judged) else None, trace.attempts,
        counterfactual_estimated=known is not None and compute_priced(top.info),
    )  # fmt: skip
    answer.reasoning = summary
    return answer
