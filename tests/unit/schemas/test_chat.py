"""Chat Completions wire models: what real clients send parses, bad input names its field, and
what we emit is what OpenAI emits (checked against the ``openai`` SDK's own types when present)."""

from __future__ import annotations

import copy
import importlib
import json
from collections.abc import Callable
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

import schemas
from schemas.chat import (
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    ChoiceDelta,
    ChoiceLogprobs,
    DeltaFunctionCall,
    DeltaToolCall,
    ErrorBody,
    ErrorResponse,
    FunctionCall,
    ModelCard,
    ModelList,
    ResponseMessage,
    TokenLogprob,
    ToolCall,
    TopLogprob,
    Usage,
    param_from_loc,
)

WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
        "strict": True,
    },
}

# What openai-python 1.x/2.x puts on the wire for create(tools=..., tool_choice=...,
# response_format=<json_schema strict>, stream=True, stream_options=...), plus a tool round trip.
SDK_BODY: dict[str, Any] = {
    "messages": [
        {"role": "developer", "content": "Answer as JSON."},
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_abc123",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris","unit":"c"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_abc123", "content": '{"temp": 21}'},
    ],
    "model": "slm-default",
    "parallel_tool_calls": False,
    "response_format": {
        "type": "json_schema",
        "json_schema": {
            "name": "Forecast",
            "schema": {
                "type": "object",
                "properties": {"summary": {"type": "string"}},
                "required": ["summary"],
                "additionalProperties": False,
            },
            "strict": True,
        },
    },
    "stream": True,
    "stream_options": {"include_usage": True},
    "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
    "tools": [WEATHER_TOOL],
    "temperature": 0.2,
    "max_completion_tokens": 256,
    "seed": 7,
    "logprobs": True,
    "top_logprobs": 3,
    "stop": ["\n\n"],
    "metadata": {"task_id": "t-1"},
    "user": "u-42",
}


def body(**changes: Any) -> dict[str, Any]:
    """A minimal valid request with top-level fields replaced (None deletes)."""
    data: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    return data


def with_tools(**changes: Any) -> dict[str, Any]:
    return body(tools=[copy.deepcopy(WEATHER_TOOL)], **changes)


def msgs(*messages: dict[str, Any]) -> dict[str, Any]:
    return body(messages=list(messages))


# --------------------------------------------------------------------------- valid requests


def test_sdk_request_parses_with_every_field() -> None:
    req = ChatCompletionRequest.model_validate(SDK_BODY)

    assert [m.role for m in req.messages] == ["developer", "user", "assistant", "tool"]
    assert req.messages[1].text_content() == "Weather in Paris?"
    assert req.messages[2].content is None
    assert req.messages[2].tool_calls == [
        ToolCall(
            id="call_abc123",
            function=FunctionCall(name="get_weather", arguments='{"city":"Paris","unit":"c"}'),
        )
    ]
    assert req.messages[3].tool_call_id == "call_abc123"
    assert req.tools is not None
    assert req.tools[0].function.strict is True
    assert req.tool_choice is not None
    assert not isinstance(req.tool_choice, str)
    assert req.tool_choice.function.name == "get_weather"
    assert req.parallel_tool_calls is False
    assert req.response_format is not None
    assert req.response_format.json_schema is not None
    assert (
        req.response_format.json_schema.schema_
        == SDK_BODY["response_format"]["json_schema"]["schema"]
    )
    assert req.include_usage() is True
    assert (req.top_logprobs, req.effective_max_tokens(), req.stop_sequences()) == (
        3,
        256,
        ["\n\n"],
    )
    assert req.metadata == {"task_id": "t-1"}
    assert req.ignored_fields() == []


def test_request_dump_restores_the_schema_alias() -> None:
    dumped = ChatCompletionRequest.model_validate(SDK_BODY).model_dump(
        mode="json", by_alias=True, exclude_unset=True
    )
    assert dumped["response_format"] == SDK_BODY["response_format"]
    assert dumped["messages"] == SDK_BODY["messages"]


