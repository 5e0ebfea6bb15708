"""Route table and orchestration: which tier answers a request, and why.

Policies over a route's tiers (cheapest first):

* ``single``: the first tier answers.
* ``cascade``: try tiers in order; a tier's answer is accepted unless it fails validation
  (schema, executable tool call), scores under the route's confidence threshold, or the tier
  errors with a retryable/server error — then the next tier runs. A caller's 4xx never
  escalates. Early fallback aborts a small-model attempt mid-generation when confidence
  collapses or it starts looping.
* ``pre``: a pre-router scores the request before generation and sends it to the first tier
  or straight to the last one.
* ``pre_cascade``: the pre-router may skip the small tier; otherwise the cascade runs.

Streaming rule for a cascade: structured outputs (JSON, tool calls) are decided before the
first byte (generated whole, then sent). Free text holds back the first
``stream_commit_tokens`` tokens: early fallback may still switch tiers inside that window
without the client noticing; after it the small model's answer is committed and streams to the
end (its final confidence is recorded, not acted on).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from decoding.backend import BackendInfo, FinishEvent, collect
from decoding.constraint import JsonObject, JsonSchema, NoConstraint, ToolCalls
from decoding.types import (
    GenerationRequest,
    GenerationResult,
    Speculation,
    TokenEvent,
)
from decoding.validate import OutputCheck, check_output
from router.confidence import (
    DEFAULT_SIGNAL,
    SIGNALS,
    CollapseWatch,
    EarlyFallback,
    combined_signals,
    signals_of,
)
from router.cost import attempt_cost, counterfactual_cost
from router.energy import EnergyMeter
from router.pre import PreRouter
from router.records import AttemptOutcome, AttemptRecord, RequestRecord
from schemas.errors import (
    ContextLengthError,
    GenerationCancelled,
    NotFoundError,
    OverloadedError,
    SlmgateError,
)

log = logging.getLogger(__name__)

Policy = Literal["single", "cascade", "pre", "pre_cascade"]
POLICIES: tuple[Policy, ...] = ("single", "cascade", "pre", "pre_cascade")


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    tiers: tuple[str, ...]  # backend names, cheapest first
    policy: Policy = "single"
    signal: str = DEFAULT_SIGNAL  # which confidence signal the threshold applies to
    threshold: float = 0.0  # escalate when confidence < threshold (0: only on failures)
    early_fallback: EarlyFallback = field(default_factory=EarlyFallback)
    pre: PreRouter = field(default_factory=PreRouter)
    speculation: Speculation | None = None  # None: each backend's default
    stream_commit_tokens: int = 16

    def __post_init__(self) -> None:
        if not self.tiers:
            raise ValueError(f"route {self.name!r} needs at least one tier")
        if self.policy not in POLICIES:
            raise ValueError(f"route {self.name!r}: policy must be one of {POLICIES}")
        if self.policy != "single" and len(self.tiers) < 2:
            raise ValueError(f"route {self.name!r}: policy {self.policy!r} needs two tiers")
        if self.signal not in SIGNALS:
            raise ValueError(f"route {self.name!r}: unknown signal {self.signal!r}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"route {self.name!r}: threshold must be in [0, 1]")
        if self.stream_commit_tokens < 0:
            raise ValueError(f"route {self.name!r}: stream_commit_tokens must be >= 0")

    @property
    def cascades(self) -> bool:
        return self.policy in ("cascade", "pre_cascade")


@dataclass(slots=True)
class Trace:
    """What happened to one request so far; the gateway writes it to the ledger even when the
    request fails, so no attempt is lost."""

    request_id: str
    route: str
    task_id: str | None = None
    created_at: float = field(default_factory=time.time)
    started: float = field(default_factory=time.perf_counter)
    attempts: list[AttemptRecord] = field(default_factory=list)
    first_token_at: float | None = None  # perf_counter of the first byte of content sent
    pre_score: float | None = None
    answer: Answer | None = None  # set when a stream finished: what it answered with
    streaming_from: str | None = None  # backend whose tokens a stream is sending now

    def mark_first_token(self) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()


@dataclass(slots=True)
class Plan:
    """A request checked against its route: where to start and what was prepared up front."""

    route: Route
    start: int  # tier index to try first
    prepared: dict[int, Any]  # tier index -> the backend's prepare() result
    skip_reason: str | None = None  # why tiers before ``start`` were skipped

    @property
    def single_tier(self) -> bool:
        return not self.route.cascades or self.start == len(self.route.tiers) - 1


@dataclass(slots=True)
class Answer:
    """The accepted attempt with everything the gateway renders."""

    result: GenerationResult
    checks: list[OutputCheck]  # one per choice
    backend: BackendInfo
    route: str
    cost_usd: float = 0.0  # every attempt of the request, escalated ones included
    counterfactual_cost_usd: float = 0.0
    confidence: float | None = None
    signals: dict[str, float] = field(default_factory=dict)
    fallback_reason: str | None = None
    attempts: list[AttemptRecord] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        return all(c.valid for c in self.checks)

    @property
    def executable(self) -> bool | None:
        return executable_of(self.checks, self.result)


def executable_of(checks: Sequence[OutputCheck], result: GenerationResult | None) -> bool | None:
    """Whether the tool calls made can be executed: each names an offered tool and its arguments
    validate. None when no call was made (text answers, or nothing to call)."""
    calls = [c for c in checks if c.parsed is not None and c.parsed.tool_calls]
    if not calls:
        required = any(
            c.parsed is not None and not c.valid and any("requires one" in e for e in c.errors)
            for c in checks
        )
        return False if required else None
    return all(c.valid for c in calls)


def schema_valid_of(req: GenerationRequest, checks: Sequence[OutputCheck]) -> bool | None:
    """Validity where the request asked for structure; None for free text."""
    if isinstance(req.constraint, NoConstraint):
        return None
    return all(c.valid for c in checks)


def is_caller_error(exc: BaseException) -> bool:
    """A 4xx caused by the request itself: retrying it on another tier cannot help."""
    return (
        isinstance(exc, SlmgateError)
        and 400 <= exc.status < 500
        and not exc.retryable
        and not isinstance(exc, ContextLengthError)
    )


def _prompt_tokens(prepared: Any) -> int:
    """Prompt length from a backend's prepared request (an aborted attempt never reports it)."""
    ids = getattr(prepared, "prompt_ids", None)
    return len(ids) if ids is not None else 0


