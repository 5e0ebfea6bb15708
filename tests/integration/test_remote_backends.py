"""Remote backends: OpenAICompatBackend and LiteLLMBackend.

Failure paths run against a small scripted HTTP server started in-process (no model); the
real-model tests (``slow``) point both backends at the live ``slmgate serve`` of the
``server`` fixture, a real OpenAI-compatible server.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import httpx
import pytest
import uvicorn

from decoding.backend import FinishEvent, collect
from decoding.constraint import JsonSchema, NoConstraint, ToolCalls, ToolSpec
from decoding.models import ModelSpec, build_backend
from decoding.openai_compat import OpenAICompatBackend, RemoteBackend, RemoteConfig
from decoding.openai_wire import (
    UpstreamAuthError,
    UpstreamHTTPError,
    entropy_estimate,
    events_of,
)
from decoding.resilience import CircuitBreaker, RetryPolicy
from decoding.types import GenerationRequest, GenerationResult, SamplingParams, TokenEvent
from decoding.validate import check_output
from schemas.errors import (
    ContextLengthError,
    InvalidRequestError,
    OverloadedError,
    RequestTimeoutError,
    UpstreamError,
)

from .conftest import KEY, free_port

# ---- a scripted OpenAI-compatible server ----------------------------------------------------


@dataclass
class Reply:
    """One scripted answer. A 200 with a completion body answers a ``stream`` request with
    the same completion as SSE chunks; ``sse`` sends that raw event text instead."""

    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    sse: str | None = None


def sse_event(payload: Any) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def to_sse(body: dict[str, Any]) -> str:
    """A completion as the chunks an OpenAI-style server streams: one token per chunk when
    the logprob tokens spell the content, tool calls as name then argument pieces."""
    choice = body["choices"][0]
    message = choice["message"]
    content = message.get("content") or ""
    entries = (choice.get("logprobs") or {}).get("content")

    def chunk(delta: dict[str, Any], **extra: Any) -> str:
        return sse_event({"object": "chat.completion.chunk",
                          "choices": [{"index": 0, "delta": delta, **extra}]})  # fmt: skip

    out = [chunk({"role": "assistant", "content": ""})]
    if entries and "".join(e["token"] for e in entries) == content:
        out += [chunk({"content": e["token"]}, logprobs={"content": [e]}) for e in entries]
    else:
        half = len(content) // 2
        out += [chunk({"content": part}) for part in (content[:half], content[half:]) if part]
        if entries:
            out.append(chunk({}, logprobs={"content": entries}))
    for i, call in enumerate(message.get("tool_calls") or []):
        function = call["function"]
        head = {"index": i, "id": call["id"], "type": "function",
                "function": {"name": function["name"], "arguments": ""}}  # fmt: skip
        out.append(chunk({"tool_calls": [head]}))
        args = function["arguments"]
        for piece in (args[: len(args) // 2], args[len(args) // 2 :]):
            out.append(chunk({"tool_calls": [{"index": i, "function": {"arguments": piece}}]}))
    out.append(chunk({}, finish_reason=choice["finish_reason"]))
    out.append(sse_event({"object": "chat.completion.chunk", "choices": [],
                          "usage": body["usage"]}))  # fmt: skip
    return "".join(out) + "data: [DONE]\n\n"


@dataclass
class Script:
    """The replies the server gives, in order, and the requests it saw."""

    replies: list[Reply] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        raw = b""
        while True:
            message = await receive()
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        self.requests.append({"path": scope["path"], "headers": headers, "json": json.loads(raw)})
        reply = self.replies.pop(0) if self.replies else Reply(500, error("script exhausted"))
        if reply.delay_s:
            await asyncio.sleep(reply.delay_s)
        kind = b"application/json"
        body = json.dumps(reply.body).encode()
        streamed = self.requests[-1]["json"].get("stream")
        if reply.sse is not None or (streamed and reply.status == 200):
            kind = b"text/event-stream"
            body = (reply.sse if reply.sse is not None else to_sse(reply.body)).encode()
        extra = [(k.encode(), v.encode()) for k, v in reply.headers.items()]
        await send({
            "type": "http.response.start", "status": reply.status,
            "headers": [(b"content-type", kind), *extra],
        })  # fmt: skip
        await send({"type": "http.response.body", "body": body})


def error(message: str, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": "x", "param": None, "code": code}}


def completion(
    text: str | None = "hello",
    *,
    logprobs: list[tuple[str, float, list[tuple[str, float]]]] | None = None,
    tool_calls: list[tuple[str, str]] | None = None,
    finish: str = "stop",
    usage: tuple[int, int] = (11, 7),
) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if tool_calls:
        message["tool_calls"] = [
            {"id": f"call_{i}", "type": "function", "function": {"name": n, "arguments": a}}
            for i, (n, a) in enumerate(tool_calls)
        ]
    choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": finish}
    if logprobs is not None:
        choice["logprobs"] = {"content": [
            {"token": t, "logprob": lp, "bytes": list(t.encode()),
             "top_logprobs": [{"token": a, "logprob": b, "bytes": []} for a, b in top]}
            for t, lp, top in logprobs
        ]}  # fmt: skip
    return {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
        "choices": [choice],
        "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1],
                  "total_tokens": sum(usage)},
    }  # fmt: skip


@pytest.fixture(scope="module")
def scripted_server() -> Iterator[tuple[str, list[Script]]]:
    """A server whose behaviour each test scripts (``holder[0]`` is the current script)."""
    holder = [Script()]

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await holder[0](scope, receive, send)

    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="error", lifespan="off",
        timeout_graceful_shutdown=1,
    )  # fmt: skip
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "scripted server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}/v1", holder
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def script(scripted_server: tuple[str, list[Script]]) -> Script:
    scripted_server[1][0] = Script()
    return scripted_server[1][0]


@pytest.fixture
def url(scripted_server: tuple[str, list[Script]]) -> str:
    return scripted_server[0]


class Waits:
    """Records the backoff waits instead of sleeping (no wall-clock in these tests)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.seconds.append(seconds)


