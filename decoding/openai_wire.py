"""The OpenAI Chat Completions wire format, both ways, for the remote backends: request bodies
with the constraint passed through, errors by status, and answers (whole or streamed) turned into
the embedded engine's shape — token events with the server's logprobs, tool calls written back as
``<tool_call>`` blocks, completion tokens matching the server's usage. No network here.

No logprobs, no signal: when the server returns no logprobs for a choice, the choice is one
``TokenEvent`` carrying the whole text with ``logprob=0.0``, ``entropy=0.0``, ``token_id=-1``
and ``forced=True``, the mark grammar-forced tokens get, so confidence scores skip it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Mapping
from typing import Any

from decoding.backend import FinishEvent
from decoding.constraint import JsonObject, JsonSchema, NoConstraint, Regex, ToolCalls
from decoding.grammar import check_usable
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


def split_count(total: int, weights: list[int]) -> list[int]:
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
        shares = split_count(total, [len(c.text) for c in blind])
        for choice, share in zip(blind, shares, strict=True):
            choice.token_ids = [-1] * share
    elif total > 0:
        weights = [len(c.token_ids) for c in choices]
        for choice, share in zip(choices, split_count(total, weights), strict=True):
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
