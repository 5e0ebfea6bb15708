"""Property-based fuzz of ``POST /v1/chat/completions`` against a live server (issue 11).

Hypothesis draws chat bodies that are valid-shaped with odd parts (wrong types, missing or
extra fields, odd unicode incl. lone surrogates, nesting, extreme numbers, small random schemas
and tools) and bodies that are arbitrary JSON or bytes. ``max_tokens`` is forced to 1-4 (or to a
value the gateway must refuse) so each accepted call is cheap. The property, for every body: a
status below 500, an exact OpenAI error body on every 4xx, a ``chat.completion`` on a whole 200,
a stream of JSON events with no error event on a streamed 200, and the server still up after it.
Generation is derandomized (the same examples on every run, as CI needs) and not shrunk (each
example costs a server round trip; the failing body is reported as drawn). schemathesis is not
installed here, so the OpenAPI-driven variant is not used.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.integration.hostile_cases import (
    CHAT,
    KEY,
    RSS_HEADROOM,
    LiveGateway,
    RssWatch,
    live_gateway,
)

pytestmark = pytest.mark.slow

FUZZ = settings(
    deadline=None,
    database=None,
    derandomize=True,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)

# --------------------------------------------------------------------------- strategies

odd_chars = st.one_of(
    st.characters(),
    st.characters(categories=["Cs"]),  # lone surrogates: JSON-escaped by json.dumps
    st.sampled_from(["\u0000", "\ufeff", "\u202e", "\u200b", "\U0001f600", "\\", '"', "\n"]),
)
plain_text = st.text(max_size=24)  # no surrogates: Hypothesis leaves them out by default
odd_text = st.one_of(plain_text, plain_text, st.text(odd_chars, max_size=24))
extreme_numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, -1, 1, 2, 4, 17, 100, 2**31, 2**63, 2**64, 1e308, -1e308, 5e-324]),
)
json_values = st.recursive(
    st.none() | st.booleans() | extreme_numbers | odd_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(odd_text, inner, max_size=4),
    max_leaves=16,
)
deep_values = st.integers(min_value=1, max_value=200).map(lambda d: json.loads("[" * d + "]" * d))


def maybe(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly ``good``, sometimes any JSON value (wrong type, odd nesting, extreme number)."""
    return st.one_of(good, good, good, json_values)


leaf_schemas = st.sampled_from([
    {"type": "string"}, {"type": "string", "maxLength": 3}, {"type": "integer", "minimum": 0,
    "maximum": 9}, {"type": "number"}, {"type": "boolean"}, {"type": "null"},
    {"enum": ["a", "b", 3]}, {"const": "x"}, {"type": "string", "pattern": "^[a-c]{1,3}$"},
    {}, True, False, {"$ref": "#"}, {"$ref": "#/$defs/missing"}, {"type": "wizard"},
    {"type": "string", "format": "email"}, {"type": "array", "minItems": 3, "maxItems": 1},
])  # fmt: skip


