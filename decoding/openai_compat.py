"""A tier served by any OpenAI-compatible server (``vllm serve``, another slmgate, …).

The request goes out as a ``/v1/chat/completions`` body with the constraint passed through
(``response_format``, ``tools``/``tool_choice``), and the answer comes back in the embedded
engine's shape: token events with the server's logprobs (the router's confidence signals) and
tool calls written back as ``<tool_call>`` blocks, so ``decoding.validate.check_output`` checks
remote output exactly as it checks embedded output — a server that ignores the constraint is
caught there, not trusted.

The request/response mapping here (``chat_body``, ``result_from_response``, ``events_of``,
``error_for_status``) is shared with ``decoding.litellm_backend``; ``RemoteBackend`` holds what
both backends do around one call (checks, retries, circuit breaker, logprobs fallback).

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
import math
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx

from decoding.backend import BackendInfo, FinishEvent
from decoding.constraint import JsonObject, JsonSchema, NoConstraint, Regex, ToolCalls
from decoding.grammar import check_usable
from decoding.resilience import CircuitBreaker, RetryPolicy, call_with_retries, parse_retry_after
from decoding.types import (
    Choice,
    FinishReason,
    GenerationRequest,
    GenerationResult,
    TokenEvent,
    TopLogprob,
)
from schemas.errors import (
    ContextLengthError,
    InvalidRequestError,
    RequestTimeoutError,
    SlmgateError,
    UpstreamError,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

MIN_TOP_LOGPROBS = 5  # always asked for, so the router gets an entropy estimate


# ---- errors ---------------------------------------------------------------------------------


class UpstreamHTTPError(UpstreamError):
    """The server answered 429 or 5xx: retryable; ``retry_after`` is its Retry-After (s)."""

    def __init__(self, message: str, *, status_code: int, retry_after: float | None = None):
        super().__init__(message)
        self.status_code = status_code
        self.retry_after = retry_after


class UpstreamAuthError(UpstreamError):
    """The server refused our credentials (401/403): our configuration's fault, not the
    caller's, so a 502 that the router may route around — but retrying cannot fix it."""


def error_for_status(
    status: int,
    message: str,
    *,
    backend: str,
    retry_after: float | None = None,
    code: str | None = None,
    param: str | None = None,
) -> SlmgateError:
    """The slmgate error for an upstream HTTP error status.

    429/5xx → ``UpstreamHTTPError`` (retried); 408 → ``RequestTimeoutError`` (retried);
    401/403 → ``UpstreamAuthError`` (not retried); other 4xx → ``InvalidRequestError`` with the
    upstream message (the caller's request is wrong; never retried, never escalated)."""
    where = f"backend {backend}: upstream returned {status}: {message}"
    if status in (401, 403):
        return UpstreamAuthError(where)
    if status == 408:
        return RequestTimeoutError(where)
    if status == 429 or status >= 500:
        return UpstreamHTTPError(where, status_code=status, retry_after=retry_after)
    if 400 <= status < 500:
        if code == "context_length_exceeded":
            return ContextLengthError(message, param=param)
        return InvalidRequestError(message, param=param, code=code)
    return UpstreamError(where)


def is_retryable(exc: BaseException) -> bool:
    """What the retry loop retries: retryable slmgate errors except credential refusals."""
    if isinstance(exc, UpstreamAuthError):
        return False
    if isinstance(exc, SlmgateError):
        return exc.retryable
    return isinstance(exc, TimeoutError | ConnectionError)


def error_fields(body: Any, fallback: str) -> tuple[str, str | None, str | None]:
    """(message, code, param) from an OpenAI error body, or the raw text."""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        message = error.get("message") or fallback
        code, param = error.get("code"), error.get("param")
        return (
            str(message),
            code if isinstance(code, str) else None,
            param if isinstance(param, str) else None,
        )
    if isinstance(error, str):
        return error, None, None
    detail = body.get("detail") if isinstance(body, dict) else None  # FastAPI-style servers
    if detail is not None:
        return str(detail), None, None
    return fallback, None, None


# ---- request --------------------------------------------------------------------------------


def _tool_objects(constraint: ToolCalls) -> list[dict[str, Any]]:
    return [
        {
            "type": "function",
            "function": {"name": t.name, "parameters": t.parameters, "strict": t.strict},
        }
        for t in constraint.tools
    ]


def _response_format(constraint: JsonObject | JsonSchema) -> dict[str, Any]:
    if isinstance(constraint, JsonObject):
        return {"type": "json_object"}
    return {
        "type": "json_schema",
        "json_schema": {
            "name": constraint.name,
            "schema": constraint.schema,
            "strict": constraint.strict,
        },
    }


