"""The HTTP surface: parse → router → render. No model logic here.

``create_app(config, router)`` builds the app around an existing router (tests inject one);
``create_app(config)`` loads the configured models in the background at startup, and
``/readyz`` turns ready once they are loaded and warmed up.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json
import logging
import secrets
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Route

from gateway.admission import (
    EXTENSION_FIELDS,
    bounded_params,
    check_schema_sizes,
    check_task_id,
    extensions_of,
    parse_outcome,
    parse_request,
    read_body,
    task_id_of,
    window_seconds,
)
from gateway.config import GatewayConfig
from gateway.dashboard import dashboard_router
from gateway.guard import KeyGuard, require_json
from gateway.metrics import GatewayMetrics
from gateway.render import (
    headers_of,
    response_of,
)
from gateway.state import Gateway, error_response
from gateway.streaming import as_error, start_stream, token_text_of, until_disconnect
from router.ledger import Ledger, LedgerUnavailable
from router.request import generation_request
from router.router import Router, Trace
from schemas.chat import (
    ErrorResponse,
    ModelCard,
    ModelList,
)
from schemas.errors import (
    InvalidRequestError,
    NotFoundError,
    OverloadedError,
    RequestTimeoutError,
    SlmgateError,
)

log = logging.getLogger(__name__)
def create_app(
    config: GatewayConfig, router: Router | None = None, ledger: Ledger | None = None
) -> FastAPI:
    """The app. ``ledger`` defaults to one on ``config.resolved_ledger_url()``."""
    metrics = GatewayMetrics()
    if ledger is None and (url := config.resolved_ledger_url()) is not None:
        ledger = Ledger(url, on_failure=metrics.ledger_write_failure,
                        on_drop=metrics.ledger_records_dropped)  # fmt: skip
    gw = Gateway(config, router, ledger, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if gw.ledger is not None:
            gw.ledger.start()
        if gw.router is None:
            threading.Thread(target=gw.load_models, name="model-loader", daemon=True).start()
        shared: list[asyncio.Task[None]] = []
        if gw.shared.health.configured:  # breakers and learning shared with the other replicas
            shared.append(asyncio.create_task(gw.breaker_sync.run(), name="breaker-sync"))
            shared.append(asyncio.create_task(gw.share_learning(), name="learned-sync"))
        yield
        for task in shared:
            task.cancel()
        await asyncio.gather(*shared, return_exceptions=True)
        await gw.settled()
        await gw.shared.aclose()
        if gw.telemetry is not None:
            await asyncio.to_thread(gw.telemetry.shutdown)
        if gw.shadows is not None:
            await gw.shadows.close()
        if gw.ledger is not None:
            await asyncio.to_thread(gw.ledger.close)
        if gw.router is not None:
            for backend in gw.router.backends.values():
                aclose = getattr(backend, "aclose", None)
                if aclose is not None:  # remote backends: close the HTTP pool on this loop
                    await aclose()
                elif (close := getattr(backend, "close", None)) is not None:
                    close()

    # FastAPI's own OpenTelemetry layer (0.16x) looks up the global providers on every request;
    # slmgate's spans come from its own provider (``otel_endpoint``), so that layer stays off.
    off: dict[str, Any] = {}
    if "telemetry" in inspect.signature(FastAPI).parameters:
        off["telemetry"] = {"tracing": False, "metrics": False, "logs": False}
    app = FastAPI(title="slmgate", lifespan=lifespan, **off)
    app.add_middleware(KeyGuard, keys=gw.keys)
    app.state.gateway = gw
    app.include_router(dashboard_router(gw.keys.last_known_required))

    @app.exception_handler(SlmgateError)
    async def _slmgate_error(request: Request, exc: SlmgateError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(LedgerUnavailable)
    async def _ledger_down(request: Request, exc: LedgerUnavailable) -> JSONResponse:
        response = error_response(OverloadedError(f"the ledger is unavailable: {exc}"))
        if gw.ledger is not None:  # its health block stays readable during the outage
            body = json.loads(bytes(response.body))
            body["ledger"] = gw.ledger.health()
            response = JSONResponse(body, response.status_code, headers={"Retry-After": "5"})
        return response

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(ErrorResponse.from_validation_errors(exc.errors()).to_wire(), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        body = {"error": {"message": str(exc.detail), "type": kind, "param": None, "code": None}}
        return JSONResponse(body, exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return error_response(SlmgateError("The server had an error processing your request."))

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        if gw.router is not None:
            body: dict[str, Any] = {"status": "ready", "models": sorted(gw.router.backends)}
            if gw.shadows is not None:  # shadow answers: submitted, dropped, agreed, ...
                body["shadow"] = dict(gw.shadows.counts)
            if servers := gw.servers():  # launched vLLM servers: state, pid, restarts
                body["servers"] = servers
            if gw.shared.health.configured:  # Redis: up, or this replica on its own state
                body["shared_state"] = dataclasses.asdict(gw.shared.health)
                if gw.learned is not None:  # outputs and examples shared with other replicas
                    body["shared_state"]["learned"] = dict(gw.learned.counts)
            return JSONResponse(body)
        status = "failed" if gw.load_error else "loading"
        return JSONResponse({"status": status, "error": gw.load_error}, 503)

    @app.get("/metrics")
    async def metrics_endpoint(request: Request) -> Response:
        gw.servers()  # refreshes the launched servers' state gauges
        if gw.shared.health.configured:
            gw.metrics.shared_up.set(1 if gw.shared.health.up else 0)
        body, content_type = gw.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        names = [m.name for m in config.models] + [r.name for r in config.routes]
        return ModelList(data=[ModelCard(id=n) for n in names]).to_wire()

    async def chat_completions(request: Request) -> Response:
        """The hot path, a plain Starlette route (registered first, below): FastAPI's dependency
        solving and route matching for a handler that takes only the request cost ~5% of the
        gateway's time per call, and OpenAPI could not describe its body anyway."""
        require_json(request.headers.get("content-type"))
        limits = gw.config.limits
        body = await read_body(request, limits.max_body_bytes)
        wire = parse_request(body, limits)
        check_schema_sizes(wire, limits)
        ignored = [f for f in wire.ignored_fields() if f not in EXTENSION_FIELDS]
        if ignored:
            log.info("ignored request fields: %s", ", ".join(ignored))
        router = gw.ready_router()
        route = router.resolve(wire.model)
        task_id = task_id_of(request, wire)
        req = generation_request(wire, "chatcmpl-" + secrets.token_hex(12), task_id)
        req = extensions_of(wire, req)
        req = replace(req, params=bounded_params(wire, req, limits))
        if gw.in_flight >= limits.max_queue:
            raise OverloadedError("too many requests in flight; retry shortly")
        trace = Trace(req.request_id, route.name, task_id)
        trace.traceparent = request.headers.get("traceparent")
        await gw.admit(getattr(request.state, "caller", None), route.name, trace)  # 403/429
        caller = gw.caller(request)
        gw.callers.acquire(caller)  # released when the answer (or the stream) is done
        try:
            with gw.slot():
                plan = await router.plan_async(route, req, trace)  # 400s up front
        except BaseException as exc:
            gw.callers.release(caller)
            gw.record(trace, req, error=as_error(exc), stream=wire.stream)
            raise
        if wire.stream:
            return await start_stream(gw, request, router, wire, req, plan, trace, caller)
        try:
            with gw.slot():
                async with asyncio.timeout(limits.request_timeout_s):
                    answer = await until_disconnect(request, router.complete(plan, req, trace))
        except TimeoutError:
            timeout = RequestTimeoutError(
                f"the request timed out after {limits.request_timeout_s:g} s "
                "(limits.request_timeout_s, queueing included)"
            )
            gw.record(trace, req, error=timeout)
            raise timeout from None
        except BaseException as exc:
            gw.record(trace, req, error=as_error(exc))
            raise
        finally:
            gw.callers.release(caller)
        trace.mark_first_token()
        gw.record(trace, req, answer=answer)
        token_text = token_text_of(router, answer)
        response = response_of(answer, wire.model, wire.logprobs, token_text, req.request_id)
        return Response(response.to_wire_json(), media_type="application/json",
                        headers=headers_of(answer))  # fmt: skip

    app.router.routes.insert(0, Route("/v1/chat/completions", chat_completions, methods=["POST"]))

    @app.post("/v1/tasks/{task_id}/outcome")
    async def task_outcome(task_id: str, request: Request) -> dict[str, Any]:
        task_id = check_task_id(task_id, "task_id")
        require_json(request.headers.get("content-type"))
        body = await read_body(request, 64 * 1024)
        outcome = parse_outcome(body, gw.config.limits)
        known = await asyncio.to_thread(
            _ledger(gw).set_outcome, task_id, outcome.success, outcome.score
        )
        if known is False:
            raise NotFoundError(f"no task {task_id!r} in the ledger", param="task_id",
                                code="task_not_found")  # fmt: skip
        if gw.telemetry is not None:
            gw.telemetry.record_outcome(task_id, outcome.success, outcome.score)
        return {"object": "task.outcome", "task_id": task_id, "success": outcome.success,
                "score": outcome.score, "recorded": True}  # fmt: skip

    @app.get("/v1/stats")
    async def stats(
        request: Request, window: str = "24h", route: str | None = None, buckets: int = 12
    ) -> dict[str, Any]:
        seconds = window_seconds(window)
        if not 1 <= buckets <= 500:
            raise InvalidRequestError("buckets must be in [1, 500]", param="buckets")
        result: dict[str, Any] = await asyncio.to_thread(
            _ledger(gw).stats, seconds, route, buckets
        )
        result["ledger"] = _ledger(gw).health()
        if gw.shared.health.configured:
            result["shared_state"] = dataclasses.asdict(gw.shared.health)
        return result

    @app.get("/v1/tasks")
    async def tasks(
        request: Request, limit: int = 50, route: str | None = None, window: str = "all"
    ) -> dict[str, Any]:
        if not 1 <= limit <= 1000:
            raise InvalidRequestError("limit must be in [1, 1000]", param="limit")
        rows = await asyncio.to_thread(_ledger(gw).tasks, limit, route, window_seconds(window))
        return {"object": "list", "data": rows}

    @app.get("/v1/tasks/{task_id}")
    async def task(task_id: str, request: Request) -> dict[str, Any]:
        task_id = check_task_id(task_id, "task_id")
        found: dict[str, Any] | None = await asyncio.to_thread(_ledger(gw).task, task_id)
        if found is None:
            raise NotFoundError(f"no task {task_id!r} in the ledger", param="task_id",
                                code="task_not_found")  # fmt: skip
        return found

    return app


def _ledger(gw: Gateway) -> Ledger:
    if gw.ledger is None:
        raise NotFoundError("the ledger is switched off (ledger_url: off)", code="no_ledger")
    return gw.ledger

