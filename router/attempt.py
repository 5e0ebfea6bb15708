"""One tier's call while it runs: the events it produced so far, how many the caller has seen,
and the ledger row it leaves however it ends (answered, escalated, aborted, failed or cut off),
so an attempt cancelled mid-prefill or mid-stream is booked with what it consumed."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from decoding.backend import BackendInfo, FinishEvent, collect
from decoding.types import GenerationRequest, GenerationResult, TokenEvent
from decoding.validate import OutputCheck, check_output
from router.answer import Trace, executable_of, schema_valid_of
from router.confidence import CollapseWatch, combined_signals, signals_of
from router.cost import attempt_cost, compute_priced
from router.deferral import Kind, answer_features, is_masked, kind_of
from router.energy import EnergyMeter, EnergyToken
from router.records import AttemptOutcome, AttemptRecord
from router.route import Route
from schemas.errors import GenerationCancelled

log = logging.getLogger(__name__)

Event = TokenEvent | FinishEvent


def is_cancellation(exc: BaseException) -> bool:
    """The caller stopped waiting (disconnect, deadline, cancelled task): the attempt is booked
    as cancelled and the exception goes on unchanged, never to another tier."""
    return isinstance(
        exc, GenerationCancelled | asyncio.CancelledError | GeneratorExit | TimeoutError
    ) or not isinstance(exc, Exception)


def prepare_on(backend: Any, req: GenerationRequest) -> Any:
    """The backend's prepared request (tokenised prompt, compiled grammar), None when it has no
    ``prepare``. Blocking: run it in a thread."""
    prepare = getattr(backend, "prepare", None)
    return None if prepare is None else prepare(req)


async def prepare_on_async(backend: Any, req: GenerationRequest) -> Any:
    """``prepare_on`` for the event loop: a backend's ``prepare_async`` (a grammar compile
    awaited on its own pool) when it has one, else ``prepare`` on a worker thread."""
    prepare_async = getattr(backend, "prepare_async", None)
    if prepare_async is not None:
        return await prepare_async(req)
    return await asyncio.to_thread(prepare_on, backend, req)


def grammar_of(prepared: Any) -> Any:
    """A prepared request's compiled grammar (``CompiledConstraint``); None without one (no
    constraint, not prepared yet, or a backend that prepares nothing)."""
    return getattr(prepared, "grammar", None)


def grammar_engine_of(prepared: Any) -> str | None:
    """The engine that compiled a prepared request's grammar; None without one."""
    return getattr(grammar_of(prepared), "engine", None)


def prompt_tokens_of(prepared: Any) -> int:
    """Prompt length from a prepared request: an attempt cut off before its first event never
    reports it, but its prefill was still paid for."""
    ids = getattr(prepared, "prompt_ids", None)
    return len(ids) if ids is not None else 0


def compute_of(events: list[Event], choices: int, latency_s: float, priced: bool) -> float | None:
    """Worker seconds an attempt used: the sum its finished choices reported. An attempt of a
    compute-``priced`` tier cut off before every choice finished (aborted, cancelled, failed) is
    booked at its wall time instead, an upper bound (it may include queueing), so it is never
    free. None when nothing was measured (remote backends)."""
    finishes = [e for e in events if isinstance(e, FinishEvent)]
    measured = sum(e.compute_s for e in finishes)
    if priced and len(finishes) < choices:
        return latency_s
    return measured if measured > 0 else None


def signals_of_result(result: GenerationResult) -> dict[str, float]:
    return combined_signals([signals_of(c.events) for c in result.choices])


