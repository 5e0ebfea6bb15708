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
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import JSONResponse

from decoding.backend import Backend
from decoding.resilience import CircuitBreaker
from decoding.speculative import DrafterPool
from decoding.types import GenerationRequest
from gateway.breaker_sync import BreakerSync
from gateway.config import GatewayConfig
from gateway.guard import KeySlots, bearer_key
from gateway.keys import Caller, KeyDirectory
from gateway.metrics import GatewayMetrics
from gateway.quota import QuotaGate
from gateway.shared_state import SharedState
from router.energy import EnergyMeter
from router.ledger import Ledger
from router.ledger.key_store import ApiKey
from router.records import RequestRecord
from router.route import Route
from router.router import Answer, Router, Trace, request_record
from router.shadow import ShadowRunner
from schemas.errors import OverloadedError, SlmgateError

if TYPE_CHECKING:
    from gateway.learned_sync import LearnedSync
    from gateway.telemetry import Telemetry

log = logging.getLogger(__name__)


def error_response(exc: SlmgateError) -> JSONResponse:
    """The OpenAI error body; 429/503 say when to retry (the error's own estimate, else 5 s)."""
    headers = None
    if exc.status in (429, 503):
        wait = exc.retry_after if exc.retry_after is not None else 5.0
        headers = {"Retry-After": str(max(1, math.ceil(wait)))}
    return JSONResponse(exc.to_body(), status_code=exc.status, headers=headers)


def telemetry_of(config: GatewayConfig) -> Telemetry | None:
    """OpenTelemetry export when an endpoint is configured (config or ``OTEL_EXPORTER_OTLP_*``);
    the SDK is imported only then."""
    import os

    endpoint_set = config.otel_endpoint or any(
        os.environ.get(name)
        for name in ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
    )
    if not endpoint_set:
        return None
    from gateway.telemetry import Telemetry, TelemetryConfig

    settings = TelemetryConfig.from_env(config.otel_endpoint)
    return None if settings is None else Telemetry(settings)


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
        self.shared = SharedState.from_url(
            config.redis_url, config.redis_prefix, on_fallback=metrics.shared_state_fallback
        )
        self.keys = KeyDirectory(
            lambda: self.config.api_keys, None if ledger is None else ledger.key_store()
        )
        self.quotas = QuotaGate(self.shared, None if ledger is None else ledger.key_spend)
        self.breaker_sync = BreakerSync(self.shared, self.breakers)
        self._admitted: dict[str, ApiKey] = {}  # key records seen, for settling their spend
        self._background: set[asyncio.Task[None]] = set()
        self.telemetry = telemetry_of(config)
        self.learned: LearnedSync | None = None  # with redis_url, once the models are loaded
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

    async def share_learning(self) -> None:
        """Once the models are loaded, share what drafters and escalation memories learn with
        the other replicas (``gateway.learned_sync``) until cancelled."""
        import redis.asyncio as aioredis

        from gateway.learned_sync import LearnedSync

        while self.router is None:
            if self.load_error:
                return
            await asyncio.sleep(0.5)
        router = self.router
        pools = {}
        for name, backend in router.backends.items():
            if isinstance(pool := getattr(backend, "drafters", None), DrafterPool):
                pools[name] = pool
        memories = [m for r in router.routes.values() if (m := router.memory(r)) is not None]
        if not pools and not memories:  # remote tiers only, no memory: nothing to share
            return
        client = aioredis.Redis.from_url(
            self.config.redis_url or "", socket_timeout=5.0, socket_connect_timeout=2.0,
            decode_responses=True,
        )  # fmt: skip
        sync = LearnedSync(client, self.shared.key("learned"))
        for memory in memories:
            sync.watch_memory(memory)
        sync.attach(pools, lambda: router.memories)
        self.learned = sync
        try:
            await sync.run()
        finally:
            await client.aclose()

    def breakers(self) -> dict[str, CircuitBreaker]:
        """The circuit breaker of every backend that has one (remote backends)."""
        out: dict[str, CircuitBreaker] = {}
        for name, backend in (self.router.backends if self.router else {}).items():
            breaker = getattr(backend, "breaker", None)
            if isinstance(breaker, CircuitBreaker):
                out[name] = breaker
        return out

    async def admit(self, caller: Caller | None, route: str, trace: Trace) -> None:
        """Apply the caller's key record limits (403/429) and tag the request with its key."""
        if caller is None or caller.record is None:
            return
        key = caller.record
        try:
            await self.quotas.admit(key, route)
        except SlmgateError as exc:
            self.metrics.quota_refusals.labels(exc.code or type(exc).__name__).inc()
            raise
        self._admitted[key.key_id] = key
        trace.key_id = key.key_id

    def _settle(self, record: RequestRecord) -> None:
        """Count a finished request against its key's budgets and token limits, off the
        response path (a task on the running loop)."""
        key = self._admitted.get(record.key_id or "")
        if key is None:
            return
        limits = key.limits
        if limits.tpm is None and limits.budget_daily_usd is None and (
                limits.budget_monthly_usd is None):  # fmt: skip
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        task = loop.create_task(self.quotas.settle(
            key, record.prompt_tokens + record.completion_tokens, record.cost_usd))  # fmt: skip
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def settled(self) -> None:
        """Wait for pending settles (shutdown, tests)."""
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

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
            self._settle(record)
            if self.telemetry is not None:
                key = self._admitted.get(record.key_id or "")
                self.telemetry.export(record, api_key_name=None if key is None else key.name,
                                      traceparent=trace.traceparent)  # fmt: skip
            self.metrics.observe_request(record)
            for attempt in record.attempts:
                if attempt.outcome == "error":
                    kind = (attempt.error or "error").split(":", 1)[0]
                    self.metrics.backend_error(attempt.backend, kind)
            if answer is not None and self.router is not None:
                route = self.router.routes.get(trace.route)
                if route is not None and route.policy == "shadow":
                    self.shadow_runner().submit(route, req, answer, trace)
            for name, breaker in self.breakers().items():
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
        """Who a request counts against for ``max_concurrent_per_key``: its key record, its
        static API key (hashed, so keys are not kept around in the clear) or, on an open
        gateway, its client address."""
        known = getattr(request.state, "caller", None)
        if isinstance(known, Caller) and known.key_id is not None:
            return "key:" + known.key_id
        key = bearer_key(request.headers.get("authorization", ""))
        if self.config.api_keys and key:
            return "key:" + hashlib.sha256(key.encode()).hexdigest()[:16]
        return "ip:" + (request.client.host if request.client else "unknown")