def config(url: str, **kw: Any) -> RemoteConfig:
    base: dict[str, Any] = {
        "name": "remote", "model": "m", "base_url": url,
        "retry": RetryPolicy(max_retries=2, base_delay_s=0.01, jitter=False),
    }  # fmt: skip
    return RemoteConfig(**{**base, **kw})


@pytest.fixture
async def make_backend(url: str) -> AsyncIterator[Callable[..., OpenAICompatBackend]]:
    made: list[OpenAICompatBackend] = []

    def make(
        waits: Waits | None = None, breaker: CircuitBreaker | None = None, **kw: Any
    ) -> OpenAICompatBackend:
        backend = OpenAICompatBackend(config(url, **kw), breaker=breaker, sleep=waits or Waits())
        made.append(backend)
        return backend

    yield make
    for backend in made:
        await backend.aclose()


def chat(text: str = "Say hi.", **params: Any) -> GenerationRequest:
    return GenerationRequest(
        messages=({"role": "user", "content": text},),
        params=SamplingParams(**{"temperature": 0.0, "max_tokens": 16, **params}),
    )


WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS: tuple[dict[str, Any], ...] = (
    {"type": "function", "function": {"name": "get_weather", "strict": True,
                                      "description": "Weather for a city",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]}}},
)  # fmt: skip


def tool_request(mode: str = "required", parallel: bool = False) -> GenerationRequest:
    specs = tuple(ToolSpec(t["function"]["name"], t["function"]["parameters"],
                           bool(t["function"].get("strict"))) for t in TOOLS)  # fmt: skip
    if mode == "named":
        specs = specs[1:]
    constraint = ToolCalls(specs, mode=mode, parallel=parallel)  # type: ignore[arg-type]
    return replace(
        chat("What's the weather in Paris in celsius?", max_tokens=60),
        constraint=constraint, tools=TOOLS,
    )  # fmt: skip


# ---- failure paths (scripted server, no model) ----------------------------------------------


async def test_500_then_200_is_retried_and_succeeds(
    script: Script, make_backend: Callable[..., OpenAICompatBackend]
) -> None:
    script.replies = [Reply(500, error("boom")), Reply(200, completion("ok"))]
    waits = Waits()
    backend = make_backend(waits)
    result = await backend.complete(chat())
    assert [c.text for c in result.choices] == ["ok"]
    assert len(script.requests) == 2
    assert script.requests[0]["json"] == script.requests[1]["json"]
    assert waits.seconds == [0.01]
    assert backend.breaker.state == "closed"


async def test_429_retry_after_is_honoured(
    script: Script, make_backend: Callable[..., OpenAICompatBackend]
) -> None:
    script.replies = [
        Reply(429, error("slow down"), {"Retry-After": "3"}),
        Reply(200, completion("ok")),
    ]
    waits = Waits()
    result = await make_backend(waits).complete(chat())
    assert result.choices[0].text == "ok"
    assert waits.seconds == [3.0]
    assert len(script.requests) == 2


async def test_persistent_503_raises_then_the_breaker_fails_fast(
    script: Script, make_backend: Callable[..., OpenAICompatBackend]
) -> None:
    script.replies = [Reply(503, error("overloaded")) for _ in range(3)]
    breaker = CircuitBreaker(failure_threshold=3, reset_after_s=60.0)
    waits = Waits()
    backend = make_backend(waits, breaker)
    with pytest.raises(UpstreamHTTPError) as info:
        await backend.complete(chat())
    assert info.value.status == 502
    assert info.value.status_code == 503
    assert info.value.retryable
    assert "overloaded" in info.value.message
    assert len(script.requests) == 3  # 1 + max_retries
    assert waits.seconds == [0.01, 0.02]
    assert breaker.state == "open"

    with pytest.raises(OverloadedError, match="circuit open for backend remote"):
        await backend.complete(chat())
    assert len(script.requests) == 3  # failed fast, no request