@pytest.mark.parametrize(
    ("data", "check"),
    [
        # Defaults a client relies on when it sends only model and messages.
        (
            body(),
            lambda r: (
                (r.stream, r.n, r.logprobs, r.parallel_tool_calls, r.temperature)
                == (False, 1, False, True, None)
            ),
        ),
        (msgs({"role": "system", "content": "s", "name": "boss"}), lambda r: r.messages[0].name),
        (body(stop="END"), lambda r: r.stop_sequences() == ["END"]),
        (body(stop=["a", "b", "c", "d"]), lambda r: len(r.stop_sequences()) == 4),
        (body(tool_choice="none"), lambda r: r.tool_choice == "none"),  # no tools needed
        (body(tool_choice="auto"), lambda r: r.tool_choice == "auto"),
        (with_tools(tool_choice="required"), lambda r: r.tool_choice == "required"),
        (body(response_format={"type": "json_object"}), lambda r: r.response_format.type),
        (body(response_format={"type": "text"}), lambda r: r.response_format.json_schema is None),
        (body(top_k=-1), lambda r: r.top_k == -1),  # vLLM's "disabled"
        (body(top_k=40, top_p=1.0, temperature=0.0), lambda r: r.top_k == 40),
        (body(logprobs=True, top_logprobs=0), lambda r: r.top_logprobs == 0),
        (
            body(stream=True, stream_options={"include_usage": False}),
            lambda r: not r.include_usage(),
        ),
        (body(stream_options=None), lambda r: r.stream_options is None),
        (body(presence_penalty=-2, frequency_penalty=2), lambda r: r.presence_penalty == -2),
        (
            msgs(
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                }
            ),
            lambda r: r.messages[0].text_content() == "ab",
        ),
        (  # assistant with both text and tool calls, and a tool answer as text parts
            msgs(
                {
                    "role": "assistant",
                    "content": "Checking.",
                    "tool_calls": [
                        {
                            "id": "c1",
                            "type": "function",
                            "function": {"name": "f", "arguments": "{}"},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "ok"}]},
            ),
            lambda r: r.messages[1].text_content() == "ok",
        ),
        (  # a tool without parameters, description or strict is still a tool
            body(tools=[{"type": "function", "function": {"name": "ping-v2_x"}}]),
            lambda r: r.tools[0].function.parameters is None,
        ),
    ],
)
def test_valid_requests(
    data: dict[str, Any], check: Callable[[ChatCompletionRequest], Any]
) -> None:
    assert check(ChatCompletionRequest.model_validate(data))


@pytest.mark.parametrize(
    ("max_tokens", "max_completion_tokens", "expected"),
    [
        (None, None, None),
        (100, None, 100),
        (None, 50, 50),
        (100, 50, 50),  # the current name wins over the deprecated one
    ],
)
def test_effective_max_tokens(
    max_tokens: int | None, max_completion_tokens: int | None, expected: int | None
) -> None:
    req = ChatCompletionRequest.model_validate(
        body(max_tokens=max_tokens, max_completion_tokens=max_completion_tokens)
    )
    assert req.effective_max_tokens() == expected


def test_ignored_fields_are_reported_with_their_path() -> None:
    data = body(
        service_tier="auto",
        guided_json={"type": "object"},  # a vLLM extra: kept for an upstream vLLM, unknown here
        messages=[{"role": "user", "content": "hi", "audio": {"id": "x"}}],
        response_format={"type": "json_schema", "json_schema": {"name": "n", "x-extra": 1}},
    )
    req = ChatCompletionRequest.model_validate(data)
    assert req.ignored_fields() == [
        "service_tier",
        "guided_json",
        "messages.0.audio",
        "response_format.json_schema.x-extra",
    ]
    assert req.model_dump(exclude_unset=True)["guided_json"] == {"type": "object"}


# --------------------------------------------------------------------------- invalid requests

LONG_NAME = "f" * 65

