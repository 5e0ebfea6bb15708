"""Reading a request before any work: body size, nesting, parsing, task ids, and the bounds on
how much a request may ask for. Every refusal is a 4xx naming its limit."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from typing import Any, cast

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from decoding.engine_choice import parse_grammar_engine
from decoding.types import GenerationRequest, SamplingParams, Speculation
from gateway.config import Limits
from router.invalid import parse_on_invalid
from router.stats import parse_window
from schemas.chat import ChatCompletionRequest, ErrorResponse
from schemas.errors import (
    InvalidRequestError,
    PayloadTooLargeError,
    RequestTooLargeError,
    SchemaTooComplexError,
)
from schemas.json_limits import compact_json, lone_surrogate_path, raw_json_depth


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(f"request body exceeds {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLargeError(f"request body exceeds {limit} bytes")
    return bytes(body)


def check_nesting(body: bytes, limits: Limits) -> None:
    """A 400 for a body nested deeper than ``limits.max_json_depth``, measured on the raw bytes:
    the JSON parser and pydantic recurse per level (RecursionError past ~1,000)."""
    if body.count(b"[") + body.count(b"{") <= limits.max_json_depth:
        return  # cannot nest deeper than it has openers: skip the scan (most bodies)
    if raw_json_depth(body) > limits.max_json_depth:
        raise RequestTooLargeError(
            f"JSON nesting deeper than {limits.max_json_depth} levels (limits.max_json_depth)"
        )


def parse_request(body: bytes, limits: Limits) -> ChatCompletionRequest:
    """Parse and validate a chat request, nesting first (``check_nesting``)."""
    check_nesting(body, limits)
    try:
        # Strict UTF-8 (RFC 8259): json.loads on bytes would also take UTF-16/32 and let
        # CESU-8 surrogate bytes through as lone surrogates.
        data = json.loads(body.decode("utf-8"))
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


class TaskOutcome(BaseModel):
    """Body of ``POST /v1/tasks/{task_id}/outcome``."""

    model_config = ConfigDict(extra="forbid")
    success: bool
    score: float | None = Field(default=None, allow_inf_nan=False)


TASK_ID_MAX = 256


_TASK_ID = re.compile(rf"[!-~]{{1,{TASK_ID_MAX}}}")  # printable ASCII, no spaces


def check_task_id(value: str, param: str, source: str | None = None) -> str:
    """A task id as given, or a 400: 1-256 printable ASCII characters without whitespace (ids
    are stored, indexed and echoed back, so they are bounded and need no escaping)."""
    if not _TASK_ID.fullmatch(value):
        raise InvalidRequestError(
            f"{source or param}: a task id must be 1-{TASK_ID_MAX} printable ASCII characters "
            "without whitespace",
            param=param,
        )
    return value


def task_id_of(request: Request, wire: ChatCompletionRequest) -> str | None:
    header = request.headers.get("x-task-id")
    if header is not None:
        return check_task_id(header, "task_id", source="the X-Task-Id header")
    value = (wire.metadata or {}).get("task_id")
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidRequestError("metadata.task_id must be a string", param="metadata.task_id")
    return check_task_id(value, "metadata.task_id")


def parse_outcome(body: bytes, limits: Limits) -> TaskOutcome:
    """The body of ``POST /v1/tasks/{id}/outcome``, nesting checked first as for chat bodies."""
    check_nesting(body, limits)
    try:
        return TaskOutcome.model_validate_json(body or b"{}")
    except ValidationError as exc:
        error = ErrorResponse.from_validation_errors(exc.errors()).error
        raise InvalidRequestError(error.message, param=error.param) from None


def check_schema_sizes(wire: ChatCompletionRequest, limits: Limits) -> None:
    """A 400 for a response schema or tool parameters bigger than ``limits.max_schema_bytes``:
    checking a schema costs time linear in its size (seconds per MB for the meta-schema check),
    so it is bounded before any of it runs."""
    schemas: list[tuple[str, Any]] = []
    fmt = wire.response_format
    if fmt is not None and fmt.json_schema is not None and fmt.json_schema.schema_ is not None:
        schemas.append(("response_format.json_schema.schema", fmt.json_schema.schema_))
    for i, tool in enumerate(wire.tools or []):
        if tool.function.parameters is not None:
            schemas.append((f"tools.{i}.function.parameters", tool.function.parameters))
    for param, schema in schemas:
        size = len(compact_json(schema).encode())
        if size > limits.max_schema_bytes:
            raise SchemaTooComplexError(
                f"the schema is {size} bytes; at most {limits.max_schema_bytes} are accepted "
                "(limits.max_schema_bytes)",
                param=param,
            )


def bounded_params(
    wire: ChatCompletionRequest, req: GenerationRequest, limits: Limits
) -> SamplingParams:
    """The request's sampling parameters within ``n`` and ``n x max_tokens`` bounds. Without
    ``max_tokens`` each choice may use the budget's share (and at most the context left)."""
    params = req.params
    if params.n > limits.max_choices:
        raise RequestTooLargeError(
            f"n = {params.n} exceeds {limits.max_choices} (limits.max_choices)", param="n"
        )
    if params.max_tokens is None:  # bounded, not refused: the engine splits the budget
        return replace(params, token_budget=limits.max_generated_tokens)
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


def window_seconds(window: str) -> float | None:
    """``15m``/``1h``/``24h``/``7d``, seconds, or ``all`` (None); anything else is a 400."""
    try:
        return parse_window(window)
    except ValueError as exc:
        raise InvalidRequestError(str(exc), param="window") from None


SPECULATION_MODES = ("none", "suffix", "stand", "both")


EXTENSION_FIELDS = ("speculation", "grammar_engine", "on_invalid")


def extensions_of(wire: ChatCompletionRequest, req: GenerationRequest) -> GenerationRequest:
    """``req`` with the request's slmgate extension fields (sent like vLLM's extra sampling
    fields, e.g. ``extra_body`` in the openai SDK): ``speculation``, ``grammar_engine`` and
    ``on_invalid``; a bad value is a 400 naming the field."""
    extra = wire.model_extra or {}
    engine, on_invalid = extra.get("grammar_engine"), extra.get("on_invalid")
    return replace(
        req,
        speculation=speculation_of(wire),
        grammar_engine=None if engine is None else parse_grammar_engine(engine),
        on_invalid=None if on_invalid is None else parse_on_invalid(on_invalid),
    )


def speculation_of(wire: ChatCompletionRequest) -> Speculation | None:
    """The request's ``speculation`` extension field (like vLLM's extra sampling fields)."""
    value = (wire.model_extra or {}).get("speculation")
    if value is None:
        return None
    if value not in SPECULATION_MODES:
        raise InvalidRequestError(
            f"speculation must be one of {', '.join(SPECULATION_MODES)}", param="speculation"
        )
    return cast("Speculation", value)
