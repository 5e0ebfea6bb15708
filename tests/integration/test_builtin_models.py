"""The built-in Qwen2.5-Coder-1.5B-Instruct loads from its 22 data packages (sha256-checked,
converted once into the cache), answers through the embedded engine, and takes over a tool call
the 0.5B escalates."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from decoding.engine import EmbeddedEngine
from decoding.loader import default_cache_dir
from decoding.models import ModelSpec, load_engine
from decoding.types import GenerationRequest, SamplingParams
from decoding.weights import QWEN25_CODER_15B
from router.request import generation_request
from router.router import Route, Router, Trace
from schemas.chat import ChatCompletionRequest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llm15() -> Iterator[EmbeddedEngine]:
    engine = load_engine(ModelSpec("llm15", "builtin:qwen2.5-coder-1.5b-instruct", tier="llm"))
    yield engine
    engine.close()


def test_15b_loads_from_its_pinned_weights(llm15: EmbeddedEngine) -> None:
    info = llm15.info
    assert (info.name, info.tier, info.model) == ("llm15", "llm", "qwen2.5-coder-1.5b-instruct")
    assert info.dtype == "bfloat16"
    assert info.context_length == 32768
    config = llm15.model.config
    assert (config.num_hidden_layers, config.hidden_size) == (28, 1536)
    cache = default_cache_dir()
    assert (cache / "gguf" / f"{QWEN25_CODER_15B.name}.verified").is_file()
    assert (cache / "models" / QWEN25_CODER_15B.sha256 / "config.json").is_file()


def test_15b_answers_a_greedy_prompt(llm15: EmbeddedEngine) -> None:
    req = GenerationRequest(
        ({"role": "user", "content": "What is 7 times 6? Reply with the number only."},),
        SamplingParams(temperature=0, max_tokens=8),
    )
    result = llm15.complete_sync(req)
    assert result.model == "llm15"  # the configured name clients address; weights are in info
    assert result.choices[0].text.strip() == "42"
    assert result.choices[0].finish_reason == "stop"


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]},
    },
}  # fmt: skip


async def test_a_tool_call_through_the_cascade_escalates_to_the_15b(
    llm: Any, llm15: EmbeddedEngine
) -> None:
    """The default tiers end to end: Qwen 0.5B answers first, a confidence bar it cannot meet
    (mean probability 1.0) hands the request to the 1.5B, whose call is valid and is the
    answer."""
    body = {
        "model": "auto", "temperature": 0, "max_tokens": 48, "tools": [WEATHER],
        "messages": [{"role": "user", "content": "What's the weather in Paris right now?"}],
    }  # fmt: skip
    req = generation_request(ChatCompletionRequest.model_validate(body), "r15")
    route = Route("auto", ("slm", "llm"), policy="cascade", signal="mean_prob", threshold=1.0)
    router = Router({"slm": llm, "llm": llm15}, {})
    trace = Trace("r15", route.name)
    answer = await router.complete(router.plan(route, req, trace), req, trace)
    tried = [(a.backend, a.outcome) for a in trace.attempts if a.outcome != "probe"]
    assert tried == [("llm", "escalated"), ("llm15", "accepted")]  # engines' own names
    assert trace.attempts[0].fallback_reason == "low_confidence"
    assert answer.backend.name == "llm15"
    assert answer.valid
    parsed = answer.checks[0].parsed
    assert parsed is not None
    (call,) = parsed.tool_calls
    assert call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "Paris"}
