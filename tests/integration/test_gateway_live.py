"""A live ``slmgate serve`` on a free port, driven by the official openai SDK and raw HTTP."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import openai
import pytest
from pydantic import BaseModel

from schemas.jsonschema_utils import validation_errors

pytestmark = pytest.mark.slow

KEY = "sk-test-slmgate"
WEATHER_PARAMS = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "strict": True,
                                      "description": "Weather for a city",
                                      "parameters": WEATHER_PARAMS}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]}}},
]  # fmt: skip
ASK = [{"role": "user", "content": "What's the weather in Paris in celsius?"}]


@pytest.fixture
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=300)


def test_tool_call_required_strict(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="auto", messages=ASK, tools=TOOLS, tool_choice="required",  # type: ignore[arg-type]
        parallel_tool_calls=False, max_tokens=80, temperature=0,
    )  # fmt: skip
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls
    assert len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert call.id.startswith("call_")
    assert call.function.name in {"get_weather", "get_time"}
    params = TOOLS[0 if call.function.name == "get_weather" else 1]["function"]["parameters"]
    assert validation_errors(json.loads(call.function.arguments), params) == []
    assert r.usage
    assert r.usage.completion_tokens > 0


def test_named_tool_choice(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="slm", messages=ASK, tools=TOOLS, max_tokens=80, temperature=0,  # type: ignore[arg-type]
        tool_choice={"type": "function", "function": {"name": "get_time"}},
    )  # fmt: skip
    calls = r.choices[0].message.tool_calls
    assert calls
    assert [c.function.name for c in calls] == ["get_time"]
    assert "tz" in json.loads(calls[0].function.arguments)


def test_json_schema_response_format(client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"},
              "population": {"type": "integer", "minimum": 0}},
              "required": ["city", "population"], "additionalProperties": False}  # fmt: skip
    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "Paris has about 2 million people. "
                                 "Give its name and population."}],
        response_format={"type": "json_schema",
                         "json_schema": {"name": "city", "schema": schema, "strict": True}},
        max_tokens=120, temperature=0,
    )  # fmt: skip
    assert raw.headers["x-slmgate-tier"] == "slm"
    r = raw.parse()
    assert r.choices[0].finish_reason == "stop"
    assert validation_errors(json.loads(r.choices[0].message.content or ""), schema) == []


@pytest.mark.parametrize("engine", ["xgrammar", "llguidance"])
def test_grammar_engine_per_request_is_used_and_reported(server: str, engine: str) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    r = _post(server, _body(
        messages=[{"role": "user", "content": "Give a number as JSON."}], max_tokens=20,
        temperature=0, grammar_engine=engine,
        response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema}},
    ))  # fmt: skip
    assert r.status_code == 200, r.text
    body = r.json()
    assert validation_errors(json.loads(body["choices"][0]["message"]["content"]), schema) == []
    assert [a["grammar_engine"] for a in body["slmgate"]["attempts"]] == [engine]
    assert body["slmgate"]["grammar_engine"] == engine


def test_strict_schema_the_grammar_cannot_enforce_never_comes_back_invalid(server: str) -> None:
    """uniqueItems is checked after generation: a strict request gets a valid answer (first
    sample or a resample), a 502 invalid_output, or (as OpenAI) a reply cut at max_tokens
    with finish_reason length, never an invalid finished 200; non-strict with on_invalid flag
    gets whatever was generated, flagged."""
    schema = {"type": "object", "properties": {"xs": {"type": "array", "items": {"type":
              "integer"}, "uniqueItems": True, "minItems": 3}}, "required": ["xs"]}  # fmt: skip
    ask = [{"role": "user", "content": "Return xs as the list 1, 1, 1, 1 in JSON."}]

    def post(strict: bool, **extra: object) -> httpx.Response:
        fmt = {"type": "json_schema",
               "json_schema": {"name": "xs", "schema": schema, "strict": strict}}  # fmt: skip
        return _post(server, _body(messages=ask, max_tokens=80, temperature=0,
                                   response_format=fmt, **extra))  # fmt: skip

    def valid_reply(body: dict[str, Any]) -> bool:
        choice = body["choices"][0]
        if choice["finish_reason"] == "length":
            return False
        return validation_errors(json.loads(choice["message"]["content"]), schema) == []

    r = post(True)
    if r.status_code == 200:
        body = r.json()
        finished = body["choices"][0]["finish_reason"] != "length"
        assert valid_reply(body) or not finished
        assert body["slmgate"]["valid"] is valid_reply(body)
    else:
        assert r.status_code == 502, r.text
        error = r.json()["error"]
        assert (error["type"], error["code"], error["param"]) == (
            "server_error", "invalid_output", "response_format")  # fmt: skip
    r = post(False, on_invalid="flag")
    assert r.status_code == 200
    body = r.json()
    assert body["slmgate"]["valid"] is valid_reply(body)


def test_parse_with_pydantic(client: openai.OpenAI) -> None:
    class Cat(BaseModel):
        name: str
        age: int

    r = client.chat.completions.parse(
        model="auto", messages=[{"role": "user", "content": "Invent a cat."}],
        response_format=Cat, max_tokens=60, temperature=0,
    )  # fmt: skip
    assert isinstance(r.choices[0].message.parsed, Cat)


def test_stream_tool_calls_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="auto", messages=ASK, tools=TOOLS, tool_choice="required",  # type: ignore[arg-type]
        parallel_tool_calls=False, max_tokens=80, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    tool_deltas = [t for d in deltas for t in (d.tool_calls or [])]
    first = tool_deltas[0]
    assert first.index == 0
    assert first.id
    assert first.function
    assert first.function.name
    arguments = "".join(t.function.arguments or "" for t in tool_deltas if t.function)
    json.loads(arguments)
    assert all(t.id is None for t in tool_deltas[1:])
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "tool_calls"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_text_with_logprobs(client: openai.OpenAI) -> None:
    kwargs = {"model": "auto", "messages": [{"role": "user", "content": "Say hello."}],
              "max_tokens": 12, "temperature": 0}  # fmt: skip
    whole = client.chat.completions.create(**kwargs, logprobs=True, top_logprobs=2)  # type: ignore[call-overload]
    streamed = list(client.chat.completions.create(**kwargs, stream=True, logprobs=True))  # type: ignore[call-overload]
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == whole.choices[0].message.content
    content = whole.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content
    assert len(content) == whole.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)
    assert streamed[-1].choices[0].finish_reason == "length"


def _post(server: str, body: bytes | str, key: str = KEY) -> httpx.Response:
    return httpx.post(
        f"{server}/v1/chat/completions", content=body, timeout=120,
        headers={"authorization": f"Bearer {key}", "content-type": "application/json"},
    )  # fmt: skip


def _body(**fields: object) -> str:
    return json.dumps({"model": "slm", "messages": [{"role": "user", "content": "hi"}], **fields})


# (body, status, error type, param, code)
BAD_INPUTS = [
    ('{"model": "slm", "messages": [', 400, "invalid_request_error", None, None),
    ('{"messages": [{"role": "user", "content": "x"}]}', 400, "invalid_request_error", "model",
     "missing_required_parameter"),
    (_body(temperature=5), 400, "invalid_request_error", "temperature", "invalid_value"),
    (_body(messages=[{"role": "wizard", "content": "x"}]), 400, "invalid_request_error",
     "messages.0.role", "invalid_value"),
    (_body(model="gpt-9"), 404, "not_found_error", "model", "model_not_found"),
    (_body(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "array", "enum": ["a"]}}}), 400, "invalid_request_error", "response_format",
     "unsatisfiable_schema"),
    (_body(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "$ref": "https://example.com/x.json"}}}), 400, "invalid_request_error",
     "response_format", "unsupported_schema"),
    (_body(messages=[{"role": "user", "content": "word " * 9000}]), 400,
     "invalid_request_error", "messages", "context_length_exceeded"),
    (_body(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}), 400,
     "invalid_request_error", "tool_choice", "invalid_value"),
    (_body(messages=[{"role": "user", "content": "x" * 300_000}]), 413,
     "invalid_request_error", None, "payload_too_large"),
    (_body(grammar_engine="outlines"), 400, "invalid_request_error", "grammar_engine", None),
    (_body(on_invalid="retry"), 400, "invalid_request_error", "on_invalid", None),
]  # fmt: skip


@pytest.mark.parametrize(("body", "status", "kind", "param", "code"), BAD_INPUTS)
def test_bad_inputs_get_openai_errors(
    server: str, body: str, status: int, kind: str, param: str | None, code: str | None
) -> None:
    r = _post(server, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["param"]) == (kind, param)
    if code is not None:
        assert error["code"] == code
    assert error["message"]


def test_auth_and_server_stays_up(server: str, client: openai.OpenAI) -> None:
    r = _post(server, _body(max_tokens=2), key="wrong")
    assert r.status_code == 401
    assert r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{server}/v1/models", timeout=10).status_code == 401
    models = client.models.list()
    assert {m.id for m in models.data} >= {"slm", "auto"}
    after = client.chat.completions.create(model="slm", messages=ASK, max_tokens=3)  # type: ignore[arg-type]
    assert after.choices[0].message.content is not None
    assert httpx.get(f"{server}/healthz", timeout=10).json() == {"status": "ok"}


def test_concurrent_requests_queue_and_all_answer(server: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    def one(i: int) -> httpx.Response:
        messages = [{"role": "user", "content": f"Say {i}."}]
        return _post(server, _body(max_tokens=4, temperature=0, messages=messages))

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(one, range(8)))
    assert [r.status_code for r in responses] == [200] * 8


def test_client_disconnect_stops_generation(server: str, client: openai.OpenAI) -> None:
    """Closing a long stream early frees the model: the next request is answered promptly."""
    stream = client.chat.completions.create(
        model="slm", messages=[{"role": "user", "content": "Write a very long essay."}],
        max_tokens=2000, temperature=0, stream=True,
    )  # fmt: skip
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    started = time.monotonic()
    r = client.chat.completions.create(model="slm", messages=ASK, max_tokens=4)  # type: ignore[arg-type]
    assert r.choices[0].message.content is not None
    # 2000 tokens would take minutes on this CPU; a freed model answers in seconds.
    assert time.monotonic() - started < 60


def test_a_later_turn_reports_its_reused_prompt_as_cached_tokens(client: openai.OpenAI) -> None:
    """An agent's next turn re-sends the conversation: its whole shared 16-token blocks come
    from the key/value memory of the first turn, reported as OpenAI does
    (``usage.prompt_tokens_details``)."""
    policy = " ".join(f"Rule {i}: answer in one short sentence about topic {i}." for i in range(40))
    first = [{"role": "system", "content": policy}, {"role": "user", "content": "Hi there."}]
    r1 = client.chat.completions.create(
        model="slm", messages=first, max_tokens=8, temperature=0  # type: ignore[arg-type]
    )
    assert r1.usage is not None
    assert r1.usage.prompt_tokens > 512
    assert r1.usage.prompt_tokens_details is not None
    second = [
        *first,
        {"role": "assistant", "content": r1.choices[0].message.content or ""},
        {"role": "user", "content": "And topic 3?"},
    ]
    r2 = client.chat.completions.create(
        model="slm", messages=second, max_tokens=8, temperature=0  # type: ignore[arg-type]
    )
    assert r2.usage is not None
    assert r2.usage.prompt_tokens_details is not None
    cached = r2.usage.prompt_tokens_details.cached_tokens or 0
    assert cached >= 512  # the system prompt's whole blocks, at least
    assert cached % 16 == 0
    assert cached < r2.usage.prompt_tokens
    stream = client.chat.completions.create(
        model="slm", messages=second, max_tokens=8, temperature=0, stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True},
    )  # fmt: skip
    usage = [c.usage for c in stream if c.usage is not None]
    assert len(usage) == 1
    assert usage[0].prompt_tokens_details is not None
    assert usage[0].prompt_tokens_details.cached_tokens >= cached
    assert usage[0].prompt_tokens == r2.usage.prompt_tokens
