"""A tier served by any OpenAI-compatible server (``vllm serve``, another slmgate, …).

The request goes out as a ``/v1/chat/completions`` body with the constraint passed through
(``response_format``, ``tools``/``tool_choice``), and the answer comes back in the embedded
engine's shape: token events with the server's logprobs (the router's confidence signals) and
tool calls written back as ``<tool_call>`` blocks, so ``decoding.validate.check_output`` checks
remote output exactly as it checks embedded output — a server that ignores the constraint is
caught there, not trusted.

The request/response mapping (``decoding.openai_wire``: ``chat_body``, ``result_from_response``,
``events_of``, ``error_for_status``) is shared with ``decoding.litellm_backend``;
``RemoteBackend`` holds what both backends do around one call (checks, retries, circuit
breaker, logprobs fallback).

No logprobs, no signal: when the server returns no logprobs for a choice, the choice is one
``TokenEvent`` carrying the whole text with ``logprob=0.0``, ``entropy=0.0``, ``token_id=-1``
and ``forced=True`` — "carries no information about the model's confidence", the same mark the
grammar's forced tokens get, so confidence scores skip it. A backend whose server refused
logprobs also reports ``info.supports_logprobs=False``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx

from decoding.backend import BackendInfo, FinishEvent
from decoding.constraint import JsonObject, NoConstraint
from decoding.openai_wire import (
    StreamAssembler,
    TokenTable,
    cached_of,
    chat_body,
    check_request,
    error_fields,
    error_for_status,
    events_of,
    is_retryable,
    result_from_response,
    split_count,
    stream_error,
)
from decoding.resilience import CircuitBreaker, RetryPolicy, call_with_retries, parse_retry_after
from decoding.types import (
    GenerationRequest,
    GenerationResult,
    TokenEvent,
)
from decoding.upstream_http import JsonPoster
from schemas.errors import (
    InvalidRequestError,
    RequestTimeoutError,
    SlmgateError,
    UpstreamError,
)

log = logging.getLogger(__name__)
T = TypeVar("T")



# ---- the backends ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RemoteConfig:
    """One remote tier. ``model`` is the model id on the server (or LiteLLM's model string).

    ``base_url`` is the OpenAI-style root including ``/v1`` (``/v1`` is added when the URL
    has no path). ``api_key_env`` names the environment variable holding the key (never the
    key itself, so configs can be committed). Prices are $ per 1M tokens; ``None`` means the
    backend's default (0 for OpenAI-compatible servers, LiteLLM's cost map for LiteLLM)."""

    name: str
    model: str
    base_url: str | None = None
    tier: str = "llm"
    api_key_env: str | None = None
    timeout_s: float = 60.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    breaker_failures: int = 5
    breaker_reset_s: float = 30.0
    context_length: int = 32768
    supports_logprobs: bool = True
    vllm_extras: bool = False
    price_in_per_mtok: float | None = None
    price_out_per_mtok: float | None = None

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError(f"remote model {self.name!r} needs the model id on the server")
        if self.timeout_s <= 0 or self.context_length < 1:
            raise ValueError("timeout_s must be > 0 and context_length >= 1")

    def api_key(self) -> str | None:
        if self.api_key_env is None:
            return None
        key = os.environ.get(self.api_key_env)
        if not key:
            raise ValueError(
                f"model {self.name!r}: environment variable {self.api_key_env} is not set"
            )
        return key


def normalise_base_url(url: str) -> str:
    url = url.rstrip("/")
    return url + "/v1" if urlsplit(url).path in ("", "/") else url


@dataclass(frozen=True, slots=True)
class RemotePrepared:
    """``prepare``'s result: the request passed its local checks."""

    request: GenerationRequest