async def test_400_is_the_callers_error_and_not_retried(
    script: Script, make_backend: Callable[..., OpenAICompatBackend]
) -> None:
    script.replies = [Reply(400, error("messages[0].role is invalid")), Reply(200, completion())]
    breaker = CircuitBreaker(failure_threshold=1)
    with pytest.raises(InvalidRequestError) as info:
        await make_backend(breaker=breaker).complete(chat())
    assert info.value.message == "messages[0].role is invalid"
    assert info.value.status == 400
    assert not info.value.retryable
    assert len(script.requests) == 1
    assert breaker.state == "closed"  # not held against the server


async def test_upstream_context_length_error_keeps_its_code(
    script: Script, make_backend: Callable[..., OpenAICompatBackend]
) -> None:
    script.replies = [Reply(400, error("too long", code="context_length_exceeded"))]
    with pytest.raises(ContextLengthError, match="too long"):
        await make_backend().complete(chat())


async def test_401_is_our_configs_fault_502_and_not_retried(
    script: Script, make_backend: Callable[..., OpenAICompatBackend]
) -> None:
    script.replies = [Reply(401, error("bad key")), Reply(200, completion())]
    with pytest.raises(UpstreamAuthError) as info:
        await make_backend().complete(chat())
    assert info.value.status == 502
    assert len(script.requests) == 1


async def test_slow_server_times_out(
    script: Script, make_backend: Callable[..., OpenAICompatBackend]
) -> None:
    script.replies = [Reply(200, completion(), delay_s=1.0)]
    backend = make_backend(timeout_s=0.2, retry=RetryPolicy(max_retries=0))
    with pytest.raises(RequestTimeoutError) as info:
        await backend.complete(chat())
    assert info.value.retryable
    assert len(script.requests) == 1


async def test_unreachable_server_is_a_retryable_upstream_error() -> None:
    backend = OpenAICompatBackend(
        config(f"http://127.0.0.1:{free_port()}/v1", retry=RetryPolicy(max_retries=1)),
        sleep=Waits(),
    )
    with pytest.raises(UpstreamError, match="cannot reach") as info:
        await backend.complete(chat())
    assert info.value.retryable
    assert backend.breaker.failures == 2
    await backend.aclose()


async def test_rejected_logprobs_are_remembered(
    script: Script, make_backend: Callable[..., OpenAICompatBackend]
) -> None:
    script.replies = [
        Reply(400, error("logprobs are not supported by this model")),
        Reply(200, completion("a")),
        Reply(200, completion("b")),
    ]
    backend = make_backend()
    assert backend.info.supports_logprobs
    assert (await backend.complete(chat())).choices[0].text == "a"
    assert (await backend.complete(chat())).choices[0].text == "b"
    sent = [r["json"] for r in script.requests]
    assert [("logprobs" in s, "top_logprobs" in s) for s in sent] == [
        (True, True),
        (False, False),
        (False, False),
    ]
    assert not backend.info.supports_logprobs


async def test_bad_schema_is_rejected_before_any_request(
    script: Script, make_backend: Callable[..., OpenAICompatBackend]
) -> None:
    backend = make_backend()
    bad = replace(chat(), constraint=JsonSchema({"type": "object", "properties": {"a": 3}}))
    with pytest.raises(InvalidRequestError, match="invalid JSON schema") as info:
        backend.prepare(bad)
    assert info.value.param == "response_format"
    with pytest.raises(InvalidRequestError):
        await backend.complete(bad)
    unsatisfiable = replace(chat(), constraint=JsonSchema({"type": "array", "enum": ["a"]}))
    with pytest.raises(InvalidRequestError, match="cannot be satisfied"):
        backend.prepare(unsatisfiable)
    bad_tool = replace(
        tool_request(),
        constraint=ToolCalls((ToolSpec("f", {"type": "object", "required": "x"}),)),
    )
    with pytest.raises(InvalidRequestError) as info:
        backend.prepare(bad_tool)
    assert info.value.param == "tools.0.function.parameters"  # as the embedded engine says
    assert script.requests == []


# ---- request and response mapping (scripted server) -----------------------------------------


