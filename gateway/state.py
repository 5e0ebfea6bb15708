"""State shared by the HTTP handlers: config, router, ledger, in-flight counts, and how a finished
or failed request is written to the ledger and metrics."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from decoding.backend import Backend
from decoding.types import GenerationRequest
from gateway.config import GatewayConfig
from gateway.guard import KeySlots, bearer_key
from gateway.metrics import GatewayMetrics
from router.energy import EnergyMeter
from router.ledger import Ledger
from router.route import Route
from router.router import Answer, Router, Trace, request_record
from router.shadow import ShadowRunner
from schemas.errors import OverloadedError, SlmgateError

log = logging.getLogger(__name__)


def error_response(exc: SlmgateError) -> JSONResponse:
    """The OpenAI error body; 429/503 say when to retry (the error's own estimate, else 5 s)."""
    headers = None
    if exc.status in (429, 503):
        wait = exc.retry_after if exc.retry_after is not None else 5.0
        headers = {"Retry-After": str(max(1, math.ceil(wait)))}
    return JSONResponse(exc.to_body(), status_code=exc.status, headers=headers)


class Gateway:
    """State shared by the handlers: config, router, ledger, in-flight counts."""

    def __init__(
        self,
        config: GatewayConfig,
        router: Router | None,
        ledger: Ledger | None,
        metrics: GatewayMetrics,
    ):
        self.config = config
        self.router = router
        self.ledger = ledger
        self.metrics = metrics
        self.in_flight = 0
        self.load_error: str | None = None
        self.callers = KeySlots(lambda: self.config.limits.max_concurrent_per_key)
        self.shadows: ShadowRunner | None = None  # created with the first shadow answer
        if router is not None:
            self.attach_memory(router)

    def load_models(self) -> None:
        """Load every configured model (blocking; runs on a background thread)."""
        from decoding.grammar_compile import GrammarLimits
        from decoding.models import build_backend

        try:
            cache = None if self.config.cache_dir is None else Path(self.config.cache_dir)
            limits = self.config.limits
            grammar = GrammarLimits(
                compile_timeout_s=limits.grammar_compile_timeout_s,
                cache_bytes=limits.grammar_cache_bytes,
                max_schema_depth=limits.max_json_depth,
            )
            backends: dict[str, Backend] = {}
            try:
                for m in self.config.models:
                    backends[m.name] = build_backend(
                        m, cache, grammar_limits=grammar, max_prompt_tokens=limits.max_prompt_tokens
                    )
            except BaseException:
                for built in backends.values():  # a launched server must not outlive the load
                    if (close := getattr(built, "close", None)) is not None:
                        close()
                raise
            routes = {r.name: r for r in self.config.routes}
            router = Router(backends, routes, EnergyMeter())
            self.attach_memory(router)
            self.router = router
            log.info("ready: models %s, routes %s", sorted(backends),
                     [r.name for r in self.config.routes])  # fmt: skip
        except Exception as exc:  # reported by /readyz and every request
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.exception("model loading failed")

    def attach_memory(self, router: Router) -> None:
        """Keep escalation memory in the ledger's database; without a ledger, or while it is
        down, routes keep their examples in memory only."""
        if self.ledger is None or not any(r.memory.enabled for r in router.routes.values()):
            return
        try:
            router.use_memory_store(self.ledger.memory_store())
        except Exception:
            log.exception("escalation memory: the ledger database is unavailable; not persisted")

    def enter(self) -> None:
        """Count one more request in flight (the overload check and /metrics read it)."""
        self.in_flight += 1
        self.metrics.set_queue_depth("gateway", self.in_flight)

    def leave(self) -> None:
        self.in_flight -= 1
        self.metrics.set_queue_depth("gateway", self.in_flight)

    @contextmanager
    def slot(self) -> Iterator[None]:
        """Count a request in flight while the block runs."""
        self.enter()
        try:
            yield
        finally:
            self.leave()

    def record(
        self,
        trace: Trace,
        req: GenerationRequest,
        *,
        answer: Answer | None = None,
        error: BaseException | None = None,
        stream: bool = False,
    ) -> None:
        """Write the request and its attempts to the ledger. Never raises: a ledger outage is
        logged and counted by the ledger itself, not turned into an error response."""
        try:
            record = request_record(trace, req, answer=answer, error=error, stream=stream)
            if self.ledger is not None:
                self.ledger.record(record)
            self.metrics.observe_request(record)
            for attempt in record.attempts:
                if attempt.outcome == "error":
                    kind = (attempt.error or "error").split(":", 1)[0]
                    self.metrics.backend_error(attempt.backend, kind)
            if answer is not None and self.router is not None:
                route = self.router.routes.get(trace.route)
                if route is not None and route.policy == "shadow":
                    self.shadow_runner().submit(route, req, answer, trace)
            for name, backend in (self.router.backends if self.router else {}).items():
                breaker = getattr(backend, "breaker", None)
                if breaker is not None:
                    self.metrics.set_breaker_state(name, breaker.state)
        except Exception:
            log.exception("could not build the ledger record for %s", trace.request_id)

    def servers(self) -> dict[str, dict[str, Any]]:
        """The servers the gateway launched (``kind: vllm`` with ``launch``), by backend, and
        their state in ``/metrics``: what ``/readyz`` and ``slmgate models --url`` show."""
        out: dict[str, dict[str, Any]] = {}
        for name, backend in (self.router.backends if self.router else {}).items():
            supervisor = getattr(backend, "supervisor", None)
            if supervisor is None:
                continue
            status = supervisor.status()
            self.metrics.set_server_status(name, status.state.value, status.restarts)
            out[name] = {**dataclasses.asdict(status), "state": status.state.value}
        return out

    def shadow_runner(self) -> ShadowRunner:
        """The background runner of shadow answers (``policy: shadow``), made on first use."""
        if self.shadows is None:
            router = self.ready_router()

            async def run(route: Route, req: GenerationRequest, trace: Trace) -> Answer:
                plan = await router.plan_async(route, req, trace)
                return await router.complete(plan, req, trace)

            async def label(task_id: str, agreed: bool) -> None:
                if self.ledger is not None:
                    await asyncio.to_thread(self.ledger.set_outcome, task_id, agreed)

            self.shadows = ShadowRunner(
                run, self.record, label, self.config.limits.max_shadow_pending
            )
        return self.shadows

    def ready_router(self) -> Router:
        if self.router is None:
            if self.load_error:
                raise SlmgateError(f"models failed to load: {self.load_error}")
            raise OverloadedError("models are still loading; retry shortly")
        return self.router

    def caller(self, request: Request) -> str:
        """Who a request counts against for ``max_concurrent_per_key``: its API key (hashed, so
        keys are not kept around in the clear) or, on an open gateway, its client address."""
        key = bearer_key(request.headers.get("authorization", ""))
        if self.config.api_keys and key:
            return "key:" + hashlib.sha256(key.encode()).hexdigest()[:16]
        return "ip:" + (request.client.host if request.client else "unknown")