INVALID: list[tuple[str, dict[str, Any], tuple[str | int, ...], str]] = [
    ("no model", body(model=None), ("model",), "Field required"),
    ("empty messages", body(messages=[]), ("messages",), "at least 1"),
    ("unknown role", msgs({"role": "wizard", "content": "x"}), ("messages", 0, "role"), "'tool'"),
    (
        "legacy function role",
        msgs({"role": "function", "content": "x"}),
        ("messages", 0, "role"),
        "",
    ),
    ("user without content", msgs({"role": "user"}), ("messages", 0, "content"), "needs content"),
    (
        "system content null",
        msgs({"role": "system", "content": None}),
        ("messages", 0, "content"),
        "system message needs content",
    ),
    (
        "assistant with neither content nor tool_calls",
        msgs({"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": []}),
        ("messages", 1, "content"),
        "content or tool_calls",
    ),
    (
        "tool message without tool_call_id",
        msgs({"role": "tool", "content": "42"}),
        ("messages", 0, "tool_call_id"),
        "tool_call_id",
    ),
    (
        "tool_calls on a user message",
        msgs(
            {
                "role": "user",
                "content": "x",
                "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{}"}}],
            }
        ),
        ("messages", 0, "tool_calls"),
        "only assistant",
    ),
    (
        "tool call arguments as an object, not JSON text",
        msgs(
            {
                "role": "assistant",
                "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": {"a": 1}}}],
            }
        ),
        ("messages", 0, "tool_calls", 0, "function", "arguments"),
        "valid string",
    ),
    (
        "image part",
        msgs(
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "look"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                ],
            }
        ),
        ("messages", 0, "content"),
        "content part 1 has type 'image_url'",
    ),
    (
        "text part without text",
        msgs({"role": "user", "content": [{"type": "text"}]}),
        ("messages", 0, "content"),
        "content part 0 needs a string 'text'",
    ),
    (
        "empty content list",
        msgs({"role": "user", "content": []}),
        ("messages", 0, "content"),
        "empty",
    ),
    ("content as a number", msgs({"role": "user", "content": 3}), ("messages", 0, "content"), ""),
    (
        "tool name with a space",
        body(tools=[{"type": "function", "function": {"name": "get weather"}}]),
        ("tools", 0, "function", "name"),
        "'get weather'",
    ),
    (
        "tool name of 65 characters",
        body(tools=[{"type": "function", "function": {"name": LONG_NAME}}]),
        ("tools", 0, "function", "name"),
        "1-64",
    ),
    (
        "custom tool type",
        body(tools=[{"type": "custom", "custom": {"name": "x"}}]),
        ("tools", 0),
        "tool type 'custom' is not supported",
    ),
    (
        "duplicate tool names",
        body(tools=[WEATHER_TOOL, WEATHER_TOOL]),
        ("tools",),
        "appears twice",
    ),
    ("required without tools", body(tool_choice="required"), ("tool_choice",), "requires tools"),
    (
        "named choice without tools",
        body(tool_choice={"type": "function", "function": {"name": "get_weather"}}),
        ("tool_choice",),
        "requires tools",
    ),
    (
        "named choice not among tools",
        with_tools(tool_choice={"type": "function", "function": {"name": "send_email"}}),
        ("tool_choice",),
        "'send_email'",
    ),
    ("unknown tool_choice mode", with_tools(tool_choice="any"), ("tool_choice",), "'any'"),
    (
        "tool_choice object without function",
        with_tools(tool_choice={"type": "function"}),
        ("tool_choice",),
        "tool_choice object",
    ),
    (
        "unknown response_format type",
        body(response_format={"type": "xml"}),
        ("response_format", "type"),
        "",
    ),
    (
        "json_schema type without json_schema",
        body(response_format={"type": "json_schema"}),
        ("response_format", "json_schema"),
        "needs a json_schema",
    ),
    (
        "json_schema with a bad name",
        body(response_format={"type": "json_schema", "json_schema": {"name": "my schema"}}),
        ("response_format", "json_schema", "name"),
        "json_schema name",
    ),
    (
        "json_schema without name",
        body(response_format={"type": "json_schema", "json_schema": {"schema": {}}}),
        ("response_format", "json_schema", "name"),
        "Field required",
    ),
    ("top_logprobs without logprobs", body(top_logprobs=2), ("top_logprobs",), "logprobs=true"),
    ("top_logprobs above 20", body(logprobs=True, top_logprobs=21), ("top_logprobs",), "20"),
    ("top_logprobs below 0", body(logprobs=True, top_logprobs=-1), ("top_logprobs",), "0"),
    ("five stop sequences", body(stop=list("abcde")), ("stop",), "at most 4"),
    ("stop as a number", body(stop=5), ("stop",), "string"),
    ("stop list with a number", body(stop=["a", 1]), ("stop",), "string"),
    ("n of 0", body(n=0), ("n",), "greater than or equal to 1"),
    ("temperature above 2", body(temperature=2.5), ("temperature",), "2"),
    ("temperature below 0", body(temperature=-0.1), ("temperature",), "0"),
    ("top_p of 0", body(top_p=0), ("top_p",), "greater than 0"),
    ("top_p above 1", body(top_p=1.5), ("top_p",), "1"),
    ("top_k of 0", body(top_k=0), ("top_k",), "-1"),
    ("top_k of -2", body(top_k=-2), ("top_k",), "-1"),
    ("max_tokens of 0", body(max_tokens=0), ("max_tokens",), "1"),
    ("max_completion_tokens of 0", body(max_completion_tokens=0), ("max_completion_tokens",), ""),
    ("presence_penalty above 2", body(presence_penalty=3), ("presence_penalty",), "2"),
    ("frequency_penalty below -2", body(frequency_penalty=-3), ("frequency_penalty",), "-2"),
    ("metadata value not a string", body(metadata={"k": 1}), ("metadata", "k"), "string"),
    ("stream as a word", body(stream="maybe"), ("stream",), "boolean"),
    (
        "stream_options without stream",
        body(stream_options={"include_usage": True}),
        ("stream_options",),
        "only allowed when stream is true",
    ),
]


