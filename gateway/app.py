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
from pathlib import Path
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from decoding.backend import FinishEvent
from decoding.constraint import ToolCalls
from gateway.config import GatewayConfig
from gateway.render import (
    call_id,
    headers_of,
    logprobs_of,
    message_of,
    response_of,
    sse,
    wire_finish_reason,
)
from router.request import generation_request
from router.router import Answer, Router
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
    Usage,
)
from schemas.errors import (
    AuthenticationError,
    GenerationCancelled,
    InvalidRequestError,
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
    """State shared by the handlers: config, router, in-flight counts."""

    def __init__(self, config: GatewayConfig, router: Router | None):
        self.config = config
        self.router = router
        self.in_flight = 0
        self.load_error: str | None = None

    def load_models(self) -> None:
        """Load every configured model (blocking; runs on a background thread)."""
        from decoding.models import load_engine

        try:
            cache = None if self.config.cache_dir is None else Path(self.config.cache_dir)
            backends = {m.name: load_engine(m, cache) for m in self.config.models}
            self.router = Router(backends, {r.name: r for r in self.config.routes})
            log.info("ready: models %s, routes %s", sorted(backends),
                     [r.name for r in self.config.routes])  # fmt: skip
        except Exception as exc:  # reported by /readyz and every request
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.exception("model loading failed")

    @contextmanager
    def slot(self) -> Iterator[None]:
        """Count a request in flight while the block runs (the overload check reads it)."""
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

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


def create_app(config: GatewayConfig, router: Router | None = None) -> FastAPI:
    gw = Gateway(config, router)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if gw.router is None:
            threading.Thread(target=gw.load_models, name="model-loader", daemon=True).start()
        yield
        if gw.router is not None:
            for backend in gw.router.backends.values():
                close = getattr(backend, "close", None)
                if close:
                    close()

    app = FastAPI(title="slmgate", lifespan=lifespan)
    app.state.gateway = gw

    @app.exception_handler(SlmgateError)
    async def _slmgate_error(request: Request, exc: SlmgateError) -> JSONResponse:
        return error_response(exc)

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
        ignored = wire.ignored_fields()
        if ignored:
            log.info("ignored request fields: %s", ", ".join(ignored))
        router = gw.ready_router()
        _route, backend = router.resolve(wire.model)
        task_id = request.headers.get("x-task-id") or (wire.metadata or {}).get("task_id")
        req = generation_request(wire, "chatcmpl-" + secrets.token_hex(12), task_id)
        if gw.in_flight >= config.limits.max_queue:
            raise OverloadedError("too many requests in flight; retry shortly")
        with gw.slot():
            prepared = await asyncio.to_thread(router.prepare, backend, req)  # 400s up front
        if wire.stream:
            # The stream takes its own slot when it starts: a generator that never starts
            # (client gone before the first byte) must not hold one.
            stream = _stream(gw, router, wire, req, prepared)
            return StreamingResponse(stream, media_type="text/event-stream")
        try:
            with gw.slot():
                async with asyncio.timeout(config.limits.request_timeout_s):
                    work = router.complete(wire.model, req, prepared)
                    answer = await _until_disconnect(request, work)
        except TimeoutError:
            raise RequestTimeoutError("the request timed out") from None
        response = response_of(answer, wire.model, wire.logprobs, backend.token_text)
        return JSONResponse(response.to_wire(), headers=headers_of(answer))

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
    gw: Gateway, router: Router, wire: ChatCompletionRequest, req: Any, prepared: Any
) -> AsyncIterator[str]:
    """SSE for one request. Tool requests are decided before the first byte (generated whole,
    then sent as OpenAI's tool-call deltas); everything else streams token by token."""
    _, backend = router.resolve(wire.model)
    cid = req.request_id
    usage_on = wire.include_usage()

    def chunk(choices: list[ChatCompletionChunkChoice], **extra: Any) -> str:
        payload = ChatCompletionChunk(id=cid, model=wire.model, choices=choices, **extra)
        if usage_on and "usage" not in extra:
            payload.usage = None
        return sse(payload)

    prompt_tokens = completion_tokens = 0
    gw.in_flight += 1
    try:
        async with asyncio.timeout(gw.config.limits.request_timeout_s):
            if isinstance(req.constraint, ToolCalls):
                answer = await router.complete(wire.model, req, prepared)
                prompt_tokens = answer.result.prompt_tokens
                completion_tokens = answer.result.completion_tokens
                for text in _answer_chunks(answer, wire, backend, chunk):
                    yield text
            else:
                started: set[int] = set()
                async for event in router.stream(wire.model, req, prepared):
                    if event.index not in started:
                        started.add(event.index)
                        delta = ChoiceDelta(role="assistant", content="")
                        yield chunk([ChatCompletionChunkChoice(index=event.index, delta=delta)])
                    if isinstance(event, FinishEvent):
                        prompt_tokens = event.prompt_tokens
                        if event.text:
                            yield chunk([ChatCompletionChunkChoice(
                                index=event.index, delta=ChoiceDelta(content=event.text))])
                        reason = wire_finish_reason(event.reason)
                        yield chunk([ChatCompletionChunkChoice(index=event.index,
                                                               finish_reason=reason)])
                        continue  # fmt: skip
                    completion_tokens += 1
                    logprobs = (
                        logprobs_of([event], backend.token_text) if wire.logprobs else None
                    )
                    if event.text or logprobs:
                        yield chunk([ChatCompletionChunkChoice(
                            index=event.index, delta=ChoiceDelta(content=event.text),
                            logprobs=logprobs)])  # fmt: skip
        if usage_on:
            usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
            yield chunk([], usage=usage)
    except TimeoutError:
        yield sse(RequestTimeoutError("the request timed out").to_body())
    except SlmgateError as exc:
        yield sse(exc.to_body())
    except Exception:
        log.exception("error while streaming")
        yield sse(SlmgateError("The server had an error processing your request.").to_body())
    finally:
        gw.in_flight -= 1
    yield sse("[DONE]")


def _answer_chunks(
    answer: Answer, wire: ChatCompletionRequest, backend: Any, chunk: Callable[..., str]
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
