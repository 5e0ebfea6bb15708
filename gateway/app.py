"""The HTTP surface: parse → router → render. No model logic here.

``create_app(config, router)`` builds the app around an existing router (tests inject one);
``create_app(config)`` loads the configured models in the background at startup, and
``/readyz`` turns ready once they are loaded and warmed up.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import secrets
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar, cast

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from decoding.backend import FinishEvent
from decoding.types import GenerationRequest, Speculation
from gateway.config import GatewayConfig
from gateway.dashboard import dashboard_router
from gateway.metrics import GatewayMetrics
from gateway.render import (
    call_id,
    headers_of,
    logprobs_of,
    message_of,
    response_of,
    sse,
    wire_finish_reason,
)
from router.energy import EnergyMeter
from router.ledger import Ledger, LedgerUnavailable
from router.request import generation_request
from router.router import Answer, Plan, Router, Trace, request_record
from router.stats import parse_window
from schemas.chat import (
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    ChatCompletionRequest,
    ChoiceDelta,
    DeltaFunctionCall,
    DeltaToolCall,
    ErrorResponse,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    Usage,
)
from schemas.errors import (
    AuthenticationError,
    GenerationCancelled,
    InvalidRequestError,
    NotFoundError,
    OverloadedError,
    PayloadTooLargeError,
    RequestTimeoutError,
    SlmgateError,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


def error_response(exc: SlmgateError) -> JSONResponse:
    headers = {"Retry-After": "5"} if exc.status in (429, 503) else None
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

    def load_models(self) -> None:
        """Load every configured model (blocking; runs on a background thread)."""
        from decoding.models import build_backend

        try:
            cache = None if self.config.cache_dir is None else Path(self.config.cache_dir)
            backends = {m.name: build_backend(m, cache) for m in self.config.models}
            routes = {r.name: r for r in self.config.routes}
            self.router = Router(backends, routes, EnergyMeter())
            log.info("ready: models %s, routes %s", sorted(backends),
                     [r.name for r in self.config.routes])  # fmt: skip
        except Exception as exc:  # reported by /readyz and every request
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.exception("model loading failed")

    @contextmanager
    def slot(self) -> Iterator[None]:
        """Count a request in flight while the block runs (the overload check reads it)."""
        self.in_flight += 1
        self.metrics.set_queue_depth("gateway", self.in_flight)
        try:
            yield
        finally:
            self.in_flight -= 1
            self.metrics.set_queue_depth("gateway", self.in_flight)

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
            for name, backend in (self.router.backends if self.router else {}).items():
                breaker = getattr(backend, "breaker", None)
                if breaker is not None:
                    self.metrics.set_breaker_state(name, breaker.state)
        except Exception:
            log.exception("could not build the ledger record for %s", trace.request_id)

    def ready_router(self) -> Router:
        if self.router is None:
            if self.load_error:
                raise SlmgateError(f"models failed to load: {self.load_error}")
            raise OverloadedError("models are still loading; retry shortly")
        return self.router

    def check_auth(self, request: Request) -> None:
        keys = self.config.api_keys
        if not keys:
            return
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else ""
        # Compare against every key in constant time, so timing reveals neither key nor index.
        ok = False
        for key in keys:
            ok |= hmac.compare_digest(given.encode(), key.encode())
        if not ok:
            raise AuthenticationError(
                "Incorrect API key provided. Pass it as 'Authorization: Bearer <key>'."
            )


async def _until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``; cancel it if the client goes away first."""
    task = asyncio.ensure_future(work)
    while not task.done():
        done, _ = await asyncio.wait({task}, timeout=0.5)
        if not done and await request.is_disconnected():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            raise GenerationCancelled("the client disconnected")
    return await task