@dataclass(slots=True)
class Attempt:
    """One call to one tier. Events are kept as they arrive, so any ending can be booked."""

    route: Route
    backend: Any
    trace: Trace
    final: bool  # no later tier can replace its answer
    energy: EnergyMeter | None = None
    prepared: Any = None
    started: float = field(default_factory=time.perf_counter)
    events: list[Event] = field(default_factory=list)
    tokens: int = 0  # token events so far, all choices
    first: float | None = None  # perf_counter of its first token
    released: int = 0  # events handed to the caller so far
    aborted: str | None = None  # early fallback's reason
    result: GenerationResult | None = None  # set when it finished (or was aborted)
    checks: list[OutputCheck] = field(default_factory=list)  # empty when aborted
    signals: dict[str, float] = field(default_factory=dict)
    confidence: float | None = None
    threshold: float = 0.0  # escalate when confidence < threshold (the route's, or its rule's)
    record: AttemptRecord | None = None  # its ledger row, once booked
    meter: EnergyToken | None = None
    # It re-decodes a tool request as text (the abstention the probe found): deferral judges it
    # as a tool answer that called nothing, not as free text.
    abstention: bool = False
    # An earlier tier's answer was handed over (verified escalation): ``verified`` when this
    # backend checks it as a draft, ``regenerated`` when it cannot; None: nothing handed over.
    hint_mode: Literal["verified", "regenerated"] | None = None

    def deferral_kind(self, req: GenerationRequest) -> Kind:
        return "tools" if self.abstention else kind_of(req.constraint)

    @property
    def info(self) -> BackendInfo:
        info: BackendInfo = self.backend.info
        return info

    @property
    def sent(self) -> bool:
        """Whether the caller has seen any of its output (then nothing can replace it)."""
        return self.released > 0

    @property
    def valid(self) -> bool:
        return self.result is not None and not self.aborted and all(c.valid for c in self.checks)

    async def run(
        self, req: GenerationRequest, window: int | None, *, prepare: bool
    ) -> AsyncGenerator[Event, None]:
        """Generate on the tier, yielding the events the caller may see now.

        ``window``: tokens held back before the output is committed (None: all of it, 0: none).
        Early fallback watches held tokens only: committed output is never switched."""
        if prepare:
            self.prepared = await prepare_on_async(self.backend, req)
        watch = not self.final and self.route.cascades and self.route.early_fallback.enabled
        if watch and not req.incremental:  # early fallback reads tokens as they come
            req = replace(req, incremental=True)
        watches: dict[int, CollapseWatch] = {}
        committed = window == 0
        if self.energy is not None and self.info.device != "remote":
            # A remote tier's energy is spent on its server, not in this process's CPU time or
            # on this machine's counters: not metered here (the ledger's energy stays NULL).
            self.meter = self.energy.start()
        source = self.backend.generate(req, self.prepared)
        try:
            async for event in source:
                self.events.append(event)
                if isinstance(event, TokenEvent):
                    self.tokens += 1
                    self.first = self.first or time.perf_counter()
                    if watch and not committed:
                        rule = self.route.early_fallback
                        self.aborted = watches.setdefault(event.index, CollapseWatch(rule)).push(
                            event
                        )
                        if self.aborted:
                            break
                committed = committed or (window is not None and self.tokens >= window)
                if committed:
                    for held in self.release():
                        yield held
        finally:
            await source.aclose()  # cancels the engine at its next step
        self.finish(req)

    def release(self) -> Iterator[Event]:
        """The events not handed to the caller yet; each counts as sent once taken."""
        while self.released < len(self.events):
            self.released += 1
            yield self.events[self.released - 1]

    def consumed(self) -> GenerationResult:
        """What it generated so far, with the prompt it was given."""
        result = collect(self.events, self.info.name)
        result.prompt_tokens = result.prompt_tokens or prompt_tokens_of(self.prepared)
        return result

    def finish(self, req: GenerationRequest) -> None:
        """Fold the events into a result, its checks and confidence."""
        self.result = self.consumed()
        if not self.aborted:
            self.checks = [check_output(req.constraint, c.text) for c in self.result.choices]
        self.signals = signals_of_result(self.result)
        self.confidence = self.signals.get(self.route.signal)
        self.threshold = self.route.threshold
        if self.aborted:
            return
        per_choice = self.features(req)
        if per_choice:
            self.signals.update(per_choice[0])
        rule, kind = self.route.deferral, self.deferral_kind(req)
        if rule is not None and per_choice and rule.covers(kind):
            # The least likely choice decides (n > 1); a rule replaces the single signal.
            self.confidence = min(rule.p_success(kind, f) or 0.0 for f in per_choice)
            self.signals["deferral"] = self.confidence
            self.threshold = rule.threshold(kind)

    def features(self, req: GenerationRequest) -> list[dict[str, float]]:
        """The deferral features of each choice (``router.deferral``)."""
        assert self.result is not None
        masked = is_masked(req.constraint, req.guided, embedded=self.info.compute_cores > 0)
        out = []
        for choice, check in zip(self.result.choices, self.checks, strict=True):
            calls = check.parsed.tool_calls if check.parsed is not None else ()
            out.append(
                answer_features(
                    choice.events, masked=masked, valid=check.valid,
                    call_arguments=[json.loads(c.arguments) for c in calls] or None,
                    messages=req.messages,
                    tools_offered=self.deferral_kind(req) == "tools",
                )
            )  # fmt: skip
        return out

    def book(
        self,
        outcome: AttemptOutcome,
        req: GenerationRequest,
        *,
        reason: str | None = None,
        error: BaseException | None = None,
    ) -> AttemptRecord:
        """Append its ledger row to the trace, once (later calls return that row): the tokens it
        consumed up to now, their cost, latency and energy."""
        if self.record is not None:
            return self.record
        if self.meter is not None and self.energy is not None:
            energy: tuple[float, bool] | None = self.energy.stop(self.meter)
        else:
            energy = None
        result = self.result if self.result is not None else self.consumed()
        signals = self.signals if self.result is not None else signals_of_result(result)
        trace, info = self.trace, self.info
        latency = time.perf_counter() - self.started
        compute_s = compute_of(self.events, req.params.n, latency, compute_priced(info))
        rec = AttemptRecord(
            request_id=trace.request_id,
            attempt_no=len(trace.attempts),
            route=self.route.name,
            tier=info.tier,
            backend=info.name,
            model=info.model,
            started_at=trace.created_at + (self.started - trace.started),
            latency_s=latency,
            ttft_s=None if self.first is None else self.first - self.started,
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            cost_usd=attempt_cost(
                info, result.prompt_tokens, result.completion_tokens, compute_s or 0.0
            ),
            compute_s=compute_s,
            confidence=(
                self.confidence if self.result is not None else signals.get(self.route.signal)
            ),
            signals={k: v for k, v in signals.items() if math.isfinite(v)},
            outcome=outcome,
            fallback_reason=reason,
            task_id=trace.task_id,
            grammar_engine=grammar_engine_of(self.prepared),
        )
        specs = [c.spec for c in result.choices if c.spec is not None]
        if specs:
            rec.spec_drafted = sum(s.drafted for s in specs)
            rec.spec_accepted = sum(s.accepted for s in specs)
            rec.spec_steps = sum(s.steps for s in specs)
        hints = [c.hint for c in result.choices if c.hint is not None]
        if self.hint_mode == "verified" or hints:
            rec.hint_mode = "verified"
            rec.hint_drafted = sum(h.drafted for h in hints)
            rec.hint_reused = sum(h.reused for h in hints)
        elif self.hint_mode is not None:
            rec.hint_mode = self.hint_mode
        if energy is not None:
            rec.energy_j, rec.energy_measured = energy
        if trace.pre_score is not None:
            rec.signals["pre_score"] = trace.pre_score
        if self.checks:
            rec.schema_valid = schema_valid_of(req, self.checks)
            rec.executable = executable_of(self.checks, result)
        if error is not None:
            rec.error = f"{type(error).__name__}: {error}"[:500]
            level = logging.INFO if outcome == "cancelled" else logging.WARNING
            log.log(level, "tier %s %s for %s: %s", info.name, outcome, trace.request_id,
                    rec.error)  # fmt: skip
        self.record = rec
        trace.attempts.append(rec)
        return rec