@pytest.mark.parametrize(
    ("data", "loc", "fragment"),
    [case[1:] for case in INVALID],
    ids=[case[0] for case in INVALID],
)
def test_invalid_request_points_at_the_field(
    data: dict[str, Any], loc: tuple[str | int, ...], fragment: str
) -> None:
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate(data)
    errors = info.value.errors()
    # Exactly one error, at the field: a cross-field check must not pile on a second report.
    assert [e["loc"] for e in errors] == [loc]
    assert fragment in errors[0]["msg"]


@pytest.mark.parametrize(
    ("data", "param", "code"),
    [
        (body(model=None), "model", "missing_required_parameter"),
        (msgs({"role": "wizard", "content": "x"}), "messages.0.role", "invalid_value"),
        (body(stream="maybe"), "stream", "invalid_type"),
        (body(top_logprobs=2), "top_logprobs", "invalid_value"),
    ],
)
def test_validation_error_becomes_openai_error(data: dict[str, Any], param: str, code: str) -> None:
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate(data)
    error = ErrorResponse.from_validation_errors(info.value.errors()).to_wire()["error"]
    assert error["type"] == "invalid_request_error"
    assert (error["param"], error["code"]) == (param, code)
    assert error["message"].startswith(f"{param}: ")
    assert "Value error," not in error["message"]


def test_error_message_counts_the_other_errors() -> None:
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate({"messages": [], "n": 0})
    error = ErrorResponse.from_validation_errors(info.value.errors()).error
    assert error.message.endswith("(and 2 more errors)")


@pytest.mark.parametrize(
    ("loc", "param"),
    [
        (("body", "messages", 0, "role"), "messages.0.role"),  # FastAPI prefixes "body"
        (("top_logprobs",), "top_logprobs"),
        (("body",), None),
        ((), None),
    ],
)
def test_param_from_loc(loc: tuple[str | int, ...], param: str | None) -> None:
    assert param_from_loc(loc) == param


def test_error_body_code_is_a_string_or_null() -> None:
    body_ = ErrorResponse(error=ErrorBody(message="no such model", type="not_found_error"))
    assert body_.to_wire() == {
        "error": {
            "message": "no such model",
            "type": "not_found_error",
            "param": None,
            "code": None,
        }
    }
    with pytest.raises(ValidationError):
        ErrorBody(message="x", type="y", code=404)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- responses


