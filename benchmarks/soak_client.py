"""One soak client: sends a planned request and notes what it saw, hanging up when planned.

A ``disconnect`` client hangs up after its delay (counted from the response head when it
streams, so the cut lands mid-stream); a ``timeout`` client has a total deadline from the start.
Either way the connection is closed under the server, as a real client's would be.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

import httpx

from benchmarks.soak_plan import PlannedRequest, request_body

# An OpenAI error type (in a body or an SSE error event) -> the status it stands for.
TYPE_STATUS = {
    "invalid_request_error": 400, "authentication_error": 401, "not_found_error": 404,
    "rate_limit_error": 429, "cancelled": 499, "server_error": 500, "upstream_error": 502,
    "overloaded_error": 503, "timeout": 504,
}  # fmt: skip


@dataclass(slots=True)
class ClientResult:
    """What one client saw. ``status`` is the HTTP status (None when it hung up or failed
    before the head); ``stream_error_status`` the status of an error event inside a 200 stream."""

    index: int
    task_id: str
    route: str
    kind: str
    stream: bool
    behaviour: str
    latency_s: float
    status: int | None = None
    retry_after: str | None = None
    error_type: str | None = None
    stream_error_status: int | None = None
    cut: bool = False  # the client hung up itself (disconnect or deadline)
    transport_error: str | None = None
    saw_content: bool = False  # content or a tool call reached the client
    content_chunks: int = 0
    completion_tokens: int | None = None  # from the response's usage

    @property
    def final_status(self) -> int | None:
        """The status the client ended with: an in-stream error's, else the HTTP one."""
        return self.stream_error_status or self.status


def _error_type(data: Any) -> str | None:
    error = data.get("error") if isinstance(data, dict) else None
    return str(error.get("type")) if isinstance(error, dict) else None


def _note_chunk(result: ClientResult, data: dict[str, Any]) -> None:
    if "error" in data:
        result.error_type = _error_type(data)
        result.stream_error_status = TYPE_STATUS.get(result.error_type or "", 500)
        return
    usage = data.get("usage")
    if isinstance(usage, dict):
        result.completion_tokens = int(usage.get("completion_tokens") or 0)
    for choice in data.get("choices") or []:
        delta = choice.get("delta") or {}
        if delta.get("content") or delta.get("tool_calls"):
            result.saw_content = True
            result.content_chunks += 1


async def _read_stream(response: httpx.Response, result: ClientResult) -> None:
    async for line in response.aiter_lines():
        if not line.startswith("data:") or line[5:].strip() == "[DONE]":
            continue
        try:
            data = json.loads(line[5:])
        except ValueError:
            result.transport_error = f"malformed SSE line: {line[:80]!r}"
            continue
        if isinstance(data, dict):
            _note_chunk(result, data)


async def _exchange(
    client: httpx.AsyncClient, p: PlannedRequest, result: ClientResult,
    cut: asyncio.Timeout | None,
) -> None:  # fmt: skip
    body = request_body(p)
    headers = {"X-Task-Id": p.task_id}
    async with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
        result.status = r.status_code
        result.retry_after = r.headers.get("retry-after")
        if cut is not None and p.stream and p.behaviour == "disconnect":
            # A disconnecting stream hangs up its delay after the head: mid-generation.
            cut.reschedule(asyncio.get_running_loop().time() + (p.cut_after_s or 0.0))
        is_sse = r.headers.get("content-type", "").startswith("text/event-stream")
        if p.stream and r.status_code == 200 and is_sse:
            await _read_stream(r, result)
            return
        raw = await r.aread()
    try:
        data = json.loads(raw)
    except ValueError:
        return
    if not isinstance(data, dict):
        return
    if result.status != 200:
        result.error_type = _error_type(data)
        return
    usage = data.get("usage") or {}
    result.completion_tokens = int(usage.get("completion_tokens") or 0)
    message = ((data.get("choices") or [{}])[0]).get("message") or {}
    result.saw_content = bool(message.get("content") or message.get("tool_calls"))


async def run_one(client: httpx.AsyncClient, p: PlannedRequest) -> ClientResult:
    """Send ``p`` and return what its client saw; never raises for the server's behaviour."""
    result = ClientResult(p.index, p.task_id, p.route, p.kind, p.stream, p.behaviour, 0.0)
    started = time.perf_counter()
    deadline = None
    if p.cut_after_s is not None:
        deadline = asyncio.get_running_loop().time() + p.cut_after_s
        if p.behaviour == "disconnect" and p.stream:
            deadline += 600.0  # rescheduled from the response head
    try:
        async with asyncio.timeout_at(deadline) as cut:
            await _exchange(client, p, result, cut if deadline is not None else None)
    except TimeoutError:  # only the planned deadline raises this (httpx has its own errors)
        result.cut = True
    except httpx.HTTPError as exc:
        result.transport_error = f"{type(exc).__name__}: {exc}"[:200]
    result.latency_s = time.perf_counter() - started
    return result