def _valid(run: _Run) -> bool:
    return not run.aborted and all(c.valid for c in run.checks)


def _better(a: _Run, b: _Run) -> bool:
    """Whether escalated answer ``a`` is a better stand-in than ``b``: valid first, then surer."""
    return (_valid(a), a.confidence or 0.0) > (_valid(b), b.confidence or 0.0)


@dataclass(slots=True)
class _Run:
    """One finished or aborted attempt, before the decision."""

    result: GenerationResult  # partial when aborted
    checks: list[OutputCheck]  # empty when aborted
    signals: dict[str, float]
    confidence: float | None
    started: float  # perf_counter when the attempt began
    first_token: float | None  # perf_counter of its first token
    aborted: str | None = None
    energy: tuple[float, bool] | None = None  # (joules, measured?) when a meter is set
    record: AttemptRecord | None = None  # its ledger row, once recorded


class Router:
    def __init__(
        self, backends: dict[str, Any], routes: dict[str, Route], energy: EnergyMeter | None = None
    ):
        """``energy`` measures (or estimates) the energy of every attempt for the ledger."""
        for route in routes.values():
            missing = [t for t in route.tiers if t not in backends]
            if missing:
                raise ValueError(f"route {route.name!r} names unknown backends {missing}")
        self.backends = backends
        self.routes = routes
        self.energy = energy

    # ---- resolving and preparing ---------------------------------------------------------

    def resolve(self, model: str) -> Route:
        """The route for a public model name (a backend name is a route to itself)."""
        route = self.routes.get(model)
        if route is None and model in self.backends:
            route = Route(model, (model,))
        if route is None:
            raise NotFoundError(
                f"The model '{model}' does not exist. Available: "
                f"{', '.join(sorted({*self.routes, *self.backends}))}",
                param="model",
            )
        for tier in route.tiers:
            if not getattr(self.backends[tier], "ready", True):
                raise OverloadedError("models are still loading; retry shortly")
        return route

    def backend(self, route: Route, tier: int) -> Any:
        return self.backends[route.tiers[tier]]

    def plan(self, route: Route, req: GenerationRequest, trace: Trace | None = None) -> Plan:
        """Pick the first tier and prepare it, so request errors (schema, context length)
        surface as 400s before any byte is sent. Blocking: run it in a thread."""
        start, skip = 0, None
        if route.policy in ("pre", "pre_cascade"):
            small_ok, score = route.pre.small_is_enough(req)
            if trace is not None:
                trace.pre_score = score
            if not small_ok:
                start, skip = len(route.tiers) - 1, "pre_router"
        last = len(route.tiers) - 1 if route.cascades or route.policy == "pre" else start
        tier = start
        while True:
            try:
                prepared = self._prepare(self.backend(route, tier), req)
                return Plan(route, tier, {tier: prepared}, skip)
            except ContextLengthError:
                if tier >= last:
                    raise
                tier, skip = tier + 1, "context_length"

    def _prepare(self, backend: Any, req: GenerationRequest) -> Any:
        prepare = getattr(backend, "prepare", None)
        return None if prepare is None else prepare(req)

    def with_speculation(self, route: Route, req: GenerationRequest) -> GenerationRequest:
        """Apply the route's speculation setting unless the request chose one itself."""
        if req.speculation is not None or route.speculation is None:
            return req
        from dataclasses import replace

        return replace(req, speculation=route.speculation)

    # ---- running a plan ------------------------------------------------------------------

    async def complete(self, plan: Plan, req: GenerationRequest, trace: Trace) -> Answer:
        """Run the plan's policy to a final answer. Attempts land in ``trace`` as they finish."""
        route = plan.route
        req = self.with_speculation(route, req)
        last = len(route.tiers) - 1 if route.cascades else plan.start
        reason = plan.skip_reason
        kept: tuple[_Run, BackendInfo] | None = None  # best finished, escalated answer so far
        for tier in range(plan.start, last + 1):
            backend = self.backend(route, tier)
            final = tier == last
            started = time.perf_counter()
            try:
                prepared = plan.prepared.get(tier)
                if tier not in plan.prepared:
                    prepared = await asyncio.to_thread(self._prepare, backend, req)
                run = await self._attempt(route, backend, req, prepared, final)
            except Exception as exc:
                caller = is_caller_error(exc)
                self._record_error(route, backend, trace, exc, not (final or caller), started)
                if isinstance(exc, GenerationCancelled):
                    raise
                if final or caller:
                    if kept is None:
                        raise
                    # A later tier failed: the earlier answer is still an answer.
                    return self._fall_back_to(route, kept, trace, reason)
                reason = "backend_error"
                continue
            decision = None if final else self._escalation_reason(route, req, run)
            self._record_attempt(route, req, backend, trace, run, decision)
            if decision is None:
                if not _valid(run) and kept is not None and _valid(kept[0]):
                    if run.record is not None:  # finished, but not what the caller gets
                        run.record.outcome, run.record.fallback_reason = "escalated", "invalid"
                    return self._fall_back_to(route, kept, trace, reason)
                return self._answer(route, run, backend.info, trace, reason)
            reason = decision
            if not run.aborted and (kept is None or _better(run, kept[0])):
                kept = (run, backend.info)
        raise AssertionError("unreachable: the last tier always decides")

    def _escalation_reason(self, route: Route, req: GenerationRequest, run: _Run) -> str | None:
        if run.aborted:
            return run.aborted
        if not all(c.valid for c in run.checks):
            truncated = any(c.finish_reason == "length" for c in run.result.choices)
            return "truncated" if truncated else "invalid"
        if executable_of(run.checks, run.result) is False:
            return "not_executable"
        if run.confidence is not None and run.confidence < route.threshold:
            return "low_confidence"
        return None

    async def _attempt(
        self, route: Route, backend: Any, req: GenerationRequest, prepared: Any, final: bool
    ) -> _Run:
        """Generate on one tier, watching for early fallback when a later tier exists."""
        watch = not final and route.cascades and route.early_fallback.enabled
        watches: dict[int, CollapseWatch] = {}
        events: list[TokenEvent | FinishEvent] = []
        started = time.perf_counter()
        first: float | None = None
        aborted = None
        meter = self.energy.start() if self.energy is not None else None
        stream = backend.generate(req, prepared)
        try:
            async for event in stream:
                events.append(event)
                if isinstance(event, TokenEvent):
                    first = first or time.perf_counter()
                    if watch:
                        w = watches.setdefault(event.index, CollapseWatch(route.early_fallback))
                        aborted = w.push(event)
                        if aborted:
                            break
        finally:
            await stream.aclose()  # cancels the engine at its next step
        result = collect(events, backend.info.name)
        result.prompt_tokens = result.prompt_tokens or _prompt_tokens(prepared)
        run = self._run_of(route, req, result, started, first, aborted)
        if meter is not None and self.energy is not None:
            run.energy = self.energy.stop(meter)
        return run

    @staticmethod
    def _run_of(
        route: Route,
        req: GenerationRequest,
        result: GenerationResult,
        started: float,
        first: float | None,
        aborted: str | None,
    ) -> _Run:
        sig = combined_signals([signals_of(c.events) for c in result.choices])
        checks = [] if aborted else [check_output(req.constraint, c.text) for c in result.choices]
        return _Run(result, checks, sig, sig.get(route.signal), started, first, aborted)

    # ---- records ---------------------------------------------------------------------------

    @staticmethod
    def _base_record(
        route: Route,
        backend: Any,
        trace: Trace,
        outcome: AttemptOutcome,
        started: float,
        first: float | None,
    ) -> AttemptRecord:
        now = time.perf_counter()
        info: BackendInfo = backend.info
        return AttemptRecord(
            request_id=trace.request_id,
            attempt_no=len(trace.attempts),
            route=route.name,
            tier=info.tier,
            backend=info.name,
            model=info.model,
            started_at=trace.created_at + (started - trace.started),
            latency_s=now - started,
            ttft_s=None if first is None else first - started,
            outcome=outcome,
            task_id=trace.task_id,
        )

    def _record_attempt(
        self,
        route: Route,
        req: GenerationRequest,
        backend: Any,
        trace: Trace,
        run: _Run,
        decision: str | None,
    ) -> None:
        outcome: AttemptOutcome = (
            "accepted" if decision is None else "aborted" if run.aborted else "escalated"
        )
        rec = self._base_record(route, backend, trace, outcome, run.started, run.first_token)
        result = run.result
        if result.choices:
            rec.prompt_tokens = result.prompt_tokens
            rec.completion_tokens = result.completion_tokens
            rec.cost_usd = attempt_cost(backend.info, result.prompt_tokens, rec.completion_tokens)
            specs = [c.spec for c in result.choices if c.spec is not None]
            if specs:
                rec.spec_drafted = sum(s.drafted for s in specs)
                rec.spec_accepted = sum(s.accepted for s in specs)
                rec.spec_steps = sum(s.steps for s in specs)
        if run.energy is not None:
            rec.energy_j, rec.energy_measured = run.energy
        rec.confidence = run.confidence
        rec.signals = {k: v for k, v in run.signals.items() if math.isfinite(v)}
        if trace.pre_score is not None:
            rec.signals["pre_score"] = trace.pre_score
        if run.checks:
            rec.schema_valid = schema_valid_of(req, run.checks)
            rec.executable = executable_of(run.checks, result)
        rec.fallback_reason = decision
        run.record = rec
        trace.attempts.append(rec)

    def _record_error(
        self, route: Route, backend: Any, trace: Trace, exc: BaseException, escalate: bool,
        started: float, first: float | None = None,
    ) -> None:  # fmt: skip
        rec = self._base_record(route, backend, trace, "error", started, first)
        rec.error = f"{type(exc).__name__}: {exc}"[:500]
        rec.fallback_reason = "backend_error" if escalate else None
        trace.attempts.append(rec)
        log.warning("tier %s failed for %s: %s", backend.info.name, trace.request_id, rec.error)

    def _fall_back_to(
        self, route: Route, kept: tuple[_Run, BackendInfo], trace: Trace, reason: str | None
    ) -> Answer:
        """Answer with an earlier, escalated attempt; its ledger row becomes the accepted one."""
        run, info = kept
        if run.record is not None:
            run.record.outcome = "accepted"
        return self._answer(route, run, info, trace, reason)

    def _answer(
        self, route: Route, run: _Run, info: BackendInfo, trace: Trace, reason: str | None
    ) -> Answer:
        top = self.backend(route, len(route.tiers) - 1).info
        cost = sum(a.cost_usd for a in trace.attempts)
        counterfactual = counterfactual_cost(
            top, run.result.prompt_tokens, run.result.completion_tokens
        )
        return Answer(
            run.result, run.checks, info, route.name, cost, counterfactual,
            run.confidence, run.signals, reason, trace.attempts,
        )  # fmt: skip

    # ---- streaming ---------------------------------------------------------------------------

    def streams_tokens(self, plan: Plan, req: GenerationRequest) -> bool:
        """Whether the gateway may send tokens as they come: tool calls never (decided whole),
        JSON only when no later tier can replace it, free text always (see the module doc)."""
        if isinstance(req.constraint, ToolCalls):
            return False
        if isinstance(req.constraint, JsonObject | JsonSchema):
            return plan.single_tier
        return plan.single_tier or req.params.n == 1

    async def stream(
        self, plan: Plan, req: GenerationRequest, trace: Trace
    ) -> AsyncIterator[TokenEvent | FinishEvent]:
        """Token events of the answering tier (free text, or any output on a single tier).

        On a cascade the first ``stream_commit_tokens`` events are held back while early
        fallback watches them; an abort inside the window moves to the next tier unseen."""
        route = plan.route
        req = self.with_speculation(route, req)
        last = len(route.tiers) - 1 if route.cascades else plan.start
        reason = plan.skip_reason
        for tier in range(plan.start, last + 1):
            backend = self.backend(route, tier)
            final = tier == last
            prepared = plan.prepared.get(tier)
            if tier not in plan.prepared:
                prepared = await asyncio.to_thread(self._prepare, backend, req)
            watch = CollapseWatch(route.early_fallback) if not final and route.cascades else None
            held: list[TokenEvent | FinishEvent] = []
            committed = watch is None
            events: list[TokenEvent | FinishEvent] = []
            started = time.perf_counter()
            first: float | None = None
            aborted = None
            meter = self.energy.start() if self.energy is not None else None
            trace.streaming_from = backend.info.name
            source = backend.generate(req, prepared)
            try:
                async for event in source:
                    events.append(event)
                    if isinstance(event, TokenEvent):
                        first = first or time.perf_counter()
                        if watch is not None and not committed:
                            aborted = watch.push(event)
                            if aborted:
                                break
                    if committed:
                        yield event
                        continue
                    held.append(event)
                    tokens = sum(isinstance(e, TokenEvent) for e in held)
                    if tokens >= route.stream_commit_tokens or isinstance(event, FinishEvent):
                        committed = True
                        for e in held:
                            yield e
                        held = []
            except Exception as exc:
                sent = committed and any(isinstance(e, TokenEvent) for e in events)
                stop_here = (
                    sent or final or isinstance(exc, GenerationCancelled) or is_caller_error(exc)
                )
                self._record_error(route, backend, trace, exc, not stop_here, started, first)
                if stop_here:
                    raise
                reason = "backend_error"
                continue
            finally:
                await source.aclose()
            result = collect(events, backend.info.name)
            result.prompt_tokens = result.prompt_tokens or _prompt_tokens(prepared)
            run = self._run_of(route, req, result, started, first, aborted)
            if meter is not None and self.energy is not None:
                run.energy = self.energy.stop(meter)
            if aborted:
                self._record_attempt(route, req, backend, trace, run, aborted)
                reason = aborted
                continue
            self._record_attempt(route, req, backend, trace, run, None)
            trace.answer = self._answer(route, run, backend.info, trace, reason)
            return


