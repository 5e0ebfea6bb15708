"""Route table and orchestration: which tier answers a request, and why.

Policies over a route's tiers (cheapest first):

* ``single``: the first tier answers.
* ``cascade``: try tiers in order; a tier's answer is accepted unless it fails validation
  (schema, executable tool call), scores under the route's confidence threshold, or the tier
  errors with a retryable/server error — then the next tier runs. A caller's 4xx never
  escalates. If the last tier fails or is invalid, a valid earlier answer is returned. Early
  fallback aborts a small-model attempt mid-generation when confidence collapses or it starts
  looping.
* ``pre``: a pre-router scores the request before generation and sends it to the first tier
  or straight to the last one.
* ``pre_cascade``: the pre-router may skip the small tier; otherwise the cascade runs.

Streaming rule for a cascade: structured outputs (JSON, tool calls) are decided before the
first byte (generated whole, then sent). Free text holds back the first
``stream_commit_tokens`` tokens: early fallback may still switch tiers inside that window
without the client noticing; after it the answer is committed and streams to the end (its
final confidence is recorded, not acted on). An output that finishes inside the window is
decided as ``complete`` decides it (escalate when invalid or unsure; if the last tier then
fails, the earlier answer is what streams). Both run one loop: ``router.tier_loop``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import replace
from typing import Any

from decoding.backend import FinishEvent
from decoding.constraint import JsonObject, JsonSchema, ToolCalls
from decoding.types import GenerationRequest, TokenEvent
from router.answer import (
    Answer,
    Plan,
    Trace,
    executable_of,
    request_record,
    schema_valid_of,
)
from router.attempt import prepare_on, prepare_on_async
from router.cost import ComputeRate
from router.energy import EnergyMeter
from router.memory import EscalationMemory, MemoryStore, answer_text, with_demonstrations
from router.route import POLICIES, Policy, Route
from router.specreason import fits, run_specreason
from router.tier_loop import is_caller_error, run_tiers
from schemas.errors import ContextLengthError, NotFoundError, OverloadedError

__all__ = [
    "POLICIES",
    "Answer",
    "Plan",
    "Policy",
    "Route",
    "Router",
    "Trace",
    "executable_of",
    "is_caller_error",
    "request_record",
    "schema_valid_of",
]


class Router:
    def __init__(
        self, backends: dict[str, Any], routes: dict[str, Route], energy: EnergyMeter | None = None
    ):
        """``energy`` measures (or estimates) the energy of every attempt for the ledger."""
        for route in routes.values():
            missing = [t for t in route.tiers if t not in backends]
            if missing:
                raise ValueError(f"route {route.name!r} names unknown backends {missing}")
            unable = [t for t in (route.tiers[0], route.tiers[-1])
                      if not getattr(backends[t], "supports_continuation", False)]  # fmt: skip
            if route.policy == "specreason" and unable:
                raise ValueError(
                    f"route {route.name!r}: specreason needs tiers that continue a partial "
                    f"answer (embedded models); {unable} cannot"
                )
        self.backends = backends
        self.routes = routes
        self.energy = energy
        self._memory_store: MemoryStore | None = None
        self._memories: dict[str, EscalationMemory] = {}
        # Measured cost per token of each compute-priced backend (``router.cost.ComputeRate``).
        self.compute_rates: dict[str, ComputeRate] = {}

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
        surface as 400s before any byte is sent. Blocking: servers use ``plan_async``."""
        req = self.with_route_settings(route, req)
        start, skip, last = self._first_tier(route, req, trace)
        requests, shown = self._with_memory(route, req)
        tier = start
        while True:
            try:
                prepared = prepare_on(self.backend(route, tier), requests.get(tier, req))
                return Plan(route, tier, {tier: prepared}, skip, requests, shown)
            except ContextLengthError:
                if tier >= last:
                    raise
                tier, skip = tier + 1, "context_length"

    async def plan_async(
        self, route: Route, req: GenerationRequest, trace: Trace | None = None
    ) -> Plan:
        """``plan`` on the event loop: a grammar compile is awaited without holding a thread."""
        req = self.with_route_settings(route, req)
        start, skip, last = self._first_tier(route, req, trace)
        requests, shown = self._with_memory(route, req)
        tier = start
        while True:
            try:
                backend = self.backend(route, tier)
                prepared = await prepare_on_async(backend, requests.get(tier, req))
                return Plan(route, tier, {tier: prepared}, skip, requests, shown)
            except ContextLengthError:
                if tier >= last:
                    raise
                tier, skip = tier + 1, "context_length"

    @staticmethod
    def _first_tier(
        route: Route, req: GenerationRequest, trace: Trace | None
    ) -> tuple[int, str | None, int]:
        """(first tier, why earlier tiers are skipped, last tier a too-long prompt may reach)."""
        start, skip = 0, None
        if route.policy == "shadow" or (route.policy == "specreason" and not fits(req)):
            top = len(route.tiers) - 1  # specreason: structured or n > 1, the top tier alone
            return top, None, top
        if route.policy in ("pre", "pre_cascade"):
            small_ok, score = route.pre.small_is_enough(req)
            if trace is not None:
                trace.pre_score = score
            if not small_ok:
                start, skip = len(route.tiers) - 1, "pre_router"
        last = len(route.tiers) - 1 if route.cascades or route.policy == "pre" else start
        return start, skip, last

    def use_memory_store(self, store: MemoryStore) -> None:
        """Persist escalation memory in ``store`` and load every memory route's examples now
        (blocking: call it while starting up, not on the event loop)."""
        self._memory_store = store
        self._memories.clear()
        for route in self.routes.values():
            self.memory(route)

    @property
    def memories(self) -> dict[str, EscalationMemory]:
        """The escalation memories made so far, by route."""
        return self._memories

    def memory(self, route: Route) -> EscalationMemory | None:
        """The route's escalation memory: cascades with ``memory.enabled`` only."""
        if not (route.memory.enabled and route.cascades):
            return None
        memory = self._memories.get(route.name)
        if memory is None:
            memory = EscalationMemory(route.name, route.memory, self._memory_store)
            self._memories[route.name] = memory
        return memory

    def _with_memory(
        self, route: Route, req: GenerationRequest
    ) -> tuple[dict[int, GenerationRequest], tuple[str, ...]]:
        """The first tier's request with its demonstrations, and which were shown."""
        memory = self.memory(route)
        examples = memory.recall(req) if memory is not None else []
        if not examples:
            return {}, ()
        return {0: with_demonstrations(req, examples)}, tuple(e.id for e in examples)

    def learn(self, plan: Plan, req: GenerationRequest, answer: Answer) -> None:
        """Keep an escalated request's answer when a later tier gave it and it checks out
        (valid, and executable when it calls tools). Called once the caller has it."""
        memory = self.memory(plan.route)
        if memory is None or answer.fallback_reason is None:
            return
        if answer.backend.name == plan.route.tiers[0] or not answer.valid:
            return
        if answer.executable is False:
            return
        memory.add(req, answer_text(answer.checks[0], answer.result.choices[0].text),
                   time.time())  # fmt: skip

    def with_route_settings(self, route: Route, req: GenerationRequest) -> GenerationRequest:
        """Apply the route's speculation (unless the request chose one) and guided decoding."""
        if req.speculation is None and route.speculation is not None:
            req = replace(req, speculation=route.speculation)
        if not route.guided_decoding:
            req = replace(req, guided=False)
        if req.grammar_engine is None and route.grammar_engine is not None:
            req = replace(req, grammar_engine=route.grammar_engine)
        return req

    # ---- running a plan ------------------------------------------------------------------

    def _tiers(
        self, plan: Plan, req: GenerationRequest, trace: Trace, *, streaming: bool
    ) -> AsyncGenerator[TokenEvent | FinishEvent | Answer, None]:
        backends = [self.backends[name] for name in plan.route.tiers]
        req = self.with_route_settings(plan.route, req)
        if plan.route.policy == "specreason" and plan.start == 0:
            return run_specreason(plan, req, trace, backends, self.energy, streaming=streaming,
                                  rates=self.compute_rates)  # fmt: skip
        return run_tiers(plan, req, trace, backends, self.energy, streaming=streaming,
                         rates=self.compute_rates)  # fmt: skip

    async def complete(self, plan: Plan, req: GenerationRequest, trace: Trace) -> Answer:
        """Run the plan's policy to a final answer. Attempts land in ``trace`` as they end,
        cancelled ones included."""
        answer: Answer | None = None
        async with aclosing(self._tiers(plan, req, trace, streaming=False)) as items:
            async for item in items:
                if isinstance(item, Answer):
                    answer = item
        assert answer is not None, "the tier loop ends with an answer or an error"
        answer.memory_examples = plan.memory_examples
        if self.memory(plan.route) is not None:  # a database write: off the event loop
            routed = self.with_route_settings(plan.route, req)
            await asyncio.to_thread(self.learn, plan, routed, answer)
        return answer

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
    ) -> AsyncGenerator[TokenEvent | FinishEvent, None]:
        """Token events of the answering tier (free text, or any output on a single tier);
        ``trace.answer`` is set when it finished. Close it (``contextlib.aclosing``) when the
        client goes away, so the cut-off attempt is booked before the request is."""
        async with aclosing(self._tiers(plan, req, trace, streaming=True)) as items:
            async for item in items:
                if isinstance(item, Answer):
                    item.memory_examples = plan.memory_examples
                    trace.answer = item
                else:
                    yield item
        if trace.answer is not None and self.memory(plan.route) is not None:
            routed = self.with_route_settings(plan.route, req)
            await asyncio.to_thread(self.learn, plan, routed, trace.answer)