def text_response(**changes: Any) -> ChatCompletionResponse:
    fields: dict[str, Any] = {
        "id": "chatcmpl-1",
        "created": 1700000000,
        "model": "slm-default",
        "choices": [
            ChatCompletionChoice(
                index=0, message=ResponseMessage(content="Hello."), finish_reason="stop"
            )
        ],
        "usage": Usage(prompt_tokens=5, completion_tokens=2),
        **changes,
    }
    return ChatCompletionResponse(**fields)


def tool_response() -> ChatCompletionResponse:
    call = ToolCall(id="call_1", function=FunctionCall(name="get_weather", arguments="{}"))
    message = ResponseMessage(content=None, tool_calls=[call])
    choice = ChatCompletionChoice(index=0, message=message, finish_reason="tool_calls")
    return text_response(choices=[choice])


def logprob_response() -> ChatCompletionResponse:
    token = TokenLogprob(
        token="Hi",
        logprob=-0.25,
        bytes=[72, 105],
        top_logprobs=[
            TopLogprob(token="Hi", logprob=-0.25, bytes=[72, 105]),
            TopLogprob(token="Yo", logprob=float("-inf"), bytes=[89, 111]),
        ],
    )
    choice = ChatCompletionChoice(
        index=0,
        message=ResponseMessage(content="Hi"),
        logprobs=ChoiceLogprobs(content=[token]),
        finish_reason="length",
    )
    return text_response(choices=[choice], slmgate={"tier": "slm", "confidence": 0.93})


def test_text_response_is_dumped_like_openai() -> None:
    assert text_response().to_wire() == {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "slm-default",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello.", "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
        "system_fingerprint": None,
    }


def test_tool_call_response_keeps_null_content() -> None:
    message = tool_response().to_wire()["choices"][0]["message"]
    assert message == {
        "role": "assistant",
        "content": None,
        "refusal": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": "{}"},
            }
        ],
    }


def test_empty_tool_calls_are_omitted() -> None:
    message = ResponseMessage(content="x", tool_calls=[])
    assert "tool_calls" not in message.to_wire()


def test_logprobs_and_slmgate_extra() -> None:
    wire = logprob_response().to_wire()
    assert wire["slmgate"] == {"tier": "slm", "confidence": 0.93}
    assert wire["choices"][0]["logprobs"]["refusal"] is None
    alternatives = wire["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    assert alternatives[1] == {"token": "Yo", "logprob": -9999.0, "bytes": [89, 111]}  # not -inf
    json.loads(logprob_response().to_wire_json())  # strict JSON: no Infinity/NaN


def test_positive_logprob_is_rejected() -> None:
    with pytest.raises(ValidationError) as info:
        TopLogprob(token="a", logprob=0.5)
    assert info.value.errors()[0]["loc"] == ("logprob",)


def test_generated_ids_and_times() -> None:
    response = ChatCompletionResponse(model="m", choices=[])
    assert response.id.startswith("chatcmpl-")
    assert len(response.id) > 20
    assert response.created > 1_700_000_000
    assert response.id != ChatCompletionResponse(model="m", choices=[]).id


RESPONSES: list[Callable[[], ChatCompletionResponse]] = [
    text_response,
    tool_response,
    logprob_response,
]


@pytest.mark.parametrize("make", RESPONSES)
def test_response_round_trips(make: Callable[[], ChatCompletionResponse]) -> None:
    response = make()
    again = ChatCompletionResponse.model_validate_json(response.to_wire_json())
    assert again.to_wire() == response.to_wire()


# --------------------------------------------------------------------------- chunks


def chunk(*choices: ChatCompletionChunkChoice, **fields: Any) -> ChatCompletionChunk:
    return ChatCompletionChunk(
        id="chatcmpl-1", created=1700000000, model="m", choices=list(choices), **fields
    )


def stream_chunks(include_usage: bool) -> list[ChatCompletionChunk]:
    """A stream as the gateway would send it: role, text, a tool call in two pieces, finish."""
    usage: dict[str, Any] = {"usage": None} if include_usage else {}
    out = [
        chunk(
            ChatCompletionChunkChoice(index=0, delta=ChoiceDelta(role="assistant", content="")),
            **usage,
        ),
        chunk(
            ChatCompletionChunkChoice(index=0, delta=ChoiceDelta(content="Let me check.")), **usage
        ),
        chunk(
            ChatCompletionChunkChoice(
                index=0,
                delta=ChoiceDelta(
                    tool_calls=[
                        DeltaToolCall(
                            index=0,
                            id="call_1",
                            type="function",
                            function=DeltaFunctionCall(name="get_weather", arguments=""),
                        )
                    ]
                ),
            ),
            **usage,
        ),
        chunk(
            ChatCompletionChunkChoice(
                index=0,
                delta=ChoiceDelta(
                    tool_calls=[
                        DeltaToolCall(
                            index=0, function=DeltaFunctionCall(arguments='{"city":"Paris"}')
                        )
                    ]
                ),
            ),
            **usage,
        ),
        chunk(ChatCompletionChunkChoice(index=0, finish_reason="tool_calls"), **usage),
    ]
    if include_usage:
        out.append(chunk(usage=Usage(prompt_tokens=9, completion_tokens=4)))
    return out


def test_chunk_deltas_carry_only_what_changed() -> None:
    wires = [c.to_wire() for c in stream_chunks(include_usage=False)]
    assert [w["choices"][0]["delta"] for w in wires] == [
        {"role": "assistant", "content": ""},
        {"content": "Let me check."},
        {
            "tool_calls": [
                {
                    "index": 0,
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": ""},
                }
            ]
        },
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"city":"Paris"}'}}]},
        {},
    ]
    assert wires[0] == {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "m",
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
        ],
    }
    assert all("usage" not in w for w in wires)