def _object(props: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": required}


schemas = st.recursive(
    leaf_schemas,
    lambda inner: st.one_of(
        st.builds(_object, st.dictionaries(st.sampled_from("abc"), inner, max_size=3),
                  st.lists(st.sampled_from("abcd"), max_size=3, unique=True)),
        st.builds(lambda items: {"type": "array", "items": items, "maxItems": 2}, inner),
        st.builds(lambda options: {"anyOf": options}, st.lists(inner, min_size=1, max_size=3)),
    ),
    max_leaves=6,
)  # fmt: skip
Wrap = Callable[[st.SearchStrategy[Any]], st.SearchStrategy[Any]]
names = st.one_of(st.sampled_from(["get_time", "f", "a-b_c", "x" * 64]), odd_text)
valid_names = st.sampled_from(["get_time", "f", "a-b_c", "x" * 64])


def tool_list(name: st.SearchStrategy[Any], wrap: Wrap) -> st.SearchStrategy[list[Any]]:
    """Up to 3 tools; with ``wrap`` = ``maybe`` any part may be the wrong type."""
    function = wrap(
        st.fixed_dictionaries(
            {"name": name},
            optional={
                "description": odd_text,
                "parameters": wrap(schemas),
                "strict": wrap(st.booleans()),
            },
        )
    )
    tool = wrap(st.fixed_dictionaries({"type": wrap(st.just("function")), "function": function}))
    if wrap is maybe:
        return st.lists(tool, max_size=3)
    return st.lists(tool, max_size=3, unique_by=lambda t: str(t["function"]["name"]))


def message_list(wrap: Wrap) -> st.SearchStrategy[list[Any]]:
    parts = st.lists(
        st.fixed_dictionaries(
            {"type": wrap(st.sampled_from(["text", "image_url"])), "text": wrap(odd_text)}
        ),
        min_size=1,
        max_size=3,
    )
    calls = st.lists(
        st.fixed_dictionaries(
            {
                "id": wrap(odd_text),
                "type": wrap(st.just("function")),
                "function": wrap(
                    st.fixed_dictionaries({"name": wrap(names), "arguments": wrap(odd_text)})
                ),
            }
        ),
        max_size=2,
    )
    roles = st.sampled_from(["system", "developer", "user", "assistant", "tool", "wizard"])
    message = st.fixed_dictionaries(
        {"role": wrap(roles), "content": st.one_of(odd_text, parts, wrap(st.none()))},
        optional={
            "name": wrap(odd_text),
            "tool_call_id": wrap(odd_text),
            "tool_calls": wrap(calls),
        },
    )
    return st.lists(wrap(message), min_size=1, max_size=3)


def _same(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return strategy


user_messages = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["system", "user"]),
            "content": st.one_of(odd_text, st.just("Say hi.")),
        }
    ),
    min_size=1,
    max_size=3,
)
response_formats = st.one_of(
    st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object"])}),
    st.fixed_dictionaries(
        {
            "type": st.just("json_schema"),
            "json_schema": st.fixed_dictionaries(
                {"name": valid_names, "schema": schemas}, optional={"strict": st.booleans()}
            ),
        }
    ),
)
tool_choices = st.one_of(
    st.sampled_from(["none", "auto", "required"]),
    st.fixed_dictionaries(
        {"type": st.just("function"), "function": st.fixed_dictionaries({"name": valid_names})}
    ),
)
VALID: dict[str, st.SearchStrategy[Any]] = {
    "tools": tool_list(valid_names, _same),
    "tool_choice": tool_choices,
    "parallel_tool_calls": st.booleans(),
    "response_format": response_formats,
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "logprobs": st.booleans(),
    "top_logprobs": st.integers(min_value=0, max_value=20),
    "stop": st.one_of(odd_text, st.lists(odd_text, max_size=4)),
    "seed": st.integers(min_value=0, max_value=2**31),
    "n": st.integers(min_value=1, max_value=3),
    "temperature": st.floats(min_value=0, max_value=2),
    "top_p": st.floats(min_value=0.01, max_value=1),
    "top_k": st.one_of(st.just(-1), st.integers(min_value=1, max_value=100)),
    "presence_penalty": st.floats(min_value=-2, max_value=2),
    "frequency_penalty": st.floats(min_value=-2, max_value=2),
    "user": odd_text,
    "metadata": st.dictionaries(st.sampled_from(["task_id", "team", "x"]), odd_text, max_size=2),
    "max_completion_tokens": st.integers(min_value=1, max_value=4),
    "speculation": st.sampled_from(["none", "suffix", "stand", "both"]),
    "logit_bias": st.dictionaries(
        st.integers(0, 50_000).map(str), st.integers(-100, 100), max_size=3
    ),
}
ODD_EXTRA: dict[str, st.SearchStrategy[Any]] = {
    "model": st.sampled_from(["gpt-9", "", "auto ", "AUTO"]),
    "messages": message_list(maybe),
    "tools": tool_list(names, maybe),
    "response_format": st.fixed_dictionaries(
        {
            "type": st.just("json_schema"),
            "json_schema": maybe(
                st.fixed_dictionaries({"name": maybe(names), "schema": maybe(schemas)})
            ),
        }
    ),
    "tool_choice": st.sampled_from(["sometimes", "function"]),
    "max_tokens": st.sampled_from([0, -1, 10**9, 2**70, "4", 4.5, [], {}, True, float("nan")]),
    "n": st.sampled_from([0, -1, 17, 100, 2**70]),
    "stream_options": st.just({"include_usage": "yes please"}),
}