def chat_body(
    req: GenerationRequest, *, logprobs: bool, vllm_extras: bool
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The standard ``/v1/chat/completions`` fields for ``req`` (no ``model``) and the vLLM
    extras (``top_k``, ``structured_outputs``) kept apart, sent only when configured.

    ``tool_choice`` is rebuilt from the constraint: ``ToolCalls`` auto/required/named, and
    ``none`` when the request has tools but the constraint is not a tool one."""
    p = req.params
    body: dict[str, Any] = {"messages": list(req.messages), "temperature": p.temperature}
    if p.top_p != 1.0:
        body["top_p"] = p.top_p
    if p.seed is not None:
        body["seed"] = p.seed
    if p.max_tokens is not None:
        body["max_tokens"] = p.max_tokens
    if p.stop:
        body["stop"] = list(p.stop)
    if p.n != 1:
        body["n"] = p.n
    if logprobs:
        body["logprobs"] = True
        body["top_logprobs"] = max(MIN_TOP_LOGPROBS, p.top_logprobs)
    extras: dict[str, Any] = {}
    if vllm_extras and p.top_k != -1:
        extras["top_k"] = p.top_k
    c = req.constraint
    if isinstance(c, ToolCalls):
        body["tools"] = list(req.tools) or _tool_objects(c)
        if c.mode == "named":
            body["tool_choice"] = {"type": "function", "function": {"name": c.tools[0].name}}
        else:
            body["tool_choice"] = c.mode
        body["parallel_tool_calls"] = c.parallel
        if c.final is not None:
            body["response_format"] = _response_format(c.final)
    else:
        if req.tools:
            body["tools"] = list(req.tools)
            body["tool_choice"] = "none"
        if isinstance(c, JsonObject | JsonSchema):
            body["response_format"] = _response_format(c)
        elif isinstance(c, Regex) and vllm_extras:
            extras["structured_outputs"] = {"regex": c.pattern}
    return body, extras


def check_request(req: GenerationRequest, *, vllm_extras: bool, context_length: int) -> None:
    """What can be rejected before any network call: bad schemas, unsendable constraints."""
    c = req.constraint
    if isinstance(c, JsonSchema):
        check_usable(c.schema, "response_format")
    elif isinstance(c, ToolCalls):
        for i, tool in enumerate(c.tools):
            check_usable(tool.parameters, tool.param(i))
        if isinstance(c.final, JsonSchema):
            check_usable(c.final.schema, "response_format")
    elif isinstance(c, Regex) and not vllm_extras:
        raise InvalidRequestError(
            "regex constraints need a vLLM server (vllm_extras: true)", param="response_format"
        )
    elif not isinstance(c, JsonObject | NoConstraint | Regex):
        raise InvalidRequestError(f"unknown constraint {c!r}")
    max_tokens = req.params.max_tokens
    if max_tokens is not None and max_tokens >= context_length:
        raise ContextLengthError(
            f"This model's maximum context length is {context_length} tokens. However, you "
            f"requested {max_tokens} tokens in the completion.",
            param="max_tokens",
        )


# ---- response -------------------------------------------------------------------------------


class TokenTable:
    """Backend-local ids for token strings.

    Servers return token text, not vocabulary ids; the gateway renders logprobs through
    ``backend.token_text(token_id)``, so each distinct string gets a small id here. The ids
    mean nothing outside this backend. ``-1`` is the empty/unknown token (also used once the
    table is full)."""

    def __init__(self, capacity: int = 1 << 20):
        self.capacity = capacity
        self._ids: dict[str, int] = {}
        self._texts: list[str] = []

    def id_of(self, text: str) -> int:
        found = self._ids.get(text)
        if found is not None:
            return found
        if len(self._texts) >= self.capacity:
            return -1
        self._ids[text] = len(self._texts)
        self._texts.append(text)
        return self._ids[text]

    def text(self, token_id: int) -> str:
        return self._texts[token_id] if 0 <= token_id < len(self._texts) else ""


def entropy_estimate(logprobs: list[float]) -> float:
    """Entropy (nats) of a next-token distribution known only by its top entries.

    The returned entries are taken as they are and the residual mass ``1 - sum(p)`` as one
    more outcome — a lower bound on the true entropy (the residual is really spread over many
    tokens), tight when the top entries hold nearly all the mass, as in confident steps."""
    probs = [(math.exp(lp), lp) for lp in logprobs if lp > -math.inf]
    entropy = -sum(p * lp for p, lp in probs)
    residual = 1.0 - sum(p for p, _ in probs)
    if residual > 1e-12:
        entropy -= residual * math.log(residual)
    return max(0.0, entropy)


def render_tool_calls(content: str, calls: list[Any]) -> str:
    """Content, then one ``<tool_call>`` block per call, as the embedded models write them.

    Arguments that are not JSON are kept as the raw string, so the parser drops the call and
    validation reports it (the router escalates) instead of this code guessing."""
    parts = [content] if content else []
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            continue
        raw = function.get("arguments")
        arguments: Any = raw
        if isinstance(raw, str):
            try:
                arguments = json.loads(raw) if raw.strip() else {}
            except json.JSONDecodeError:
                arguments = raw
        obj = {"name": function.get("name"), "arguments": arguments}
        parts.append(f"<tool_call>\n{json.dumps(obj, ensure_ascii=False)}\n</tool_call>")
    return "\n".join(parts)


def _finish_reason(reason: Any) -> FinishReason:
    return "length" if reason == "length" else "stop"


def _token_events(
    index: int, entries: list[Any], text: str, tokens: TokenTable
) -> list[TokenEvent]:
    """One event per ``logprobs.content`` entry. Their texts are the token strings when those
    add up to ``text``; otherwise (tool calls, which the server reformats) they are empty and
    the whole text arrives with the choice's ``FinishEvent``."""
    strings = [str(e.get("token", "")) for e in entries]
    aligned = "".join(strings) == text
    events = []
    for entry, token in zip(entries, strings, strict=True):
        logprob = float(entry.get("logprob", 0.0))
        top = tuple(
            TopLogprob(tokens.id_of(str(t.get("token", ""))), str(t.get("token", "")),
                       float(t.get("logprob", -math.inf)))
            for t in entry.get("top_logprobs") or []
            if isinstance(t, dict)
        )  # fmt: skip
        dist = [t.logprob for t in top]
        if token not in {t.token for t in top}:
            dist.append(logprob)
        events.append(
            TokenEvent(
                index=index,
                token_id=tokens.id_of(token),
                text=token if aligned else "",
                logprob=logprob,
                entropy=entropy_estimate(dist),
                allowed_mass=1.0,
                forced=False,
                top_logprobs=top,
            )
        )
    return events


def _split(total: int, weights: list[int]) -> list[int]:
    """``total`` split over ``weights`` proportionally (integers that add up to ``total``)."""
    if not weights:
        return []
    if not sum(weights):
        weights = [1] * len(weights)
    shares = [total * w // sum(weights) for w in weights]
    shares[-1] += total - sum(shares)
    return shares


def result_from_response(
    data: Mapping[str, Any], *, name: str, tokens: TokenTable
) -> GenerationResult:
    """A chat completion response (as a dict) in the embedded engine's shape.

    Per choice: the text (content, then tool calls as ``<tool_call>`` blocks), token events
    from ``logprobs.content`` or one no-signal event (see the module docstring), and
    ``token_ids`` sized so that ``completion_tokens`` matches the server's usage."""
    raw_choices = data.get("choices")
    if not isinstance(raw_choices, list) or not raw_choices:
        raise UpstreamError(f"backend {name}: the response has no choices")
    usage = data.get("usage") or {}
    prompt_tokens = int(usage.get("prompt_tokens") or 0)
    cached_tokens = cached_of(usage)
    choices: list[Choice] = []
    for position, raw in enumerate(raw_choices):
        if not isinstance(raw, dict) or not isinstance(raw.get("message"), dict):
            raise UpstreamError(f"backend {name}: malformed choice in the response")
        index = int(raw.get("index", position))
        message = raw["message"]
        text = render_tool_calls(message.get("content") or "", message.get("tool_calls") or [])
        logprobs = raw.get("logprobs")
        entries = logprobs.get("content") if isinstance(logprobs, dict) else None
        if isinstance(entries, list) and entries:
            events = _token_events(index, [e for e in entries if isinstance(e, dict)], text,
                                   tokens)  # fmt: skip
            ids = [e.token_id for e in events]
        else:
            events = [TokenEvent(index, -1, text, 0.0, 0.0, 1.0, True)]
            ids = []
        choices.append(Choice(index, text, ids, events, _finish_reason(raw.get("finish_reason"))))
    # Tokens the usage counts beyond the logprob entries (tool calls, choices without logprobs)
    # are added as unknown (-1) ids: choices without any first, else shared by what each has.
    blind = [c for c in choices if not c.token_ids]
    counted = sum(len(c.token_ids) for c in choices)
    total = int(usage.get("completion_tokens") or 0) - counted
    if blind:
        if total <= 0:
            total = sum(max(1, len(c.text) // 4) for c in blind)
        for choice, share in zip(blind, _split(total, [len(c.text) for c in blind]), strict=True):
            choice.token_ids = [-1] * share
    elif total > 0:
        weights = [len(c.token_ids) for c in choices]
        for choice, share in zip(choices, _split(total, weights), strict=True):
            choice.token_ids.extend([-1] * share)
    choices.sort(key=lambda c: c.index)
    return GenerationResult(choices, prompt_tokens, name, cached_tokens)


def cached_of(usage: Mapping[str, Any]) -> int:
    """``usage.prompt_tokens_details.cached_tokens`` (vLLM and OpenAI report prefix hits)."""
    details = usage.get("prompt_tokens_details")
    return int(details.get("cached_tokens") or 0) if isinstance(details, dict) else 0


def events_of(result: GenerationResult) -> list[TokenEvent | FinishEvent]:
    """The event stream a finished result corresponds to: per choice its token events, then a
    ``FinishEvent`` with the text the events did not carry."""
    out: list[TokenEvent | FinishEvent] = []
    for choice in result.choices:
        carried = "".join(e.text for e in choice.events)
        out.extend(choice.events)
        rest = choice.text[len(carried) :] if choice.text.startswith(carried) else choice.text
        out.append(
            FinishEvent(
                choice.index,
                choice.finish_reason,
                rest,
                result.prompt_tokens,
                cached_tokens=result.cached_tokens,
            )
        )
    return out


class StreamAssembler:
    """One choice of an SSE stream turned into token events as its chunks arrive.

    Same shape as ``result_from_response``: per logprobs entry one event (the chunk's content
    on the token texts when they add up to it, else on the chunk's last event); a chunk with
    content but no logprobs is one no-signal event; streamed tool calls are collected and
    written as ``<tool_call>`` blocks into the ``FinishEvent``'s text."""

    def __init__(self, index: int, tokens: TokenTable):
        self.index = index
        self.tokens = tokens
        self.reason: FinishReason = "stop"
        self.finished = False  # a finish_reason arrived
        self.emitted = False  # any content so far
        self.calls: dict[int, dict[str, Any]] = {}

    def push(self, choice: Mapping[str, Any]) -> list[TokenEvent]:
        delta = choice.get("delta") or {}
        content = delta.get("content") or ""
        for call in delta.get("tool_calls") or []:
            if not isinstance(call, dict):
                continue
            slot = self.calls.setdefault(int(call.get("index", len(self.calls))),
                                         {"name": "", "arguments": ""})  # fmt: skip
            function = call.get("function") or {}
            slot["name"] += function.get("name") or ""
            slot["arguments"] += function.get("arguments") or ""
        if choice.get("finish_reason"):
            self.reason = _finish_reason(choice["finish_reason"])
            self.finished = True
        logprobs = choice.get("logprobs")
        entries = logprobs.get("content") if isinstance(logprobs, dict) else None
        events: list[TokenEvent] = []
        if isinstance(entries, list) and entries:
            entries = [e for e in entries if isinstance(e, dict)]
            events = _token_events(self.index, entries, content, self.tokens)
            if content and events and not events[-1].text:
                events[-1] = dataclasses.replace(events[-1], text=content)
        elif content:
            events = [TokenEvent(self.index, -1, content, 0.0, 0.0, 1.0, True)]
        self.emitted = self.emitted or bool(content)
        return events

    def finish(self, prompt_tokens: int, cached_tokens: int = 0, uncounted: int = 0) -> (
        FinishEvent
    ):
        calls = [
            {"function": {"name": c["name"], "arguments": c["arguments"]}}
            for _, c in sorted(self.calls.items())
        ]
        text = render_tool_calls("", calls)
        if text and self.emitted:
            text = "\n" + text
        return FinishEvent(self.index, self.reason, text, prompt_tokens,
                           cached_tokens=cached_tokens, uncounted_tokens=uncounted)  # fmt: skip


def stream_error(body: Mapping[str, Any], backend: str) -> SlmgateError:
    """An error object sent inside an SSE stream (after the 200): a caller error when its
    type says so, else an upstream failure."""
    error = body.get("error")
    message, code, param = error_fields(body, str(error))
    if isinstance(error, dict) and error.get("type") == "invalid_request_error":
        return error_for_status(400, message, backend=backend, code=code, param=param)
    return UpstreamError(f"backend {backend}: upstream failed mid-stream: {message}")


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
    """Any OpenAI-compatible chat completions server, over httpx. ``complete`` makes one
    non-streaming call; ``generate`` streams with SSE.

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
        with self._transport_errors():
            response = await self._http().post("/chat/completions", json=payload, headers=headers)
        if response.status_code >= 400:
            raise self._status_error(response)
        try:
            data = response.json()
        except ValueError:
            data = None
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
        after the usage chunk that carries the prompt token count."""
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
        with self._transport_errors():
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
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
        shares = _split(missing, weights) if missing > 0 else [0] * len(order)
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
        message, code, param = error_fields(data, response.text[:500] or response.reason_phrase)
        return error_for_status(
            response.status_code, message, backend=self.config.name, code=code, param=param,
            retry_after=parse_retry_after(response.headers.get("retry-after")),
        )  # fmt: skip

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()