def test_usage_chunks_when_include_usage() -> None:
    wires = [c.to_wire() for c in stream_chunks(include_usage=True)]
    assert all(w["usage"] is None for w in wires[:-1])
    assert wires[-1]["choices"] == []
    assert wires[-1]["usage"] == {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}


@pytest.mark.parametrize("include_usage", [False, True])
def test_chunks_round_trip(include_usage: bool) -> None:
    for original in stream_chunks(include_usage):
        again = ChatCompletionChunk.model_validate_json(original.to_wire_json())
        assert again.to_wire() == original.to_wire()


# --------------------------------------------------------------------------- models, surface


def test_model_list() -> None:
    listing = ModelList(data=[ModelCard(id="slm-default", created=1700000000)])
    assert listing.to_wire() == {
        "object": "list",
        "data": [
            {"id": "slm-default", "object": "model", "created": 1700000000, "owned_by": "slmgate"}
        ],
    }


def test_json_schemas_keep_their_fields() -> None:
    # FastAPI renders these; the omitting serializer must not flatten them to a bare object.
    for model in (ChatCompletionRequest, ChatCompletionResponse, ChatCompletionChunk, ModelList):
        for mode in ("validation", "serialization"):
            assert "properties" in model.model_json_schema(mode=mode)
    assert "schema" in json.dumps(ChatCompletionRequest.model_json_schema())


def test_public_surface() -> None:
    for name in schemas.__all__:
        assert getattr(schemas, name) is getattr(importlib.import_module("schemas.chat"), name)
    assert {"ChatCompletionRequest", "ChatCompletionResponse", "ChatCompletionChunk"} <= set(
        schemas.__all__
    )
    assert ChatMessage.model_fields["role"].is_required()


# --------------------------------------------------------------------------- the openai SDK


def _sdk_http() -> Any:
    """The httpx flavour this openai version is built on (``httpx`` or a successor)."""
    openai = pytest.importorskip("openai")
    base = next(c for c in openai.DefaultHttpxClient.__mro__ if c.__name__ == "Client")
    return importlib.import_module(base.__module__.split(".")[0])


def _sdk_client(handler: Callable[[Any], Any]) -> Any:
    openai = pytest.importorskip("openai")
    http = _sdk_http()
    return openai.OpenAI(
        api_key="sk-test",
        base_url="http://slmgate.test/v1",
        http_client=openai.DefaultHttpxClient(transport=http.MockTransport(handler)),
        max_retries=0,
    )