class RemoteBackend:
    """What every remote backend does around one call; subclasses implement ``_send``.

    ``generate`` here is built on the non-streaming call: it yields the events once the whole
    response has arrived (the gateway streams tool requests whole anyway; for free text the
    first byte comes later than with SSE). ``OpenAICompatBackend`` overrides it with SSE."""

    ready = True

    def __init__(
        self,
        config: RemoteConfig,
        model_label: str,
        prices: tuple[float, float] = (0.0, 0.0),
        *,
        breaker: CircuitBreaker | None = None,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ):
        self.config = config
        self.retry = config.retry
        self.breaker = breaker or CircuitBreaker(config.breaker_failures, config.breaker_reset_s)
        self.tokens = TokenTable()
        self._sleep = sleep
        self._logprobs_on = config.supports_logprobs
        self._closing: asyncio.Task[None] | None = None
        self.info = BackendInfo(
            name=config.name,
            tier=config.tier,
            model=model_label,
            context_length=config.context_length,
            supports_logprobs=config.supports_logprobs,
            supports_grammar=True,  # server-side structured output, checked after
            device="remote",
            dtype="n/a",
            price_in_per_mtok=prices[0],
            price_out_per_mtok=prices[1],
        )

    def prepare(self, req: GenerationRequest) -> RemotePrepared:
        """Reject what the server would reject anyway (bad schemas) before any network call."""
        check_request(
            req, vllm_extras=self.config.vllm_extras, context_length=self.config.context_length
        )
        return RemotePrepared(req)

    async def prepare_async(self, req: GenerationRequest) -> RemotePrepared:
        """``prepare`` inline when there is no schema to check (microseconds: no thread hop),
        on a worker thread when there is (a large schema takes milliseconds to check)."""
        if isinstance(req.constraint, NoConstraint | JsonObject):
            return self.prepare(req)
        return await asyncio.to_thread(self.prepare, req)

    async def complete(
        self, req: GenerationRequest, prepared: RemotePrepared | None = None
    ) -> GenerationResult:
        if prepared is None:
            self.prepare(req)

        async def attempt() -> GenerationResult:
            data = await self._with_logprobs_fallback(
                req, lambda body, extras: self._send(body, extras, req)
            )
            return result_from_response(data, name=self.config.name, tokens=self.tokens)

        return await call_with_retries(
            attempt, self.retry, self.breaker, is_retryable, name=self.config.name,
            sleep=self._sleep,
        )  # fmt: skip

    async def generate(
        self, req: GenerationRequest, prepared: RemotePrepared | None = None
    ) -> AsyncIterator[TokenEvent | FinishEvent]:
        result = await self.complete(req, prepared)
        for event in events_of(result):
            yield event

    def token_text(self, token_id: int) -> str:
        return self.tokens.text(token_id)

    async def _with_logprobs_fallback(
        self,
        req: GenerationRequest,
        send: Callable[[dict[str, Any], dict[str, Any]], Awaitable[T]],
    ) -> T:
        """``send(body, extras)`` asking for logprobs; a server that rejects them (a 400
        naming logprobs) is remembered and asked again without."""
        want = self._logprobs_on
        body, extras = chat_body(req, logprobs=want, vllm_extras=self.config.vllm_extras)
        try:
            return await send(body, extras)
        except InvalidRequestError as exc:
            if not (want and "logprob" in exc.message.lower()):
                raise
            log.warning("backend %s rejects logprobs (%s); asking without from now on",
                        self.config.name, exc.message)  # fmt: skip
            self._logprobs_on = False
            self.info = dataclasses.replace(self.info, supports_logprobs=False)
        body, extras = chat_body(req, logprobs=False, vllm_extras=self.config.vllm_extras)
        return await send(body, extras)

    async def _send(
        self, body: dict[str, Any], extras: dict[str, Any], req: GenerationRequest
    ) -> dict[str, Any]:
        raise NotImplementedError

    async def aclose(self) -> None:
        """Release connections (nothing to release here)."""

    def close(self) -> None:
        """Synchronous close, as the gateway calls it: schedules ``aclose`` on the running
        loop, or runs it when there is none."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            try:
                asyncio.run(self.aclose())
            except Exception:  # connections of a loop that is gone: nothing left to close
                log.debug("closing %s", self.config.name, exc_info=True)
            return
        self._closing = loop.create_task(self.aclose())


class OpenAICompatBackend(RemoteBackend):
    """Any OpenAI-compatible chat completions server. ``complete`` makes one non-streaming
    call (over aiohttp, ``decoding.upstream_http``: the gateway's hot path); ``generate``
    streams with SSE over httpx. A ``transport`` given (tests, recording) carries both.

    Sends ``response_format``/``tools``/``tool_choice`` through (vLLM enforces them with its
    structured-output backends); asks for logprobs with at least ``MIN_TOP_LOGPROBS`` top
    entries when ``supports_logprobs``; sends vLLM's ``top_k``/``structured_outputs`` only with
    ``vllm_extras``. Errors map as ``error_for_status`` says; connection failures become
    ``UpstreamError`` and timeouts ``RequestTimeoutError``, both retried."""

    def __init__(
        self,
        config: RemoteConfig,
        *,
        breaker: CircuitBreaker | None = None,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        if not config.base_url:
            raise ValueError(f"model {config.name!r}: an OpenAI-compatible backend needs base_url")
        self.base_url = normalise_base_url(config.base_url)
        prices = (config.price_in_per_mtok or 0.0, config.price_out_per_mtok or 0.0)
        # The served model's name only: a server's address is not for API output.
        super().__init__(config, config.model, prices, breaker=breaker, sleep=sleep)
        self._headers = {"Content-Type": "application/json"}
        key = config.api_key()
        if key:
            self._headers["Authorization"] = f"Bearer {key}"
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._client_loop: asyncio.AbstractEventLoop | None = None
        self._poster = (
            JsonPoster(config.name, self.base_url, self._headers, config.timeout_s)
            if transport is None
            else None
        )

    def _http(self) -> httpx.AsyncClient:
        """One client per event loop (a pooled connection cannot move between loops)."""
        loop = asyncio.get_running_loop()
        if self._client is None or self._client_loop is not loop or self._client.is_closed:
            self._client = httpx.AsyncClient(
                base_url=self.base_url,
                timeout=httpx.Timeout(self.config.timeout_s),
                headers=self._headers,
                transport=self._transport,
            )
            self._client_loop = loop
        return self._client

    async def _send(
        self, body: dict[str, Any], extras: dict[str, Any], req: GenerationRequest
    ) -> dict[str, Any]:
        payload = {"model": self.config.model, **body, **extras}
        headers = {"X-Task-Id": req.task_id} if req.task_id else None
        name = self.config.name
        if self._poster is not None:
            reply = await self._poster.post("/chat/completions", payload, headers)
            status, raw = reply.status, reply.body
            reason, retry_after = reply.reason, reply.headers.get("retry-after")
        else:
            with self._transport_errors():
                response = await self._http().post("/chat/completions", json=payload,
                                                   headers=headers)  # fmt: skip
            status, raw = response.status_code, response.content
            reason, retry_after = response.reason_phrase, response.headers.get("retry-after")
        try:
            data = json.loads(raw)
        except ValueError:
            data = None
        if status >= 400:
            text = raw.decode("utf-8", "replace")
            raise self._error_of(status, data, text or reason, retry_after)
        if not isinstance(data, dict):
            raise UpstreamError(f"backend {name}: the response is not a JSON object")
        return data

    async def generate(
        self, req: GenerationRequest, prepared: RemotePrepared | None = None
    ) -> AsyncIterator[TokenEvent | FinishEvent]:
        """Stream with SSE: events are yielded as the server's chunks arrive.

        Opening the stream is retried like a call (an error before the first byte); once
        chunks flow, a failure is raised as it is (what was yielded cannot be taken back) and
        counted against the circuit breaker. ``FinishEvent``s come at the end of the stream,
        after the usage chunk that carries the prompt token count. A request nobody reads
        incrementally (``req.incremental`` False) is asked for whole, without a stream."""
        if not req.incremental:
            async for event in super().generate(req, prepared):
                yield event
            return
        if prepared is None:
            self.prepare(req)

        async def open_stream() -> httpx.Response:
            return await self._with_logprobs_fallback(
                req, lambda body, extras: self._open_stream(body, extras, req)
            )

        response = await call_with_retries(
            open_stream, self.retry, self.breaker, is_retryable, name=self.config.name,
            sleep=self._sleep,
        )  # fmt: skip
        try:
            async for event in self._read_stream(response):
                yield event
        except SlmgateError as exc:
            if is_retryable(exc):
                self.breaker.record_failure()
            raise
        finally:
            await response.aclose()

    async def _open_stream(
        self, body: dict[str, Any], extras: dict[str, Any], req: GenerationRequest
    ) -> httpx.Response:
        payload = {
            "model": self.config.model, **body, **extras,
            "stream": True, "stream_options": {"include_usage": True},
        }  # fmt: skip
        client = self._http()
        request = client.build_request(
            "POST", "/chat/completions", json=payload,
            headers={"X-Task-Id": req.task_id} if req.task_id else None,
        )  # fmt: skip
        with self._transport_errors():
            response = await client.send(request, stream=True)
        if response.status_code >= 400:
            with self._transport_errors():
                await response.aread()
            await response.aclose()
            raise self._status_error(response)
        return response

    async def _read_stream(
        self, response: httpx.Response
    ) -> AsyncIterator[TokenEvent | FinishEvent]:
        name = self.config.name
        choices: dict[int, StreamAssembler] = {}
        prompt_tokens = cached_tokens = completion_tokens = 0
        events_seen: dict[int, int] = {}  # token events per choice
        done = False
        # Read to the end of the body, past [DONE]: a stream left unread is a connection closed,
        # and the next request pays a new TCP handshake.
        with self._transport_errors():
            lines_of: Any = response.aiter_lines()  # an async generator: closed, not collected
            async with contextlib.aclosing(lines_of) as lines:
                async for line in lines:
                    if done or not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        done = True
                        continue
                    try:
                        chunk = json.loads(data)
                    except json.JSONDecodeError:
                        raise UpstreamError(f"backend {name}: malformed SSE data") from None
                    if not isinstance(chunk, dict):
                        continue
                    if "error" in chunk:
                        raise stream_error(chunk, name)
                    usage = chunk.get("usage")
                    if isinstance(usage, dict):
                        prompt_tokens = int(usage.get("prompt_tokens") or 0)
                        cached_tokens = cached_of(usage)
                        completion_tokens = int(usage.get("completion_tokens") or 0)
                    for position, choice in enumerate(chunk.get("choices") or []):
                        if not isinstance(choice, dict):
                            continue
                        index = int(choice.get("index", position))
                        assembler = choices.setdefault(index, StreamAssembler(index, self.tokens))
                        for event in assembler.push(choice):
                            events_seen[index] = events_seen.get(index, 0) + 1
                            yield event
        if not choices or not (done or all(c.finished for c in choices.values())):
            raise UpstreamError(f"backend {name}: the stream ended before the answer did")
        order = sorted(choices)
        # The server's usage counts tokens no event carried (tool-call deltas, merged chunks):
        # they are shared out by each choice's events so completion_tokens matches the usage.
        missing = completion_tokens - sum(events_seen.values())
        weights = [events_seen.get(i, 0) + 1 for i in order]
        shares = split_count(missing, weights) if missing > 0 else [0] * len(order)
        for index, share in zip(order, shares, strict=True):
            yield choices[index].finish(prompt_tokens, cached_tokens, uncounted=share)

    @contextlib.contextmanager
    def _transport_errors(self) -> Iterator[None]:
        """httpx failures as slmgate errors: timeouts → 504, the rest → 502 (retryable)."""
        name = self.config.name
        try:
            yield
        except httpx.TimeoutException as exc:
            raise RequestTimeoutError(
                f"backend {name}: no answer from {self.base_url} within {self.config.timeout_s:g} s"
            ) from exc
        except httpx.TransportError as exc:
            raise UpstreamError(f"backend {name}: cannot reach {self.base_url}: {exc!r}") from exc

    def _status_error(self, response: httpx.Response) -> SlmgateError:
        try:
            data = response.json()
        except ValueError:
            data = None
        return self._error_of(response.status_code, data,
                              response.text or response.reason_phrase,
                              response.headers.get("retry-after"))  # fmt: skip

    def _error_of(
        self, status: int, data: Any, text: str, retry_after: str | None
    ) -> SlmgateError:
        """The gateway's error for an upstream's error answer (its JSON ``data`` if any)."""
        message, code, param = error_fields(data, text[:500])
        return error_for_status(
            status, message, backend=self.config.name, code=code, param=param,
            retry_after=parse_retry_after(retry_after),
        )  # fmt: skip

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()
        if self._poster is not None:
            await self._poster.aclose()