def odd_value(name: str) -> st.SearchStrategy[Any]:
    """A wrong or extreme value for field ``name``: any JSON value, deep nesting, or one
    aimed at that field."""
    if name == "max_tokens":  # never null or absent: that would generate up to the context
        return ODD_EXTRA[name]
    return st.one_of(json_values, deep_values, ODD_EXTRA.get(name, json_values))


FIELDS = sorted({"model", "messages", "max_tokens", "deep_extra", *VALID, *ODD_EXTRA})


@st.composite
def chat_bodies(draw: st.DrawFn) -> dict[str, Any]:
    """A cheap valid body (1-4 tokens, models of this config), a few optional fields set
    validly, then 0-2 fields (maybe required ones) made wrong or extreme, or dropped."""
    body: dict[str, Any] = {
        "model": draw(st.sampled_from(["auto", "slm", "llm", "cascade"])),
        "messages": draw(user_messages),
        "max_tokens": draw(st.integers(min_value=1, max_value=4)),
    }
    for name in draw(st.lists(st.sampled_from(sorted(VALID)), unique=True, max_size=4)):
        body[name] = draw(VALID[name])
    for name in draw(st.lists(st.sampled_from(FIELDS), unique=True, max_size=2)):
        if name != "max_tokens" and draw(st.integers(min_value=0, max_value=5)) == 0:
            body.pop(name, None)
        else:
            body[name] = draw(odd_value(name))
    return body


arbitrary_bodies = st.one_of(
    json_values.map(lambda value: json.dumps(value).encode()),
    st.binary(max_size=200),
    chat_bodies().map(lambda body: (text := json.dumps(body).encode())[: len(text) // 2]),
)

# --------------------------------------------------------------------------- the property


def answer_problem(r: httpx.Response) -> str | None:
    """Why this answer breaks the property, or None."""
    if r.status_code >= 500:
        return f"status {r.status_code}: {r.text[:300]!r}"
    if r.status_code >= 400:
        try:
            body = r.json()
        except ValueError:
            return f"{r.status_code} with a non-JSON body {r.text[:200]!r}"
        error = body.get("error") if isinstance(body, dict) else None
        if not isinstance(error, dict) or set(body) != {"error"}:
            return f"{r.status_code} without an OpenAI error body: {r.text[:200]!r}"
        if set(error) != {"message", "type", "param", "code"} or not error.get("message"):
            return f"{r.status_code} with error fields {sorted(error)}: {r.text[:200]!r}"
        return None
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        for line in r.text.splitlines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                return f"streamed 200 with an error event: {line[:300]!r}"
        return None
    body = r.json()
    if body.get("object") != "chat.completion" or not body.get("choices"):
        return f"200 that is not a chat.completion: {r.text[:300]!r}"
    return None


@pytest.fixture(scope="module")
def fuzz_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveGateway]:
    """The hostile suite's kind of server, with a memory watcher for the whole fuzz run."""
    with live_gateway(tmp_path_factory.mktemp("fuzz")) as gateway:
        watch = RssWatch(gateway, gateway.baseline_rss + RSS_HEADROOM)
        watch.start()
        try:
            yield gateway
        finally:
            watch.finish()


def check(gateway: LiveGateway, body: bytes) -> None:
    """Send one body; fail with the body and the answer when the property does not hold."""
    if not gateway.alive():
        gateway.restart("died during the fuzz")  # so each example runs on a live server
    try:
        r = httpx.post(f"{gateway.base}{CHAT}", content=body, timeout=120,
                       headers={"Authorization": f"Bearer {KEY}",
                                "Content-Type": "application/json"})  # fmt: skip
    except httpx.HTTPError as exc:
        pytest.fail(f"no answer ({exc!r}) to {body[:2000]!r}")
    problem = answer_problem(r)
    if problem is None and not gateway.alive():
        problem = "the server died"
    assert problem is None, f"{problem}\nbody: {body[:2000]!r}"


@settings(FUZZ, max_examples=250)
@given(body=chat_bodies())
def test_chat_bodies_never_get_a_5xx(fuzz_gateway: LiveGateway, body: dict[str, Any]) -> None:
    check(fuzz_gateway, json.dumps(body).encode())


@settings(FUZZ, max_examples=50)
@given(body=arbitrary_bodies)
def test_arbitrary_bodies_never_get_a_5xx(fuzz_gateway: LiveGateway, body: bytes) -> None:
    check(fuzz_gateway, body)