def request_record(
    trace: Trace,
    req: GenerationRequest,
    *,
    answer: Answer | None = None,
    error: BaseException | None = None,
    stream: bool = False,
) -> RequestRecord:
    """The ledger row for a finished (or failed) request, from its trace."""
    now = time.perf_counter()
    status, error_type = 200, None
    if error is not None:
        status = error.status if isinstance(error, SlmgateError) else 500
        error_type = error.type if isinstance(error, SlmgateError) else "server_error"
    record = RequestRecord(
        request_id=trace.request_id,
        route=trace.route,
        created_at=trace.created_at,
        latency_s=now - trace.started,
        task_id=trace.task_id,
        status=status,
        error_type=error_type,
        ttft_s=None if trace.first_token_at is None else trace.first_token_at - trace.started,
        cost_usd=sum(a.cost_usd for a in trace.attempts),
        fallback=any(a.fallback_reason for a in trace.attempts),
        fallback_reason=next((a.fallback_reason for a in trace.attempts if a.fallback_reason),
                             None),
        stream=stream,
        expects_json=isinstance(req.constraint, JsonObject | JsonSchema)
        or (isinstance(req.constraint, ToolCalls) and req.constraint.final is not None),
        expects_tools=isinstance(req.constraint, ToolCalls),
        attempts=list(trace.attempts),
    )  # fmt: skip
    if answer is not None and error is None:
        record.tier = answer.backend.tier
        record.backend = answer.backend.name
        record.prompt_tokens = answer.result.prompt_tokens
        record.completion_tokens = answer.result.completion_tokens
        record.counterfactual_cost_usd = answer.counterfactual_cost_usd
        record.schema_valid = schema_valid_of(req, answer.checks)
        record.executable = answer.executable
        if answer.fallback_reason and not record.fallback_reason:
            record.fallback, record.fallback_reason = True, answer.fallback_reason
    return record
