"""The embedded engine on the real default models: validity, tools, seeds, logprobs, errors."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from decoding.constraint import JsonObject, JsonSchema, NoConstraint, ToolCalls, ToolSpec
from decoding.engine import EmbeddedEngine
from decoding.types import GenerationRequest, SamplingParams
from decoding.validate import check_output
from schemas.errors import ContextLengthError, UnsatisfiableSchemaError
from schemas.jsonschema_utils import validation_errors

pytestmark = pytest.mark.slow

BENCH = Path(__file__).resolve().parents[3] / "shared" / "data" / "jsonschemabench"
GREEDY = SamplingParams(temperature=0, max_tokens=48)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a time zone",
    "parameters": {"type": "object", "properties": {"tz": {"type": "string"}},
                   "required": ["tz"]}}}  # fmt: skip


def user(text: str) -> tuple[dict[str, Any], ...]:
    return ({"role": "user", "content": text},)


def spec(tool: dict[str, Any]) -> ToolSpec:
    return ToolSpec(tool["function"]["name"], tool["function"]["parameters"])


def sample_schemas(n: int) -> list[Any]:
    """A fixed sample of small real-world schemas (seeded choice, smallest files first); one
    skipped case when the shared data folder is not beside this checkout (a fresh clone)."""
    if not BENCH.is_dir():
        reason = f"JSONSchemaBench data not found at {BENCH} (the project's shared/data folder)"
        return [pytest.param("missing", {}, marks=pytest.mark.skip(reason=reason))]
    files = sorted(BENCH.glob("Glaiveai2K/*.json")) + sorted(BENCH.glob("Github_easy/*.json"))
    small = [f for f in files if f.stat().st_size < 700]
    picked = random.Random(1234).sample(small, n)
    return [(f"{f.parent.name}/{f.name}", json.loads(f.read_text())) for f in picked]


@pytest.mark.parametrize(("name", "schema"), sample_schemas(8))
def test_schema_outputs_validate(slm: EmbeddedEngine, name: str, schema: dict[str, Any]) -> None:
    prompt = f"Produce one JSON instance of this schema:\n{json.dumps(schema)}"
    req = GenerationRequest(user(prompt), SamplingParams(temperature=0, max_tokens=160),
                            JsonSchema(schema))  # fmt: skip
    choice = slm.complete_sync(req).choices[0]
    if choice.finish_reason == "length":
        pytest.skip(f"{name}: truncated at max_tokens (valid prefix, counted in the benchmark)")
    assert choice.finish_reason == "stop"
    assert validation_errors(json.loads(choice.text), schema) == [], (name, choice.text)


def test_json_object(slm: EmbeddedEngine) -> None:
    req = GenerationRequest(user("Describe a cat as a JSON object with a name and an age."),
                            SamplingParams(temperature=0, max_tokens=80), JsonObject())  # fmt: skip
    choice = slm.complete_sync(req).choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(json.loads(choice.text), dict)


@pytest.mark.parametrize(
    ("mode", "parallel"), [("required", True), ("required", False), ("named", True)]
)
def test_tool_calls_parse_and_validate(slm: EmbeddedEngine, mode: str, parallel: bool) -> None:
    tools = (WEATHER,) if mode == "named" else (WEATHER, TIME)
    constraint = ToolCalls(tuple(spec(t) for t in tools), mode=mode, parallel=parallel)  # type: ignore[arg-type]
    req = GenerationRequest(user("What's the weather in Paris, in celsius?"),
                            SamplingParams(temperature=0, max_tokens=120), constraint,
                            tools)  # fmt: skip
    choice = slm.complete_sync(req).choices[0]
    check = check_output(constraint, choice.text)
    assert check.parsed is not None
    assert check.parsed.tool_calls, choice.text
    first = check.parsed.tool_calls[0]
    assert first.name in {t["function"]["name"] for t in tools}
    assert validation_errors(json.loads(first.arguments), dict(WEATHER["function"]["parameters"])
                             if first.name == "get_weather" else TIME["function"]["parameters"]
                             ) == []  # fmt: skip
    if not parallel:
        assert choice.finish_reason == "stop"
        assert check.valid, check.errors
        assert len(check.parsed.tool_calls) == 1


def test_tools_plus_response_format(slm: EmbeddedEngine) -> None:
    final = JsonSchema({"type": "object", "properties": {"answer": {"type": "string"}},
                        "required": ["answer"], "additionalProperties": False}, strict=True)
    constraint = ToolCalls((spec(WEATHER),), mode="auto", final=final, parallel=False)
    req = GenerationRequest(user("Say hello as the answer."),
                            SamplingParams(temperature=0, max_tokens=80), constraint, (WEATHER,))
    choice = slm.complete_sync(req).choices[0]  # fmt: skip
    assert choice.finish_reason == "stop"
    assert check_output(constraint, choice.text).valid, choice.text


def test_same_seed_same_output(slm: EmbeddedEngine) -> None:
    def run(seed: int) -> str:
        params = SamplingParams(temperature=1.0, seed=seed, max_tokens=24)
        result = slm.complete_sync(GenerationRequest(user("Tell me a story."), params))
        return result.choices[0].text

    first = run(11)
    assert run(11) == first
    assert run(12) != first


def test_n_choices_are_seeded_independently(slm: EmbeddedEngine) -> None:
    params = SamplingParams(temperature=1.0, seed=5, max_tokens=16, n=2)
    result = slm.complete_sync(GenerationRequest(user("Name a colour."), params))
    again = slm.complete_sync(GenerationRequest(user("Name a colour."), params))
    assert [c.index for c in result.choices] == [0, 1]
    assert [c.text for c in result.choices] == [c.text for c in again.choices]


def test_logprobs_match_a_plain_forward_pass(slm: EmbeddedEngine) -> None:
    params = SamplingParams(temperature=0, max_tokens=12, logprobs=True, top_logprobs=3)
    req = GenerationRequest(user("List three fruits."), params)
    prompt_ids = slm.prepare(req).prompt_ids
    choice = slm.complete_sync(req).choices[0]
    ids = torch.tensor([prompt_ids + choice.token_ids])
    with torch.inference_mode():
        logprobs = torch.log_softmax(slm.model(ids).logits[0].float(), -1)
    for i, event in enumerate(choice.events):
        row = logprobs[len(prompt_ids) + i - 1]
        assert event.logprob == pytest.approx(float(row[event.token_id]), abs=1e-3)
        assert event.token_id == int(row.argmax())  # greedy
        assert [t.token_id for t in event.top_logprobs] == row.topk(3).indices.tolist()
        assert event.allowed_mass == 1.0


def test_stop_string_truncates(slm: EmbeddedEngine) -> None:
    req = GenerationRequest(user("Count from 1 to 20, comma separated."), GREEDY)
    full = slm.complete_sync(req).choices[0].text
    cut = full.index(",", 4)
    stop = full[cut : cut + 3]
    stopped = slm.complete_sync(
        GenerationRequest(user("Count from 1 to 20, comma separated."),
                          SamplingParams(temperature=0, max_tokens=48, stop=(stop,)))
    ).choices[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == full[: full.index(stop)]


def test_length_finish(slm: EmbeddedEngine) -> None:
    params = SamplingParams(temperature=0, max_tokens=5)
    choice = slm.complete_sync(GenerationRequest(user("Write an essay."), params)).choices[0]
    assert (choice.finish_reason, len(choice.token_ids)) == ("length", 5)


def test_errors_before_the_first_token(slm: EmbeddedEngine) -> None:
    bad = GenerationRequest(user("x"), GREEDY, JsonSchema({"type": "array", "enum": ["a"]}))
    with pytest.raises(UnsatisfiableSchemaError):
        slm.prepare(bad)
    too_long = GenerationRequest(user("word " * 9000), GREEDY)
    with pytest.raises(ContextLengthError) as info:
        slm.prepare(too_long)
    assert info.value.code == "context_length_exceeded"
    asks_too_much = GenerationRequest(user("hi"), SamplingParams(max_tokens=10**6))
    with pytest.raises(ContextLengthError):
        slm.prepare(asks_too_much)


async def test_concurrent_requests_do_not_interfere(slm: EmbeddedEngine) -> None:
    prompts = ["Name a fruit.", "Name a planet.", "Name a river."]
    alone = [slm.complete_sync(GenerationRequest(user(p), GREEDY)).choices[0].text for p in prompts]
    together = await asyncio.gather(
        *(slm.complete(GenerationRequest(user(p), GREEDY)) for p in prompts)
    )
    assert [r.choices[0].text for r in together] == alone


async def test_closing_the_stream_cancels_and_engine_keeps_serving(slm: EmbeddedEngine) -> None:
    long = GenerationRequest(user("Write a long essay."), SamplingParams(temperature=0))
    stream = slm.generate(long)
    seen = 0
    async for _ in stream:
        seen += 1
        if seen == 3:
            break
    await stream.aclose()  # type: ignore[attr-defined]
    # The worker stops at its next step, so the next request is served right away.
    result = await asyncio.wait_for(slm.complete(GenerationRequest(user("Hi"), GREEDY)), 60)
    assert result.choices[0].text


def test_unconstrained_request_has_no_grammar(slm: EmbeddedEngine) -> None:
    assert slm.prepare(GenerationRequest(user("hi"), GREEDY, NoConstraint())).grammar is None


def test_llm_tier_tool_call_with_native_template(llm: EmbeddedEngine) -> None:
    """Qwen's own template renders the tools; its call validates."""
    constraint = ToolCalls((spec(WEATHER), spec(TIME)), mode="auto")
    req = GenerationRequest(user("What's the weather in Paris, in celsius?"),
                            SamplingParams(temperature=0, max_tokens=60), constraint,
                            (WEATHER, TIME))  # fmt: skip
    choice = llm.complete_sync(req).choices[0]
    check = check_output(constraint, choice.text)
    assert check.valid, (choice.text, check.errors)
    assert check.parsed is not None
    assert [c.name for c in check.parsed.tool_calls] == ["get_weather"]
    assert json.loads(check.parsed.tool_calls[0].arguments)["city"] == "Paris"
