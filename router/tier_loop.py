"""The one tier loop behind ``Router.complete`` and ``Router.stream``.

``run_tiers`` tries the plan's tiers in order and yields the events the caller may see, then
the ``Answer`` as its last item. ``complete`` runs it with nothing streamed (every output is
decided whole); ``stream`` forwards the events. Both therefore take the same decisions, made by
the small pure functions below:

* ``commit_window``: how much of an attempt is held back before the caller sees it.
* ``escalation_reason`` / ``after_finish``: accept a finished attempt, hand over to the next
  tier, or fall back to a valid earlier answer when the last one is invalid.
* ``wanted_unoffered_tool``: a call in ``auto`` mode whose model, probed without the grammar,
  names a tool nobody offered is decoded again as text (``router.abstain``).
* ``invalid_at_end``: a last-tier output that broke its schema is sampled again, escalated or
  refused as ``router.invalid`` says, never returned silently where validity was promised.
* ``after_error``: on a failure, the next tier, the earlier answer, or the error itself —
  except that when the tier escalated to fails and the only earlier attempt was cut short by
  early fallback, that tier runs once more to its end (an answer beats a 503).

Output the caller has seen is final: it is never replaced, and its confidence is recorded, not
acted on. Every attempt lands in the trace whichever way it ends, a cancellation included.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from dataclasses import replace
from typing import Any, Literal

from decoding.constraint import ToolCalls
from decoding.types import GenerationRequest
from router.abstain import (
    name_boundary,
    probe_due,
    probe_request,
    text_only,
    wanted_name,
    wants_unoffered,
)
from router.answer import Answer, Plan, Trace, executable_of
from router.attempt import Attempt, Event, grammar_of, is_cancellation
from router.cost import ComputeRate, compute_priced, counterfactual_cost
from router.energy import EnergyMeter
from router.invalid import constrained, invalid_policy, resample_request
from router.records import AttemptOutcome
from router.route import Route
from schemas.errors import ContextLengthError, InvalidOutputError, SlmgateError

Step = Literal["accept", "next", "fall_back", "raise"]


def is_caller_error(exc: BaseException) -> bool:
    """A 4xx caused by the request itself: retrying it on another tier cannot help."""
    return (
        isinstance(exc, SlmgateError)
        and 400 <= exc.status < 500
        and not exc.retryable
        and not isinstance(exc, ContextLengthError)
    )


def commit_window(route: Route, *, final: bool, fallback: bool, streaming: bool,
                  hold: bool = False) -> int | None:  # fmt: skip
    """Tokens an attempt holds back before its output is committed to the caller: None holds
    all of it (a whole answer, decided at its end), 0 sends at once (nothing could replace it),
    else the route's ``stream_commit_tokens`` (a later tier, or a kept earlier answer, may).
    ``hold``: the output must be checked whole before the caller sees it (``router.invalid``)."""
    if not streaming or hold:
        return None
    if not route.cascades or (final and not fallback):
        return 0
    return route.stream_commit_tokens


def escalation_reason(route: Route, att: Attempt) -> str | None:
    """Why a finished (or aborted) attempt should hand over to the next tier; None: accept it.
    The last tier, and output the caller has already seen, are never escalated."""
    if att.final or att.sent or att.result is None:
        return None
    if att.aborted:
        return att.aborted
    if not all(c.valid for c in att.checks):
        truncated = any(c.finish_reason == "length" for c in att.result.choices)
        return "truncated" if truncated else "invalid"
    if executable_of(att.checks, att.result) is False:
        return "not_executable"
    if att.confidence is not None and att.confidence < att.threshold:
        return "low_confidence"
    return None


def after_finish(reason: str | None, *, sent: bool, valid: bool, kept_valid: bool) -> Step:
    """A finished attempt: escalate when there is a reason, fall back to the kept earlier answer
    when this (last) one is invalid and that one is valid, else accept."""
    if sent:
        return "accept"
    if reason is not None:
        return "next"
    return "fall_back" if not valid and kept_valid else "accept"


def after_error(*, final: bool, caller: bool, sent: bool, kept: bool) -> Step:
    """A failed attempt: the next tier while one is left and the request is not at fault, else
    an earlier answer when one was kept, else the error. Seen output cannot be replaced."""
    if sent:
        return "raise"
    if not (final or caller):
        return "next"
    return "fall_back" if kept else "raise"


def outcome_of(step: Step, att: Attempt) -> AttemptOutcome:
    if step == "accept":
        return "accepted"
    return "aborted" if att.aborted else "escalated"


def grammar_complete(prepared: object) -> bool:
    """Whether a prepared request's grammar enforces its whole schema (False when unknown: not
    prepared yet, no grammar, or a remote backend)."""
    return bool(getattr(grammar_of(prepared), "complete", False))


def invalid_at_end(att: Attempt, checked: bool) -> bool:
    """A finished, unseen, checked output that broke its schema without being cut short: the
    case ``router.invalid`` resamples, escalates or refuses."""
    if not checked or att.sent or att.aborted or att.result is None or att.valid:
        return False
    return not any(c.finish_reason == "length" for c in att.result.choices)


def invalid_output_error(att: Attempt, req: GenerationRequest, samples: int) -> InvalidOutputError:
    errors = "; ".join(e for c in att.checks for e in c.errors[:2])[:400]
    param = "tools" if isinstance(req.constraint, ToolCalls) else "response_format"
    return InvalidOutputError(
        f"no valid output after {samples} sample(s): the last, from {att.info.name}, broke the "
        f"schema ({errors}); set on_invalid to 'flag' to receive invalid outputs flagged",
        param=param,
    )


async def wanted_unoffered_tool(att: Attempt, req: GenerationRequest, backend: Any, trace: Trace,
                                energy: EnergyMeter | None) -> bool:  # fmt: skip
    """Probe an accepted ``auto``-mode call (``router.abstain``): would the model, unconstrained,
    have named a tool nobody offered? The probe is booked as its own attempt (outcome
    ``probe``); a probe that fails decides nothing."""
    if att.sent or att.result is None or att.aborted or not att.checks:
        return False
    parsed = att.checks[0].parsed
    calls = len(parsed.tool_calls) if parsed is not None else 0
    if not probe_due(req, calls, bool(getattr(backend, "supports_continuation", False))):
        return False
    choice = att.result.choices[0]
    boundary = name_boundary(choice)
    if boundary is None:
        return False
    probe_req = probe_request(req, choice, boundary[0])
    probe = Attempt(att.route, backend, trace, True, energy)
    try:
        async with aclosing(probe.run(probe_req, None, prepare=True)) as events:
            async for _ in events:
                pass
    except Exception as exc:
        if is_cancellation(exc):
            probe.book("cancelled", probe_req, error=exc)
            raise
        probe.book("error", probe_req, error=exc)
        return False
    probe.book("probe", probe_req)
    assert probe.result is not None
    assert isinstance(req.constraint, ToolCalls)
    head = "".join(e.text for e in choice.events)[: boundary[1]]
    name = wanted_name(head, probe.result.choices[0].text)
    return wants_unoffered(name, [t.name for t in req.constraint.tools])


def better(a: Attempt, b: Attempt) -> bool:
    """Whether escalated answer ``a`` is a better stand-in than ``b``: valid first, then surer."""
    return (a.valid, a.confidence or 0.0) > (b.valid, b.confidence or 0.0)


async def run_tiers(
    plan: Plan,
    req: GenerationRequest,
    trace: Trace,
    backends: Sequence[Any],
    energy: EnergyMeter | None = None,
    *,
    streaming: bool,
    rates: dict[str, ComputeRate] | None = None,
) -> AsyncGenerator[Event | Answer, None]:
    """Run ``plan`` to an answer (the last item). ``backends``: one per route tier; ``rates``:
    each compute-priced backend's measured cost per token, updated by every finished attempt
    and read to estimate a compute-priced top tier's counterfactual.

    Streaming, the events before the answer are its output as the caller may see it; an
    attempt's held-back events are released when it is accepted, and a kept earlier answer's
    when the request falls back to it."""
    route = plan.route
    caller_req = req
    reason = plan.skip_reason
    kept: Attempt | None = None  # best finished, escalated attempt so far
    cut_short: int | None = None  # a tier whose attempt early fallback aborted
    checked = constrained(req.constraint)
    policy = invalid_policy(req.constraint, req.on_invalid, route.on_invalid)
    samples = 0  # finished outputs of the last tier that broke their schema
    resampled: dict[int, GenerationRequest] = {}
    abstaining: set[int] = set()  # tiers re-decoding a tool request as text (router.abstain)
    handover: tuple[int, str] | None = None  # (tier, text) of the last escalated answer
    queue = [(tier, tier == plan.last) for tier in range(plan.start, plan.last + 1)]
    # grows when a tier resamples, escalates or reruns (below)
    for position, (tier, final) in enumerate(queue):
        req = resampled.get(tier) or plan.requests.get(tier, caller_req)
        hint = draft_hint_for(route, tier, handover, tier in resampled)
        hint_mode = hint_mode_of(hint, backends[tier])
        if hint_mode == "verified":
            req = replace(req, draft_hint=hint)
        # A resampled (or abstaining, or hinted) tier is prepared again: its request differs
        # from the one the plan prepared (seed and temperature, the constraint, the hint), and
        # engines decode the prepared request.
        fresh = tier in resampled or tier not in plan.prepared or hint_mode == "verified"
        att = Attempt(route, backends[tier], trace, final, energy,
                      None if fresh else plan.prepared[tier])  # fmt: skip
        att.abstention = tier in abstaining
        att.hint_mode = hint_mode
        # Tool calls are sent whole anyway (``Router.streams_tokens``): held, they can still be
        # probed and resampled; JSON is held when its validity is promised but not enforced.
        hold = isinstance(req.constraint, ToolCalls) or (
            checked and policy != "flag" and not grammar_complete(att.prepared)
        )
        window = commit_window(route, final=att.final, fallback=kept is not None,
                               streaming=streaming, hold=hold)  # fmt: skip
        if streaming:
            trace.streaming_from = att.info.name
        failure: Exception | None = None
        try:
            async with aclosing(att.run(req, window, prepare=fresh)) as out:
                async for event in out:
                    yield event
        except Exception as exc:
            if is_cancellation(exc):
                att.book("cancelled", req, error=exc)
                raise
            failure = exc
        except BaseException as exc:  # CancelledError, GeneratorExit (the stream was closed)
            att.book("cancelled", req, error=exc)
            raise
        finally:
            if att.result is None and failure is None:  # cut off some other way: still booked
                att.book("cancelled", req)
        if failure is not None:
            caller = is_caller_error(failure)
            step = after_error(final=att.final, caller=caller, sent=att.sent,
                               kept=kept is not None)  # fmt: skip
            # The tier escalated to is down and no finished answer was kept: the attempt early
            # fallback cut short runs again, to its end, rather than failing the request.
            rerun = step == "raise" and not caller and not att.sent and cut_short is not None
            att.book("error", req, reason="backend_error" if step == "next" or rerun else None,
                     error=failure)  # fmt: skip
            if rerun:
                assert cut_short is not None
                queue.append((cut_short, True))
                cut_short, reason = None, "backend_error"
                continue
            if step == "raise":
                raise failure
            if step == "next":
                reason = "backend_error"
        else:
            why = escalation_reason(route, att)
            step = after_finish(why, sent=att.sent, valid=att.valid,
                                kept_valid=kept is not None and kept.valid)  # fmt: skip
            if step == "accept" and route.abstain_probe and await wanted_unoffered_tool(
                att, req, backends[tier], trace, energy
            ):  # the model meant a tool nobody offered: it answers in text instead
                att.book("resampled", req, reason="unoffered_tool")
                resampled[tier] = text_only(req)
                abstaining.add(tier)
                queue.insert(position + 1, (tier, final))  # now, before any later tier
                continue
            if step == "accept" and invalid_at_end(att, checked):
                samples += 1
                if samples <= route.max_resamples:  # the same tier samples again
                    att.book("resampled", req, reason="invalid")
                    base = plan.requests.get(tier, caller_req)
                    resampled[tier] = resample_request(base, samples)
                    abstaining.discard(tier)  # the caller's request again, sampled anew
                    queue.append((tier, final))  # the same tier: no fallback reason
                    continue
                if policy == "escalate" and tier + 1 < len(backends):
                    att.book("escalated", req, reason="invalid")
                    handover = handover_of(att, tier) or handover
                    queue.append((tier + 1, True))
                    reason = "invalid"
                    continue
                if policy != "flag":
                    att.book("rejected", req, reason="invalid")
                    raise invalid_output_error(att, req, samples)
            invalid = "invalid" if step == "fall_back" else None  # finished, but not used
            att.book(outcome_of(step, att), req, reason=why or invalid)
            observe_rate(rates, att)
            if step == "accept":
                if streaming:
                    for event in att.release():
                        yield event
                yield answer_of(att, trace, backends[-1], reason, rates)
                return
            if step == "next":
                reason = why
                handover = handover_of(att, tier) or handover
                if att.aborted and cut_short is None:
                    cut_short = tier
                if not att.aborted and (kept is None or better(att, kept)):
                    kept = att
        if step == "fall_back":
            assert kept is not None
            assert kept.record is not None
            kept.record.outcome = "accepted"  # the ledger says which answer was used
            if streaming:
                trace.streaming_from = kept.info.name
                for event in kept.release():
                    yield event
            yield answer_of(kept, trace, backends[-1], reason, rates)
            return
    raise AssertionError("unreachable: the last tier always decides")


def handover_of(att: Attempt, tier: int) -> tuple[int, str] | None:
    """An escalated attempt's answer, for the next tier to verify as a draft (one choice only:
    with ``n`` > 1 the choices differ, and none stands for the others). An attempt early
    fallback cut short hands over what it wrote so far."""
    if att.result is None or len(att.result.choices) != 1:
        return None
    text = att.result.choices[0].text
    return (tier, text) if text else None


def draft_hint_for(
    route: Route, tier: int, handover: tuple[int, str] | None, resampling: bool
) -> str:
    """The earlier answer a tier verifies as its draft: a later tier's first attempt after an
    escalation, when the route verifies escalations (a tier sampling again gets none)."""
    if not route.verify_escalation or handover is None or resampling:
        return ""
    from_tier, text = handover
    return text if tier > from_tier else ""


def hint_mode_of(hint: str, backend: Any) -> Literal["verified", "regenerated"] | None:
    """``verified`` when the backend checks a draft hint, ``regenerated`` when it cannot (it
    writes its answer from scratch, and the ledger says so), None when there is no hint."""
    if not hint:
        return None
    return "verified" if getattr(backend, "supports_draft_hint", False) else "regenerated"


def observe_rate(rates: dict[str, ComputeRate] | None, att: Attempt) -> None:
    """Feed a finished attempt of a compute-priced backend into its cost-per-token fit (an
    attempt cut short is charged its wall time, not what its tokens took: left out)."""
    if rates is None or att.aborted or att.record is None or not compute_priced(att.info):
        return
    rec = att.record
    rates.setdefault(att.info.name, ComputeRate()).observe(
        rec.prompt_tokens, rec.completion_tokens, rec.cost_usd
    )


def answer_of(
    att: Attempt, trace: Trace, top: Any, reason: str | None,
    rates: dict[str, ComputeRate] | None = None,
) -> Answer:  # fmt: skip
    """The accepted attempt as an answer; cost counts every attempt, counterfactual prices its
    tokens at the route's top tier. A compute-priced top tier that did not answer is estimated
    from its measured cost per token (``rates``); before it has answered enough requests the
    baseline is unknown, and the counterfactual is the request's own cost, so no saving (or
    loss) is claimed for it."""
    assert att.result is not None
    result = att.result
    cost = sum(a.cost_usd for a in trace.attempts)
    own = att.record.cost_usd if att.backend is top and att.record is not None else None
    rate = None if rates is None else rates.get(top.info.name)
    known = counterfactual_cost(top.info, result.prompt_tokens, result.completion_tokens, own, rate)
    counterfactual = cost if known is None else known
    return Answer(
        result, att.checks, att.info, att.route.name, cost, counterfactual,
        att.confidence, att.signals, reason, trace.attempts,
        counterfactual_estimated=known is not None and own is None and compute_priced(top.info),
    )  # fmt: skip