def create_app(
    config: GatewayConfig, router: Router | None = None, ledger: Ledger | None = None
) -> FastAPI:
    """The app. ``ledger`` defaults to one on ``config.resolved_ledger_url()``."""
    metrics = GatewayMetrics()
    if ledger is None and (url := config.resolved_ledger_url()) is not None:
        ledger = Ledger(url, on_failure=metrics.ledger_write_failure)
    gw = Gateway(config, router, ledger, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if gw.ledger is not None:
            gw.ledger.start()
        if gw.router is None:
            threading.Thread(target=gw.load_models, name="model-loader", daemon=True).start()
        yield
        if gw.ledger is not None:
            await asyncio.to_thread(gw.ledger.close)
        if gw.router is not None:
            for backend in gw.router.backends.values():
                aclose = getattr(backend, "aclose", None)
                if aclose is not None:  # remote backends: close the HTTP pool on this loop
                    await aclose()
                elif (close := getattr(backend, "close", None)) is not None:
                    close()

    app = FastAPI(title="slmgate", lifespan=lifespan)
    app.state.gateway = gw
    app.include_router(dashboard_router(lambda: gw.config.api_keys))

    @app.exception_handler(SlmgateError)
    async def _slmgate_error(request: Request, exc: SlmgateError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(LedgerUnavailable)
    async def _ledger_down(request: Request, exc: LedgerUnavailable) -> JSONResponse:
        return error_response(OverloadedError(f"the ledger is unavailable: {exc}"))

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
            return JSONResponse({"status": "ready", "models": sorted(gw.router.backends)})
        status = "failed" if gw.load_error else "loading"
        return JSONResponse({"status": status, "error": gw.load_error}, 503)

    @app.get("/metrics")
    async def metrics_endpoint(request: Request) -> Response:
        gw.check_auth(request)
        body, content_type = gw.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        gw.check_auth(request)
        names = [m.name for m in config.models] + [r.name for r in config.routes]
        return ModelList(data=[ModelCard(id=n) for n in names]).to_wire()

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> Response:
        gw.check_auth(request)
        body = await _read_body(request, config.limits.max_body_bytes)
        wire = _parse_request(body)
        ignored = [f for f in wire.ignored_fields() if f != "speculation"]
        if ignored:
            log.info("ignored request fields: %s", ", ".join(ignored))
        router = gw.ready_router()
        route = router.resolve(wire.model)
        task_id = request.headers.get("x-task-id") or (wire.metadata or {}).get("task_id")
        req = generation_request(wire, "chatcmpl-" + secrets.token_hex(12), task_id)
        req = replace(req, speculation=_speculation_of(wire))
        if gw.in_flight >= config.limits.max_queue:
            raise OverloadedError("too many requests in flight; retry shortly")
        trace = Trace(req.request_id, route.name, task_id)
        try:
            with gw.slot():
                plan = await asyncio.to_thread(router.plan, route, req, trace)  # 400s up front
        except Exception as exc:
            gw.record(trace, req, error=exc, stream=wire.stream)
            raise
        if wire.stream:
            # The stream takes its own slot when it starts: a generator that never starts
            # (client gone before the first byte) must not hold one.
            stream = _stream(gw, router, wire, req, plan, trace)
            return StreamingResponse(stream, media_type="text/event-stream")
        try:
            with gw.slot():
                async with asyncio.timeout(config.limits.request_timeout_s):
                    answer = await _until_disconnect(request, router.complete(plan, req, trace))
        except TimeoutError:
            timeout = RequestTimeoutError("the request timed out")
            gw.record(trace, req, error=timeout)
            raise timeout from None
        except Exception as exc:
            gw.record(trace, req, error=exc)
            raise
        trace.mark_first_token()
        gw.record(trace, req, answer=answer)
        token_text = _token_text(router, answer)
        response = response_of(answer, wire.model, wire.logprobs, token_text)
        return JSONResponse(response.to_wire(), headers=headers_of(answer))

    @app.post("/v1/tasks/{task_id}/outcome")
    async def task_outcome(task_id: str, request: Request) -> dict[str, Any]:
        gw.check_auth(request)
        body = await _read_body(request, 64 * 1024)
        try:
            outcome = TaskOutcome.model_validate_json(body or b"{}")
        except ValidationError as exc:
            error = ErrorResponse.from_validation_errors(exc.errors()).error
            raise InvalidRequestError(error.message, param=error.param) from None
        await asyncio.to_thread(_ledger(gw).set_outcome, task_id, outcome.success, outcome.score)
        return {"object": "task.outcome", "task_id": task_id, "success": outcome.success,
                "score": outcome.score, "recorded": True}  # fmt: skip

    @app.get("/v1/stats")
    async def stats(
        request: Request, window: str = "24h", route: str | None = None, buckets: int = 12
    ) -> dict[str, Any]:
        gw.check_auth(request)
        seconds = _window_seconds(window)
        if not 1 <= buckets <= 500:
            raise InvalidRequestError("buckets must be in [1, 500]", param="buckets")
        result: dict[str, Any] = await asyncio.to_thread(
            _ledger(gw).stats, seconds, route, buckets
        )
        result["ledger"] = _ledger(gw).health()
        return result

    @app.get("/v1/tasks")
    async def tasks(
        request: Request, limit: int = 50, route: str | None = None, window: str = "all"
    ) -> dict[str, Any]:
        gw.check_auth(request)
        if not 1 <= limit <= 1000:
            raise InvalidRequestError("limit must be in [1, 1000]", param="limit")
        rows = await asyncio.to_thread(_ledger(gw).tasks, limit, route, _window_seconds(window))
        return {"object": "list", "data": rows}

    @app.get("/v1/tasks/{task_id}")
    async def task(task_id: str, request: Request) -> dict[str, Any]:
        gw.check_auth(request)
        found: dict[str, Any] | None = await asyncio.to_thread(_ledger(gw).task, task_id)
        if found is None:
            raise NotFoundError(f"no task {task_id!r} in the ledger", param="task_id",
                                code="task_not_found")  # fmt: skip
        return found

    return app


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(f"request body exceeds {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLargeError(f"request body exceeds {limit} bytes")
    return bytes(body)


def _parse_request(body: bytes) -> ChatCompletionRequest:
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(f"could not parse the JSON body: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    try:
        return ChatCompletionRequest.model_validate(data)
    except ValidationError as exc:
        error = ErrorResponse.from_validation_errors(exc.errors()).error
        raise InvalidRequestError(error.message, param=error.param, code=error.code) from None


async def _stream(
    gw: Gateway,
    router: Router,
    wire: ChatCompletionRequest,
    req: GenerationRequest,
    plan: Plan,
    trace: Trace,
) -> AsyncIterator[str]:
    """SSE for one request. Outputs a cascade could still replace, and tool calls, are decided
    before the first byte (generated whole, then sent as deltas); the rest streams token by
    token (see ``router.router`` for the free-text rule on cascades)."""
    cid = req.request_id
    usage_on = wire.include_usage()

    def chunk(choices: list[ChatCompletionChunkChoice], **extra: Any) -> str:
        payload = ChatCompletionChunk(id=cid, model=wire.model, choices=choices, **extra)
        if usage_on and "usage" not in extra:
            payload.usage = None
        return sse(payload)

    prompt_tokens = completion_tokens = cached_tokens = 0
    answer: Answer | None = None
    failure: BaseException | None = None
    gw.in_flight += 1
    try:
        async with asyncio.timeout(gw.config.limits.request_timeout_s):
            if not router.streams_tokens(plan, req):
                answer = await router.complete(plan, req, trace)
                prompt_tokens = answer.result.prompt_tokens
                completion_tokens = answer.result.completion_tokens
                cached_tokens = answer.result.cached_tokens
                trace.mark_first_token()
                for text in _answer_chunks(answer, wire, _token_text(router, answer), chunk):
                    yield text
            else:
                started: set[int] = set()
                async for event in router.stream(plan, req, trace):
                    source = router.backends.get(trace.streaming_from or "")
                    token_text = getattr(source, "token_text", None)
                    if event.index not in started:
                        started.add(event.index)
                        trace.mark_first_token()
                        delta = ChoiceDelta(role="assistant", content="")
                        yield chunk([ChatCompletionChunkChoice(index=event.index, delta=delta)])
                    if isinstance(event, FinishEvent):
                        if not prompt_tokens:  # the first choice's, as in a whole response
                            cached_tokens = event.cached_tokens
                        prompt_tokens = event.prompt_tokens
                        if event.text:
                            yield chunk([ChatCompletionChunkChoice(
                                index=event.index, delta=ChoiceDelta(content=event.text))])
                        reason = wire_finish_reason(event.reason)
                        yield chunk([ChatCompletionChunkChoice(index=event.index,
                                                               finish_reason=reason)])
                        continue  # fmt: skip
                    completion_tokens += 1
                    logprobs = logprobs_of([event], token_text) if wire.logprobs else None
                    if event.text or logprobs:
                        yield chunk([ChatCompletionChunkChoice(
                            index=event.index, delta=ChoiceDelta(content=event.text),
                            logprobs=logprobs)])  # fmt: skip
                answer = trace.answer
        if usage_on:
            usage = Usage(
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
            )
            yield chunk([], usage=usage)
    except TimeoutError:
        failure = RequestTimeoutError("the request timed out")
        yield sse(failure.to_body())
    except SlmgateError as exc:
        failure = exc
        yield sse(exc.to_body())
    except BaseException as exc:  # incl. GeneratorExit when the client goes away
        failure = exc
        if not isinstance(exc, Exception):
            gw.record(trace, req, answer=answer, error=GenerationCancelled("stream closed"),
                      stream=True)  # fmt: skip
            raise
        log.exception("error while streaming")
        yield sse(SlmgateError("The server had an error processing your request.").to_body())
    finally:
        gw.in_flight -= 1
    gw.record(trace, req, answer=answer, error=failure, stream=True)
    yield sse("[DONE]")


def _answer_chunks(
    answer: Answer, wire: ChatCompletionRequest, token_text: Any, chunk: Callable[..., str]
) -> list[str]:
    out = []
    for choice, check in zip(answer.result.choices, answer.checks, strict=True):
        message, reason = message_of(choice, check)
        first = ChoiceDelta(role="assistant", content=message.content or "")
        out.append(chunk([ChatCompletionChunkChoice(index=choice.index, delta=first)]))
        for i, call in enumerate(message.tool_calls or []):
            head = DeltaToolCall(index=i, id=call.id or call_id(), type="function",
                                 function=DeltaFunctionCall(name=call.function.name,
                                                            arguments=""))
            args = DeltaToolCall(index=i, function=DeltaFunctionCall(
                arguments=call.function.arguments))  # fmt: skip
            out.append(chunk([ChatCompletionChunkChoice(
                index=choice.index, delta=ChoiceDelta(tool_calls=[head]))]))
            out.append(chunk([ChatCompletionChunkChoice(
                index=choice.index, delta=ChoiceDelta(tool_calls=[args]))]))  # fmt: skip
        out.append(chunk([ChatCompletionChunkChoice(index=choice.index, finish_reason=reason)]))
    return out


class TaskOutcome(BaseModel):
    """Body of ``POST /v1/tasks/{task_id}/outcome``."""

    model_config = ConfigDict(extra="forbid")
    success: bool
    score: float | None = None


def _window_seconds(window: str) -> float | None:
    """``15m``/``1h``/``24h``/``7d``, seconds, or ``all`` (None); anything else is a 400."""
    try:
        return parse_window(window)
    except ValueError as exc:
        raise InvalidRequestError(str(exc), param="window") from None


def _ledger(gw: Gateway) -> Ledger:
    if gw.ledger is None:
        raise NotFoundError("the ledger is switched off (ledger_url: off)", code="no_ledger")
    return gw.ledger


def _token_text(router: Router, answer: Answer) -> Any:
    return getattr(router.backends.get(answer.backend.name), "token_text", None)


SPECULATION_MODES = ("none", "suffix", "stand", "both")


def _speculation_of(wire: ChatCompletionRequest) -> Speculation | None:
    """The request's ``speculation`` extension field (like vLLM's extra sampling fields)."""
    value = (wire.model_extra or {}).get("speculation")
    if value is None:
        return None
    if value not in SPECULATION_MODES:
        raise InvalidRequestError(
            f"speculation must be one of {', '.join(SPECULATION_MODES)}", param="speculation"
        )
    return cast("Speculation", value)
