"""Per-tier prompt cap, model names without local paths, capped jump-forward and async prepare.

The spec and config checks need no model; the engine tests load SmolLM2-135M (``slow``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from decoding.constraint import JsonSchema, NoConstraint
from decoding.engine import EmbeddedEngine, EngineConfig
from decoding.models import ModelSpec
from decoding.types import GenerationRequest, SamplingParams
from schemas.errors import ContextLengthError, UnsatisfiableSchemaError

GREEDY = SamplingParams(temperature=0, max_tokens=16)
ISSUE_SCHEMA = {
    "$defs": {"node": {"type": "object", "properties": {"child": {"$ref": "#/$defs/node"}},
                       "required": ["child"]}},
    "$ref": "#/$defs/node",
}  # fmt: skip


def user(text: str) -> tuple[dict[str, Any], ...]:
    return ({"role": "user", "content": text},)


def test_model_names_never_show_local_paths(tmp_path: Path) -> None:
    assert ModelSpec("slm", "builtin:smollm2-135m-instruct").model_name() == (
        "smollm2-135m-instruct"
    )
    model_dir = tmp_path / "models" / "Qwen2.5-7B-Instruct"
    model_dir.mkdir(parents=True)
    assert ModelSpec("big", str(model_dir)).model_name() == "Qwen2.5-7B-Instruct"
    assert ModelSpec("big", f"{model_dir}/").model_name() == "Qwen2.5-7B-Instruct"


def test_prompt_caps_are_checked() -> None:
    with pytest.raises(ValueError, match="max_prompt_tokens"):
        ModelSpec("slm", "builtin:smollm2-135m-instruct", max_prompt_tokens=0)
    with pytest.raises(ValueError, match="max_prompt_tokens"):
        EngineConfig("slm", max_prompt_tokens=0)
    assert EngineConfig("slm").max_prompt_tokens is None


@pytest.mark.slow
def test_backend_info_names_the_model(slm: EmbeddedEngine) -> None:
    assert slm.info.model == "smollm2-135m-instruct"


@pytest.mark.slow
def test_prompt_over_the_tier_cap_is_a_context_length_error(
    slm: EmbeddedEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    req = GenerationRequest(user("Tell me about the weather in Paris today."), GREEDY)
    n_prompt = len(slm.prepare(req).prompt_ids)
    monkeypatch.setattr(slm, "config", dataclasses.replace(slm.config, max_prompt_tokens=n_prompt))
    assert len(slm.prepare(req).prompt_ids) == n_prompt  # exactly at the cap: fine
    monkeypatch.setattr(
        slm, "config", dataclasses.replace(slm.config, max_prompt_tokens=n_prompt - 1)
    )
    with pytest.raises(ContextLengthError) as info:
        slm.prepare(req)
    assert (info.value.param, info.value.code) == ("messages", "context_length_exceeded")
    assert info.value.message == (
        f"This model takes prompts of at most {n_prompt - 1} tokens (limits.max_prompt_tokens). "
        f"However, your messages resulted in {n_prompt} tokens."
    )


@pytest.mark.slow
async def test_prepare_async_matches_prepare(slm: EmbeddedEngine) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    req = GenerationRequest(user("Which city?"), GREEDY, JsonSchema(schema))
    sync, async_ = slm.prepare(req), await slm.prepare_async(req)
    assert async_.prompt_ids == sync.prompt_ids
    assert async_.grammar is sync.grammar  # the same cached compile
    assert async_.max_new_tokens == sync.max_new_tokens
    plain = await slm.prepare_async(GenerationRequest(user("hi"), GREEDY, NoConstraint()))
    assert plain.grammar is None
    with pytest.raises(UnsatisfiableSchemaError) as info:
        await slm.prepare_async(GenerationRequest(user("x"), GREEDY, JsonSchema(ISSUE_SCHEMA)))
    assert info.value.param == "response_format"


@pytest.mark.slow
def test_jump_forward_uses_no_more_forced_text_than_the_tokens_left(slm: EmbeddedEngine) -> None:
    schema = {"type": "string", "const": "abcdefgh" * 500}
    req = GenerationRequest(user("x"), GREEDY, JsonSchema(schema))
    prepared = slm.prepare(req)
    compiled = prepared.grammar
    assert compiled is not None
    forced = slm.grammars.new_state(compiled).jump_forward()
    assert len(forced) == 4002
    ids = slm.decoder(prepared, 0)._jump_forward(budget=3)
    assert 1 <= len(ids) <= 3
    assert forced.startswith(slm.tokenizer.decode(ids))
    assert slm.decoder(prepared, 0)._jump_forward(budget=0) == []


@pytest.mark.slow
def test_issue_schema_generates_nothing_and_the_engine_keeps_serving(slm: EmbeddedEngine) -> None:
    with pytest.raises(UnsatisfiableSchemaError):
        slm.complete_sync(GenerationRequest(user("x"), GREEDY, JsonSchema(ISSUE_SCHEMA)))
    result = slm.complete_sync(GenerationRequest(user("Say hi."), GREEDY))
    assert result.choices[0].token_ids


@pytest.mark.slow
def test_without_max_tokens_choices_share_the_token_budget(slm: EmbeddedEngine) -> None:
    """No max_tokens: each choice may use the context left, within its share of the request's
    budget; a budget larger than the context never turns into a context-length error."""
    free = SamplingParams(temperature=0)
    room = slm.prepare(GenerationRequest(user("hi"), free, NoConstraint())).max_new_tokens
    assert room == slm.context_length - len(slm.prepare(
        GenerationRequest(user("hi"), free, NoConstraint())).prompt_ids)  # fmt: skip
    for budget, n, expected in ((32768, 1, room), (32768, 16, 2048), (10, 4, 2), (3, 4, 1)):
        params = dataclasses.replace(free, token_budget=budget, n=n)
        prepared = slm.prepare(GenerationRequest(user("hi"), params, NoConstraint()))
        assert prepared.max_new_tokens == min(room, expected)
