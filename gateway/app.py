"""The HTTP surface: parse → router → render. No model logic here.

``create_app(config, router)`` builds the app around an existing router (tests inject one);
``create_app(config)`` loads the configured models in the background at startup, and
``/readyz`` turns ready once they are loaded and warmed up.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
import secrets
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
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
from decoding.types import GenerationRequest, SamplingParams, Speculation
from gateway.config import GatewayConfig, Limits
from gateway.dashboard import dashboard_router
from gateway.guard import KeyGuard, KeySlots, bearer_key, require_json
from gateway.metrics import GatewayMetrics
from gateway.render import (
    call_id,
    headers_of,
    logprobs_of,
    message_of,
    response_of,
    slmgate_facts,
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
    GenerationCancelled,
    InvalidRequestError,
    NotFoundError,
    OverloadedError,
    PayloadTooLargeError,
    RequestTimeoutError,
    RequestTooLargeError,
    SlmgateError,
)
from schemas.json_limits import json_depth, lone_surrogate_path

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
        self.callers = KeySlots(lambda: self.config.limits.max_concurrent_per_key)

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

    def caller(self, request: Request) -> str:
        """Who a request counts against for ``max_concurrent_per_key``: its API key (hashed, so
        keys are not kept around in the clear) or, on an open gateway, its client address."""
        key = bearer_key(request.headers.get("authorization", ""))
        if self.config.api_keys and key:
            return "key:" + hashlib.sha256(key.encode()).hexdigest()[:16]
        return "ip:" + (request.client.host if request.client else "unknown")


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
    app.add_middleware(KeyGuard, keys=lambda: gw.config.api_keys)
    app.state.gateway = gw
    app.include_router(dashboard_router(lambda: gw.config.api_keys))

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
            return JSONResponse({"status": "ready", "models": sorted(gw.router.backends)})
        status = "failed" if gw.load_error else "loading"
        return JSONResponse({"status": status, "error": gw.load_error}, 503)

    @app.get("/metrics")
    async def metrics_endpoint(request: Request) -> Response:
        body, content_type = gw.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        names = [m.name for m in config.models] + [r.name for r in config.routes]
        return ModelList(data=[ModelCard(id=n) for n in names]).to_wire()

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> Response:
        require_json(request.headers.get("content-type"))
        limits = gw.config.limits
        body = await _read_body(request, limits.max_body_bytes)
        wire = _parse_request(body, limits)
        ignored = [f for f in wire.ignored_fields() if f != "speculation"]
        if ignored:
            log.info("ignored request fields: %s", ", ".join(ignored))
        router = gw.ready_router()
        route = router.resolve(wire.model)
        task_id = _task_id_of(request, wire)
        req = generation_request(wire, "chatcmpl-" + secrets.token_hex(12), task_id)
        req = replace(req, speculation=_speculation_of(wire), params=_bounded_params(wire, req,
                                                                                      limits))
        if gw.in_flight >= limits.max_queue:
            raise OverloadedError("too many requests in flight; retry shortly")
        caller = gw.caller(request)
        gw.callers.acquire(caller)  # released when the answer (or the stream) is done
        trace = Trace(req.request_id, route.name, task_id)
        try:
            with gw.slot():
                plan = await asyncio.to_thread(router.plan, route, req, trace)  # 400s up front
        except BaseException as exc:
            gw.callers.release(caller)
            gw.record(trace, req, error=_as_error(exc), stream=wire.stream)
            raise
        if wire.stream:
            return await _start_stream(gw, request, router, wire, req, plan, trace, caller)
        try:
            with gw.slot():
                async with asyncio.timeout(limits.request_timeout_s):
                    answer = await _until_disconnect(request, router.complete(plan, req, trace))
        except TimeoutError:
            timeout = RequestTimeoutError(
                f"the request timed out after {limits.request_timeout_s:g} s "
                "(limits.request_timeout_s, queueing included)"
            )
            gw.record(trace, req, error=timeout)
            raise timeout from None
        except BaseException as exc:
            gw.record(trace, req, error=_as_error(exc))
            raise
        finally:
            gw.callers.release(caller)
        trace.mark_first_token()
        gw.record(trace, req, answer=answer)
        token_text = _token_text(router, answer)
        response = response_of(answer, wire.model, wire.logprobs, token_text)
        return JSONResponse(response.to_wire(), headers=headers_of(answer))

    @app.post("/v1/tasks/{task_id}/outcome")
    async def task_outcome(task_id: str, request: Request) -> dict[str, Any]:
        task_id = check_task_id(task_id, "task_id")
        require_json(request.headers.get("content-type"))
        body = await _read_body(request, 64 * 1024)
        try:
            outcome = TaskOutcome.model_validate_json(body or b"{}")
        except ValidationError as exc:
            error = ErrorResponse.from_validation_errors(exc.errors()).error
            raise InvalidRequestError(error.message, param=error.param) from None
        known = await asyncio.to_thread(
            _ledger(gw).set_outcome, task_id, outcome.success, outcome.score
        )
        if known is False:
            raise NotFoundError(f"no task {task_id!r} in the ledger", param="task_id",
                                code="task_not_found")  # fmt: skip
        return {"object": "task.outcome", "task_id": task_id, "success": outcome.success,
                "score": outcome.score, "recorded": True}  # fmt: skip

    @app.get("/v1/stats")
    async def stats(
        request: Request, window: str = "24h", route: str | None = None, buckets: int = 12
    ) -> dict[str, Any]:
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
        if not 1 <= limit <= 1000:
            raise InvalidRequestError("limit must be in [1, 1000]", param="limit")
        rows = await asyncio.to_thread(_ledger(gw).tasks, limit, route, _window_seconds(window))
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


def _parse_request(body: bytes, limits: Limits) -> ChatCompletionRequest:
    """Parse and validate a chat request. Nesting is measured on the raw bytes first, because
    the JSON parser and pydantic recurse per level (RecursionError past ~1,000)."""
    depth = json_depth(body)
    if depth > limits.max_json_depth:
        raise RequestTooLargeError(
            f"JSON nesting deeper than {limits.max_json_depth} levels (limits.max_json_depth)"
        )
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise InvalidRequestError(f"could not parse the JSON body: {exc}") from None
    except ValueError as exc:  # e.g. an integer literal longer than Python's digit limit
        raise InvalidRequestError(f"could not parse the JSON body: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    where = lone_surrogate_path(body, data)
    if where is not None:
        raise InvalidRequestError(
            "invalid text: a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape) "
            "cannot be encoded as UTF-8",
            param=None if where == "(body)" else where,
        )
    try:
        return ChatCompletionRequest.model_validate(data)
    except ValidationError as exc:
        error = ErrorResponse.from_validation_errors(exc.errors()).error
        raise InvalidRequestError(error.message, param=error.param, code=error.code) from None


async def _start_stream(
    gw: Gateway,
    request: Request,
    router: Router,
    wire: ChatCompletionRequest,
    req: GenerationRequest,
    plan: Plan,
    trace: Trace,
    caller: str,
) -> Response:
    """Run the stream to its first chunk before answering, so a failure before the first byte
    keeps its HTTP status (a 503 stays a 503, not a 200 with an SSE error) and the headers can
    say which tier answers: by the first chunk a cascade has committed to its tier."""
    queue: asyncio.Queue[str | BaseException | None] = asyncio.Queue()
    pump = asyncio.create_task(_pump(_stream(gw, router, wire, req, plan, trace), queue))
    chunks = _drain(pump, queue, lambda: gw.callers.release(caller))
    try:
        first = await _until_disconnect(request, anext(chunks))
    except StopAsyncIteration:  # pragma: no cover - a stream always ends with [DONE]
        raise SlmgateError("the stream ended before its first chunk") from None
    except BaseException:
        await chunks.aclose()
        raise

    async def rest() -> AsyncIterator[str]:
        try:
            yield first
            async for text in chunks:
                yield text
        finally:
            await chunks.aclose()

    headers = {"x-slmgate-route": trace.route, "x-slmgate-request-id": req.request_id}
    if trace.answer is not None:  # decided whole before the first byte
        headers = {**headers_of(trace.answer), **headers}
    elif trace.streaming_from is not None:
        info = router.backends[trace.streaming_from].info
        headers.update({"x-slmgate-tier": info.tier, "x-slmgate-model": info.name})
    return StreamingResponse(rest(), media_type="text/event-stream", headers=headers)


async def _pump(
    chunks: AsyncGenerator[str, None], queue: asyncio.Queue[str | BaseException | None]
) -> None:
    """Run a whole stream in one task of its own, so its timeout and cancellation apply to that
    task whichever task sends the response (Starlette may stream from another one)."""
    try:
        async for text in chunks:
            queue.put_nowait(text)
        queue.put_nowait(None)
    except BaseException as exc:
        queue.put_nowait(exc)
        if not isinstance(exc, Exception):
            raise


async def _drain(
    pump: asyncio.Task[None],
    queue: asyncio.Queue[str | BaseException | None],
    release: Callable[[], None],
) -> AsyncGenerator[str, None]:
    """The pumped chunks; on any end (done, failed, client gone) the pump is cancelled, which
    records the request, and ``release()`` runs exactly once."""
    try:
        while (item := await queue.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        release()
        if not pump.done():
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump


async def _stream(
    gw: Gateway,
    router: Router,
    wire: ChatCompletionRequest,
    req: GenerationRequest,
    plan: Plan,
    trace: Trace,
) -> AsyncGenerator[str, None]:
    """SSE for one request. Outputs a cascade could still replace, and tool calls, are decided
    before the first byte (generated whole, then sent as deltas); the rest streams token by
    token (see ``router.router`` for the free-text rule on cascades).

    A failure before the first chunk is raised (the caller turns it into an HTTP error); after
    it, it becomes an SSE error event. The last finish chunk carries the ``slmgate`` object."""
    cid = req.request_id
    usage_on = wire.include_usage()
    sent = False

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
                trace.answer = answer
                prompt_tokens = answer.result.prompt_tokens
                completion_tokens = answer.result.completion_tokens
                cached_tokens = answer.result.cached_tokens
                trace.mark_first_token()
                for text in _answer_chunks(answer, wire, _token_text(router, answer), chunk):
                    sent = True
                    yield text
            else:
                started: set[int] = set()
                held: ChatCompletionChunkChoice | None = None  # the latest finish chunk
                async for event in router.stream(plan, req, trace):
                    source = router.backends.get(trace.streaming_from or "")
                    token_text = getattr(source, "token_text", None)
                    if event.index not in started:
                        started.add(event.index)
                        trace.mark_first_token()
                        delta = ChoiceDelta(role="assistant", content="")
                        sent = True
                        yield chunk([ChatCompletionChunkChoice(index=event.index, delta=delta)])
                    if isinstance(event, FinishEvent):
                        if not prompt_tokens:  # the first choice's, as in a whole response
                            cached_tokens = event.cached_tokens
                        prompt_tokens = event.prompt_tokens
                        if event.text:
                            yield chunk([ChatCompletionChunkChoice(
                                index=event.index, delta=ChoiceDelta(content=event.text))])
                        if held is not None:
                            yield chunk([held])
                        held = ChatCompletionChunkChoice(
                            index=event.index, finish_reason=wire_finish_reason(event.reason))
                        continue  # fmt: skip
                    completion_tokens += 1
                    logprobs = logprobs_of([event], token_text) if wire.logprobs else None
                    if event.text or logprobs:
                        yield chunk([ChatCompletionChunkChoice(
                            index=event.index, delta=ChoiceDelta(content=event.text),
                            logprobs=logprobs)])  # fmt: skip
                answer = trace.answer
                if held is not None:
                    facts = slmgate_facts(answer) if answer is not None else None
                    yield chunk([held], slmgate=facts)
        if usage_on:
            usage = Usage(
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
            )
            yield chunk([], usage=usage)
    except TimeoutError:
        failure = RequestTimeoutError(
            f"the request timed out after {gw.config.limits.request_timeout_s:g} s "
            "(limits.request_timeout_s, queueing included)"
        )
        if not sent:
            gw.in_flight -= 1
            gw.record(trace, req, error=failure, stream=True)
            raise failure from None
        yield sse(failure.to_body())
    except SlmgateError as exc:
        failure = exc
        if not sent:
            gw.in_flight -= 1
            gw.record(trace, req, error=failure, stream=True)
            raise
        yield sse(exc.to_body())
    except BaseException as exc:  # incl. GeneratorExit when the client goes away
        failure = exc
        if not isinstance(exc, Exception):
            gw.in_flight -= 1
            gw.record(trace, req, answer=answer, error=_as_error(exc), stream=True)
            raise
        log.exception("error while streaming")
        if not sent:
            gw.in_flight -= 1
            gw.record(trace, req, error=exc, stream=True)
            raise
        yield sse(SlmgateError("The server had an error processing your request.").to_body())
    gw.in_flight -= 1
    gw.record(trace, req, answer=answer, error=failure, stream=True)
    yield sse("[DONE]")


def _answer_chunks(
    answer: Answer, wire: ChatCompletionRequest, token_text: Any, chunk: Callable[..., str]
) -> list[str]:
    """Each choice decided whole, as deltas; the last chunk carries the ``slmgate`` object."""
    out: list[str] = []
    last = len(answer.result.choices) - 1
    for n, (choice, check) in enumerate(zip(answer.result.choices, answer.checks, strict=True)):
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
        facts = slmgate_facts(answer) if n == last else None
        out.append(chunk([ChatCompletionChunkChoice(index=choice.index, finish_reason=reason)],
                         slmgate=facts))  # fmt: skip
    return out


class TaskOutcome(BaseModel):
    """Body of ``POST /v1/tasks/{task_id}/outcome``."""

    model_config = ConfigDict(extra="forbid")
    success: bool
    score: float | None = None


TASK_ID_MAX = 256
_TASK_ID = re.compile(rf"[!-~]{{1,{TASK_ID_MAX}}}")  # printable ASCII, no spaces


def check_task_id(value: str, param: str) -> str:
    """A task id as given, or a 400: 1-256 printable ASCII characters without whitespace (ids
    are stored, indexed and echoed back, so they are bounded and need no escaping)."""
    if not _TASK_ID.fullmatch(value):
        raise InvalidRequestError(
            f"{param} must be 1-{TASK_ID_MAX} printable ASCII characters without whitespace",
            param=param,
        )
    return value


def _task_id_of(request: Request, wire: ChatCompletionRequest) -> str | None:
    header = request.headers.get("x-task-id")
    if header is not None:
        return check_task_id(header, "x-task-id")
    value = (wire.metadata or {}).get("task_id")
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidRequestError("metadata.task_id must be a string", param="metadata.task_id")
    return check_task_id(value, "metadata.task_id")


def _bounded_params(
    wire: ChatCompletionRequest, req: GenerationRequest, limits: Limits
) -> SamplingParams:
    """The request's sampling parameters within ``n`` and ``n x max_tokens`` bounds. Without
    ``max_tokens`` the budget is split across the choices instead of refusing the request."""
    params = req.params
    if params.n > limits.max_choices:
        raise RequestTooLargeError(
            f"n = {params.n} exceeds {limits.max_choices} (limits.max_choices)", param="n"
        )
    if params.max_tokens is None:
        return replace(params, max_tokens=max(1, limits.max_generated_tokens // params.n))
    total = params.n * params.max_tokens
    if total > limits.max_generated_tokens:
        param = "max_completion_tokens" if wire.max_completion_tokens is not None else (
            "max_tokens")  # fmt: skip
        raise RequestTooLargeError(
            f"n x {param} = {total} exceeds {limits.max_generated_tokens} tokens per request "
            "(limits.max_generated_tokens)",
            param=param,
        )
    return params


def _as_error(exc: BaseException) -> BaseException:
    """What the ledger records for ``exc``: cancellation (client gone, task cancelled) as 499."""
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return GenerationCancelled("the client disconnected")
    return exc


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