async def test_request_body_for_tools_schema_and_sampling(
    script: Script,
    make_backend: Callable[..., OpenAICompatBackend],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("REMOTE_TEST_KEY", "sk-remote")
    script.replies = [Reply(200, completion()) for _ in range(4)]
    backend = make_backend(api_key_env="REMOTE_TEST_KEY")
    await backend.complete(replace(tool_request("named"), task_id="task-9"))
    schema_req = replace(
        chat(top_p=0.9, seed=7, stop=("END",), n=2, top_k=40, logprobs=True, top_logprobs=8),
        constraint=JsonSchema(WEATHER, strict=True, name="weather"),
    )
    await backend.complete(schema_req)
    await make_backend(vllm_extras=True, supports_logprobs=False).complete(schema_req)
    none_req = replace(chat(), tools=TOOLS, constraint=NoConstraint())
    await backend.complete(none_req)

    named, schema, extras, none = (r["json"] for r in script.requests)
    assert script.requests[0]["path"] == "/v1/chat/completions"
    assert script.requests[0]["headers"]["authorization"] == "Bearer sk-remote"
    assert script.requests[0]["headers"]["x-task-id"] == "task-9"
    assert named["model"] == "m"
    assert named["tools"] == list(TOOLS)
    assert named["tool_choice"] == {"type": "function", "function": {"name": "get_time"}}
    assert named["parallel_tool_calls"] is False
    assert (named["logprobs"], named["top_logprobs"]) == (True, 5)  # always asked for
    assert "response_format" not in named
    assert schema["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "weather", "schema": WEATHER, "strict": True},
    }
    assert {k: schema[k] for k in ("temperature", "top_p", "seed", "stop", "n", "max_tokens")} == {
        "temperature": 0.0, "top_p": 0.9, "seed": 7, "stop": ["END"], "n": 2, "max_tokens": 16
    }  # fmt: skip
    assert schema["top_logprobs"] == 8
    assert "top_k" not in schema  # a vLLM extra: only when configured
    assert extras["top_k"] == 40
    assert "logprobs" not in extras
    assert none["tool_choice"] == "none"
    assert none["tools"] == list(TOOLS)


async def test_logprobs_become_token_events(
    script: Script, make_backend: Callable[..., OpenAICompatBackend]
) -> None:
    lp = [
        ("Hel", -0.1, [("Hel", -0.1), ("Hi", -2.5)]),
        ("lo", -0.01, [("lo", -0.01)]),
    ]
    script.replies = [Reply(200, completion("Hello", logprobs=lp, usage=(9, 2)))]
    backend = make_backend()
    events = [e async for e in backend.generate(chat())]
    tokens = [e for e in events if isinstance(e, TokenEvent)]
    assert [(e.text, e.logprob) for e in tokens] == [("Hel", -0.1), ("lo", -0.01)]
    assert [backend.token_text(e.token_id) for e in tokens] == ["Hel", "lo"]
    assert [[(t.token, t.logprob) for t in e.top_logprobs] for e in tokens] == [
        [("Hel", -0.1), ("Hi", -2.5)],
        [("lo", -0.01)],
    ]
    assert tokens[0].entropy == pytest.approx(entropy_estimate([-0.1, -2.5]))
    assert all(e.allowed_mass == 1.0 and not e.forced for e in tokens)
    finish = events[-1]
    assert isinstance(finish, FinishEvent)
    assert (finish.reason, finish.text, finish.prompt_tokens) == ("stop", "", 9)


def test_entropy_estimate_counts_the_residual_mass() -> None:
    assert entropy_estimate([0.0]) == 0.0
    half = math.log(0.5)
    assert entropy_estimate([half, half]) == pytest.approx(math.log(2))
    assert entropy_estimate([half]) == pytest.approx(math.log(2))  # residual 0.5 lumped
    assert entropy_estimate([half, -math.inf]) == pytest.approx(math.log(2))


async def test_tool_calls_are_rendered_for_the_parser_and_validated(
    script: Script, make_backend: Callable[..., OpenAICompatBackend]
) -> None:
    calls = [("get_weather", '{"city": "Paris", "unit": "c"}'), ("get_time", '{"tz": "CET"}')]
    lp = [("{", -0.5, [("{", -0.5)])]
    script.replies = [
        Reply(200, completion("Sure.", tool_calls=calls, finish="tool_calls", logprobs=lp)),
        Reply(200, completion(None, tool_calls=[("get_weather", '{"city": 1}')])),
    ]
    backend = make_backend()
    req = tool_request("auto", parallel=True)
    result = await backend.complete(req)
    text = result.choices[0].text
    assert text == (
        "Sure.\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n'
        "</tool_call>\n"
        '<tool_call>\n{"name": "get_time", "arguments": {"tz": "CET"}}\n</tool_call>'
    )
    assert result.choices[0].finish_reason == "stop"
    check = check_output(req.constraint, text)
    assert check.valid
    assert check.parsed is not None
    assert check.parsed.content == "Sure."
    assert [(c.name, json.loads(c.arguments)) for c in check.parsed.tool_calls] == [
        ("get_weather", {"city": "Paris", "unit": "c"}),
        ("get_time", {"tz": "CET"}),
    ]
    # The logprob events carry no text (the server reformatted the calls): the stream's
    # text arrives whole with the FinishEvent, and matches the result's.
    assert [e.text for e in result.choices[0].events] == [""]
    assert result.choices[0].events[0].logprob == -0.5

    invalid = await backend.complete(req)
    assert not check_output(req.constraint, invalid.choices[0].text).valid


async def test_no_logprobs_is_one_no_signal_event_and_usage_counts(
    script: Script, make_backend: Callable[..., OpenAICompatBackend]
) -> None:
    script.replies = [Reply(200, completion("four words of text", finish="length", usage=(5, 4)))]
    backend = make_backend(supports_logprobs=False)
    result = await backend.complete(chat())
    assert "logprobs" not in script.requests[0]["json"]
    assert events_of(result) == [
        TokenEvent(0, -1, "four words of text", 0.0, 0.0, 1.0, True),
        FinishEvent(0, "length", "", 5),
    ]
    assert (result.prompt_tokens, result.completion_tokens) == (5, 4)


STREAM_CASES = {
    "text": completion(
        "Hello", usage=(9, 2),
        logprobs=[("Hel", -0.1, [("Hel", -0.1), ("Hi", -2.5)]), ("lo", -0.01, [("lo", -0.01)])],
    ),
    "tools": completion(
        "Sure.", finish="tool_calls",
        tool_calls=[("get_weather", '{"city": "Paris", "unit": "c"}'), ("get_time", "{}")],
        logprobs=[("{", -0.5, [("{", -0.5), ("<", -1.0)]), ("}", -0.2, [])],
    ),
    "calls only": completion(None, tool_calls=[("get_time", '{"tz": "UTC"}')]),
    "no logprobs": completion("plain text answer", finish="length"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(STREAM_CASES))
async def test_streaming_gives_what_complete_gives(
    case: str, script: Script, make_backend: Callable[..., OpenAICompatBackend]
) -> None:
    """The SSE path and the non-streaming path agree on text, logprobs, finish and usage."""
    script.replies = [Reply(200, STREAM_CASES[case]), Reply(200, STREAM_CASES[case])]
    backend = make_backend()
    result = await backend.complete(tool_request("auto", parallel=True))
    streamed = [e async for e in backend.generate(tool_request("auto", parallel=True))]
    assert script.requests[1]["json"]["stream"] is True
    assert "stream" not in script.requests[0]["json"]
    tokens = [e for e in streamed if isinstance(e, TokenEvent)]
    finishes = [e for e in streamed if isinstance(e, FinishEvent)]
    assert len(finishes) == 1
    assert streamed[-1] is finishes[0]
    assert "".join(e.text for e in tokens) + finishes[0].text == result.choices[0].text
    assert finishes[0].reason == result.choices[0].finish_reason
    assert finishes[0].prompt_tokens == result.prompt_tokens
    # Tool-call deltas carry no token events: the usage count still reaches the books.
    assert collect(streamed, "m").completion_tokens == result.completion_tokens
    signal = [(e.logprob, e.entropy, e.top_logprobs) for e in tokens if not e.forced]
    expected = [(e.logprob, e.entropy, e.top_logprobs) for e in result.choices[0].events
                if not e.forced]  # fmt: skip
    assert signal == expected


async def drain(events: AsyncIterator[TokenEvent | FinishEvent], seen: list[str]) -> None:
    async for event in events:
        seen.append(event.text)


async def test_stream_open_is_retried_and_mid_stream_errors_raise(
    script: Script, make_backend: Callable[..., OpenAICompatBackend]
) -> None:
    script.replies = [Reply(502, error("bad gateway")), Reply(200, completion("ok"))]
    waits = Waits()
    backend = make_backend(waits, CircuitBreaker(failure_threshold=5))
    events = [e async for e in backend.generate(chat())]
    assert "".join(e.text for e in events) == "ok"
    assert len(script.requests) == 2
    assert waits.seconds == [0.01]

    broken = sse_event({"choices": [{"index": 0, "delta": {"content": "par"}}]}) + sse_event(
        {"error": {"message": "engine died", "type": "server_error"}}
    )
    script.replies = [Reply(200, sse=broken)]
    seen: list[str] = []
    with pytest.raises(UpstreamError, match="engine died") as info:
        await drain(backend.generate(chat()), seen)
    assert seen == ["par"]
    assert info.value.retryable
    assert len(script.requests) == 3  # not retried once text was out
    assert backend.breaker.failures == 1

    script.replies = [Reply(400, error("bad role"))]
    with pytest.raises(InvalidRequestError, match="bad role"):
        [e async for e in backend.generate(chat())]
    assert len(script.requests) == 4

    cut = sse_event({"choices": [{"index": 0, "delta": {"content": "par"}}]})  # no finish
    script.replies = [Reply(200, sse=cut)]
    with pytest.raises(UpstreamError, match="stream ended before the answer"):
        [e async for e in backend.generate(chat())]


async def test_malformed_response_is_a_retryable_upstream_error(
    script: Script, make_backend: Callable[..., OpenAICompatBackend]
) -> None:
    script.replies = [Reply(200, {"choices": []}), Reply(200, completion("ok"))]
    result = await make_backend().complete(chat())
    assert result.choices[0].text == "ok"
    assert len(script.requests) == 2


def test_info_and_base_url() -> None:
    backend = OpenAICompatBackend(
        RemoteConfig("vllm", "Qwen/Qwen2.5-7B", base_url="http://gpu:8000", tier="llm",
                     context_length=8192, price_in_per_mtok=0.1, price_out_per_mtok=0.3)
    )  # fmt: skip
    info = backend.info
    assert backend.ready
    assert info.model == "Qwen/Qwen2.5-7B"  # no server address in API output
    assert (info.name, info.tier, info.context_length) == ("vllm", "llm", 8192)
    assert (info.supports_logprobs, info.supports_grammar) == (True, True)
    assert (info.price_in_per_mtok, info.price_out_per_mtok) == (0.1, 0.3)
    with pytest.raises(ContextLengthError):
        backend.prepare(chat(max_tokens=9000))
    backend.close()


# ---- model specs ----------------------------------------------------------------------------


def test_model_spec_validation() -> None:
    with pytest.raises(ValueError, match="needs base_url"):
        ModelSpec("x", kind="openai", remote_model="m")
    with pytest.raises(ValueError, match="needs remote_model"):
        ModelSpec("x", kind="litellm")
    with pytest.raises(ValueError, match="'source' is for embedded"):
        ModelSpec("x", "builtin:smollm2-135m-instruct", kind="openai", base_url="u",
                  remote_model="m")  # fmt: skip
    with pytest.raises(ValueError, match="need a source"):
        ModelSpec("x")
    with pytest.raises(ValueError, match="base_url need a remote kind"):
        ModelSpec("x", "builtin:smollm2-135m-instruct", base_url="http://h")
    with pytest.raises(ValueError, match="max_retries"):
        ModelSpec("x", kind="litellm", remote_model="m", max_retries=-1)
    # no invented per-token defaults: an unpriced built-in is compute-priced
    assert ModelSpec("x", "builtin:smollm2-135m-instruct").resolved_prices() == (0.0, 0.0)
    assert ModelSpec("x", "builtin:qwen2.5-coder-0.5b-instruct",
                     price_out_per_mtok=1.0).resolved_prices() == (0.0, 1.0)  # fmt: skip


def test_build_backend_for_remote_specs(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = ModelSpec(
        "big", kind="openai", tier="llm", base_url="http://h:1/v1", remote_model="m",
        max_retries=4, breaker_failures=2, breaker_reset_s=9.0, timeout_s=3.0,
        supports_logprobs=False, price_in_per_mtok=1.0, price_out_per_mtok=2.0,
    )  # fmt: skip
    backend = build_backend(spec)
    assert isinstance(backend, OpenAICompatBackend)
    assert backend.retry.max_retries == 4
    assert (backend.breaker.failure_threshold, backend.breaker.reset_after_s) == (2, 9.0)
    assert backend.config.timeout_s == 3.0
    assert backend.info.supports_logprobs is False
    assert (backend.info.price_in_per_mtok, backend.info.price_out_per_mtok) == (1.0, 2.0)
    monkeypatch.delenv("MISSING_KEY_VAR", raising=False)
    with pytest.raises(ValueError, match="MISSING_KEY_VAR is not set"):
        build_backend(replace(spec, api_key_env="MISSING_KEY_VAR"))


def test_yaml_style_config_builds_remote_specs() -> None:
    from gateway.config import from_mapping

    config = from_mapping({
        "models": [
            {"name": "slm", "source": "builtin:smollm2-135m-instruct"},
            {"name": "big", "kind": "openai", "tier": "llm", "base_url": "http://vllm:8000/v1",
             "remote_model": "Qwen/Qwen2.5-7B-Instruct", "api_key_env": "VLLM_KEY"},
            {"name": "hosted", "kind": "litellm", "tier": "llm", "remote_model": "gpt-4o-mini"},
        ],
        "routes": [{"name": "auto", "tiers": ["slm", "big"]}],
    })  # fmt: skip
    kinds = {m.name: m.kind for m in config.models}
    assert kinds == {"slm": "embedded", "big": "openai", "hosted": "litellm"}


# ---- LiteLLM (scripted server and cost map, no model) ----------------------------------------


def litellm_backend(
    url: str | None, model: str = "openai/m", sleep: Waits | None = None, **kw: Any
) -> RemoteBackend:
    from decoding.litellm_backend import LiteLLMBackend

    base = {
        "name": "hosted", "model": model, "base_url": url, "api_key_env": "LITELLM_TEST_KEY",
        "retry": RetryPolicy(max_retries=2, base_delay_s=0.01, jitter=False),
    }  # fmt: skip
    return LiteLLMBackend(RemoteConfig(**{**base, **kw}), sleep=sleep or Waits())


@pytest.fixture
def litellm_key(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The key LiteLLM backends send: the live server's when the test uses it."""
    live = "server" in request.fixturenames
    monkeypatch.setenv("LITELLM_TEST_KEY", KEY if live else "sk-litellm")


def test_litellm_prices_come_from_the_local_cost_map(litellm_key: None) -> None:
    from decoding.litellm_backend import import_litellm

    litellm = import_litellm()
    assert os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] == "True"
    entry = litellm.model_cost["gpt-4o-mini"]
    info = litellm_backend(None, "gpt-4o-mini").info
    assert info.price_in_per_mtok == pytest.approx(entry["input_cost_per_token"] * 1e6)
    assert info.price_out_per_mtok == pytest.approx(entry["output_cost_per_token"] * 1e6)
    assert info.price_in_per_mtok > 0
    assert info.model == "gpt-4o-mini"
    prefixed = litellm_backend(None, "openai/gpt-4o-mini", price_out_per_mtok=9.0).info
    assert prefixed.price_in_per_mtok == info.price_in_per_mtok
    assert prefixed.price_out_per_mtok == 9.0  # config overrides the map
    assert litellm_backend(None, "openai/not-a-real-model").info.price_in_per_mtok == 0.0


async def test_litellm_retries_and_maps_errors(script: Script, url: str, litellm_key: None) -> None:
    lp = [("ok", -0.2, [("ok", -0.2), ("no", -1.8)])]
    script.replies = [Reply(500, error("boom")), Reply(200, completion("ok", logprobs=lp))]
    backend = litellm_backend(url)
    result = await backend.complete(chat())
    assert result.choices[0].text == "ok"
    assert [(e.text, e.logprob) for e in result.choices[0].events] == [("ok", -0.2)]
    assert len(script.requests) == 2
    sent = script.requests[1]
    assert sent["json"]["model"] == "m"
    assert sent["json"]["top_logprobs"] == 5
    assert sent["headers"]["authorization"] == "Bearer sk-litellm"

    script.replies = [Reply(400, error("bad role")), Reply(200, completion())]
    with pytest.raises(InvalidRequestError, match="bad role"):
        await backend.complete(chat())
    assert len(script.requests) == 3

    script.replies = [Reply(429, error("slow"), {"Retry-After": "2"}), Reply(200, completion())]
    waits = Waits()
    backend = litellm_backend(url, sleep=waits)
    await backend.complete(chat())
    assert waits.seconds == [2.0]

    script.replies = [Reply(503, error("down")) for _ in range(3)]
    with pytest.raises(UpstreamError) as info:
        await backend.complete(chat())
    assert info.value.retryable
    assert len(script.requests) == 8


# ---- against a live slmgate server (real models) ---------------------------------------------


class Recording(httpx.AsyncBaseTransport):
    """A transport that keeps each response body, to compare with what the backend made."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.bodies: list[dict[str, Any]] = []
        self.streams: list[list[dict[str, Any]]] = []  # each SSE response's chunks

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        raw = await response.aread()
        kind = response.headers.get("content-type", "")
        if kind.startswith("application/json"):
            self.bodies.append(json.loads(raw))
        elif kind.startswith("text/event-stream"):
            lines = raw.decode().splitlines()
            self.streams.append([json.loads(line[6:]) for line in lines
                                 if line.startswith("data: {")])  # fmt: skip
        return httpx.Response(response.status_code, headers=response.headers, content=raw)

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.fixture(params=["openai", "litellm"])
def live(
    request: pytest.FixtureRequest, server: str, monkeypatch: pytest.MonkeyPatch
) -> RemoteBackend:
    monkeypatch.setenv("SLMGATE_TEST_KEY", KEY)
    base: dict[str, Any] = {"name": "remote-slm", "base_url": f"{server}/v1",
                            "api_key_env": "SLMGATE_TEST_KEY", "timeout_s": 300.0}  # fmt: skip
    if request.param == "openai":
        return OpenAICompatBackend(RemoteConfig(model="slm", **base))
    from decoding.litellm_backend import LiteLLMBackend

    return LiteLLMBackend(RemoteConfig(model="openai/slm", **base))


@pytest.mark.slow
async def test_live_text_logprobs_equal_the_servers(
    server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLMGATE_TEST_KEY", KEY)
    transport = Recording()
    backend = OpenAICompatBackend(
        RemoteConfig("remote-slm", "slm", base_url=f"{server}/v1", timeout_s=300.0,
                     api_key_env="SLMGATE_TEST_KEY"),
        transport=transport,
    )  # fmt: skip
    req = chat("Name a colour.", max_tokens=8)
    result = await backend.complete(req)
    streamed = [e async for e in backend.generate(req)]  # SSE; greedy, so the same tokens
    await backend.aclose()
    served = transport.bodies[0]["choices"][0]
    events = result.choices[0].events
    assert [(e.text, e.logprob) for e in events] == [
        (c["token"], c["logprob"]) for c in served["logprobs"]["content"]
    ]
    assert [[(t.token, t.logprob) for t in e.top_logprobs] for e in events] == [
        [(t["token"], t["logprob"]) for t in c["top_logprobs"]]
        for c in served["logprobs"]["content"]
    ]
    assert all(len(e.top_logprobs) == 5 for e in events)
    assert result.choices[0].text == served["message"]["content"]
    assert result.completion_tokens == transport.bodies[0]["usage"]["completion_tokens"]
    assert all(e.entropy >= 0 and not e.forced for e in events)
    # The stream's events carry exactly the text and logprobs its SSE chunks sent. (They are
    # not compared with the first request's: the server serves the repeated prompt's blocks
    # from its key/value memory, computed in another chunk, and in bfloat16 that moves logprobs
    # at rounding level and can flip a greedy near-tie: seen "…precious gem" vs "…one".)
    stream_tokens = [e for e in streamed if isinstance(e, TokenEvent) and not e.forced]
    sent = [
        c for chunk in transport.streams[0] for choice in chunk.get("choices") or []
        for c in (choice.get("logprobs") or {}).get("content") or []
    ]  # fmt: skip
    assert stream_tokens
    assert [(e.text, e.logprob) for e in stream_tokens] == [
        (c["token"], c["logprob"]) for c in sent
    ]
    assert [[(t.token, t.logprob) for t in e.top_logprobs] for e in stream_tokens] == [
        [(t["token"], t["logprob"]) for t in c["top_logprobs"]] for c in sent
    ]
    streamed_text = "".join(
        (choice.get("delta") or {}).get("content") or ""
        for chunk in transport.streams[0] for choice in chunk.get("choices") or []
    )  # fmt: skip
    assert "".join(e.text for e in streamed) == streamed_text
    # The second request finds the first one's whole prompt blocks in the server's memory.
    cached = streamed[-1].cached_tokens
    assert cached % 16 == 0
    assert cached < result.prompt_tokens
    assert streamed[-1] == FinishEvent(0, result.choices[0].finish_reason, "",
                                       result.prompt_tokens, cached_tokens=cached)  # fmt: skip


@pytest.mark.slow
async def test_live_json_schema_output_validates(live: RemoteBackend) -> None:
    req = replace(
        chat("Give the weather in Paris as JSON.", max_tokens=40),
        constraint=JsonSchema(WEATHER, strict=True, name="weather"),
    )
    result = await live.complete(req, live.prepare(req))
    await live.aclose()
    check = check_output(req.constraint, result.choices[0].text)
    assert check.valid, check.errors
    assert set(json.loads(result.choices[0].text)) == {"city", "unit"}
    assert result.choices[0].events[0].logprob <= 0.0
    assert not result.choices[0].events[0].forced  # real logprobs came back


@pytest.mark.slow
async def test_live_strict_required_tool_call_validates(live: RemoteBackend) -> None:
    req = tool_request("required")
    result = await live.complete(req, live.prepare(req))
    await live.aclose()
    check = check_output(req.constraint, result.choices[0].text)
    assert check.valid, (result.choices[0].text, check.errors)
    assert check.parsed is not None
    assert len(check.parsed.tool_calls) == 1
    assert check.parsed.tool_calls[0].name in {"get_weather", "get_time"}


@pytest.mark.slow
async def test_live_litellm_logprobs_match_a_direct_request(server: str, litellm_key: None) -> None:
    """LiteLLM hands back the server's logprobs (compared with a direct request: greedy, so
    the server computes the same tokens twice)."""
    backend = litellm_backend(f"{server}/v1", "openai/slm", timeout_s=300.0)
    req = chat("Name a colour.", max_tokens=8)
    result: GenerationResult = await backend.complete(req)
    await backend.aclose()
    async with httpx.AsyncClient(timeout=300) as client:
        direct = await client.post(
            f"{server}/v1/chat/completions",
            headers={"Authorization": f"Bearer {KEY}"},
            json={"model": "slm", "messages": list(req.messages), "temperature": 0.0,
                  "max_tokens": 8, "logprobs": True, "top_logprobs": 5},
        )  # fmt: skip
    content = direct.json()["choices"][0]["logprobs"]["content"]
    events = result.choices[0].events
    assert [e.text for e in events] == [c["token"] for c in content]
    assert [e.logprob for e in events] == pytest.approx([c["logprob"] for c in content])