@pytest.mark.parametrize("make", RESPONSES)
def test_sdk_types_accept_our_response(make: Callable[[], ChatCompletionResponse]) -> None:
    sdk = pytest.importorskip("openai.types.chat")
    parsed = sdk.ChatCompletion.model_validate(make().to_wire())
    assert parsed.choices[0].message.content == make().choices[0].message.content


@pytest.mark.parametrize("include_usage", [False, True])
def test_sdk_types_accept_our_chunks(include_usage: bool) -> None:
    sdk = pytest.importorskip("openai.types.chat")
    for original in stream_chunks(include_usage):
        parsed = sdk.ChatCompletionChunk.model_validate(original.to_wire())
        assert parsed.id == original.id


def test_sdk_create_round_trip() -> None:
    """What the SDK sends parses here, and what we answer parses in the SDK."""
    sent: list[ChatCompletionRequest] = []
    http = _sdk_http()

    def handler(request: Any) -> Any:
        sent.append(ChatCompletionRequest.model_validate_json(request.content))
        return http.Response(200, json=tool_response().to_wire())

    client = _sdk_client(handler)
    completion = client.chat.completions.create(
        model="slm-default",
        messages=SDK_BODY["messages"],
        tools=[WEATHER_TOOL],
        tool_choice="required",
        parallel_tool_calls=False,
        max_completion_tokens=64,
        stop=["\n\n"],
        seed=1,
        metadata={"task_id": "t-9"},
    )
    req = sent[0]
    assert req.ignored_fields() == []
    assert (req.tool_choice, req.parallel_tool_calls, req.effective_max_tokens()) == (
        "required",
        False,
        64,
    )
    call = completion.choices[0].message.tool_calls[0]
    assert (call.id, call.function.name, completion.usage.total_tokens) == (
        "call_1",
        "get_weather",
        7,
    )


def test_sdk_parse_sends_a_strict_json_schema() -> None:
    class Forecast(BaseModel):
        city: str
        celsius: float

    sent: list[ChatCompletionRequest] = []
    http = _sdk_http()
    answer = text_response(
        choices=[
            ChatCompletionChoice(
                index=0,
                message=ResponseMessage(content='{"city":"Paris","celsius":21.5}'),
                finish_reason="stop",
            )
        ]
    )

    def handler(request: Any) -> Any:
        sent.append(ChatCompletionRequest.model_validate_json(request.content))
        return http.Response(200, json=answer.to_wire())

    client = _sdk_client(handler)
    completion = client.chat.completions.parse(
        model="slm-default",
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        response_format=Forecast,
    )
    fmt = sent[0].response_format
    assert fmt is not None
    assert fmt.type == "json_schema"
    assert fmt.json_schema is not None
    assert (fmt.json_schema.name, fmt.json_schema.strict) == ("Forecast", True)
    assert fmt.json_schema.schema_ is not None
    assert fmt.json_schema.schema_["required"] == ["city", "celsius"]
    assert completion.choices[0].message.parsed == Forecast(city="Paris", celsius=21.5)


def test_sdk_stream_round_trip() -> None:
    sent: list[ChatCompletionRequest] = []
    http = _sdk_http()

    def handler(request: Any) -> Any:
        sent.append(ChatCompletionRequest.model_validate_json(request.content))
        frames = [f"data: {c.to_wire_json()}\n\n" for c in stream_chunks(include_usage=True)]
        text = "".join(frames) + "data: [DONE]\n\n"
        return http.Response(200, headers={"content-type": "text/event-stream"}, text=text)

    client = _sdk_client(handler)
    stream = client.chat.completions.create(
        model="slm-default",
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=[WEATHER_TOOL],
        stream=True,
        stream_options={"include_usage": True},
    )
    received = list(stream)
    assert sent[0].include_usage()
    assert "".join(c.choices[0].delta.content or "" for c in received if c.choices) == (
        "Let me check."
    )
    arguments = "".join(
        c.choices[0].delta.tool_calls[0].function.arguments or ""
        for c in received
        if c.choices and c.choices[0].delta.tool_calls
    )
    assert arguments == '{"city":"Paris"}'
    assert received[-1].choices == []
    assert received[-1].usage.total_tokens == 13
