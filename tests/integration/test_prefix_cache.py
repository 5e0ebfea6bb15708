"""Prompt KV reuse on the real models: a later turn of a conversation reuses the earlier turn's
whole prompt blocks, and its output (tokens and logprobs, bit for bit) is what it is without."""

from __future__ import annotations

from typing import Any

import pytest

from decoding.constraint import Constraint, NoConstraint, ToolCalls
from decoding.engine import EmbeddedEngine
from decoding.prefix_cache import PrefixCache
from decoding.types import Choice, GenerationRequest, SamplingParams
from tests.integration.test_engine import TIME, WEATHER, spec

pytestmark = pytest.mark.slow

SYSTEM = (
    "You are the support agent of an online shop. Policies: "
    + " ".join(f"Rule {i}: refunds of order class {i} need the order id and the user's zip code."
               for i in range(30))
)  # fmt: skip

TURN_1: tuple[dict[str, Any], ...] = (
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "Hi, I want a refund for order #W123."},
)
TURN_2 = (
    *TURN_1,
    {"role": "assistant", "content": "Sure. Could you give me your zip code?"},
    {"role": "user", "content": "It is 10001. What happens next?"},
)


def run(engine: EmbeddedEngine, messages: Any, constraint: Constraint, tools: Any) -> Choice:
    params = SamplingParams(temperature=0, max_tokens=24, logprobs=True, top_logprobs=2)
    req = GenerationRequest(messages, params, constraint, tools, speculation="none")
    return engine.complete_sync(req).choices[0]


@pytest.mark.parametrize("with_tools", [False, True], ids=["text", "tools"])
def test_a_later_turn_reuses_the_prompt_and_decodes_the_same(
    slm: EmbeddedEngine, with_tools: bool
) -> None:
    constraint: Constraint = (
        ToolCalls((spec(WEATHER), spec(TIME)), mode="auto", parallel=False)
        if with_tools
        else NoConstraint()
    )
    tools = (WEATHER, TIME) if with_tools else ()
    saved = slm.prefix_cache
    try:
        slm.prefix_cache = None
        cold = [run(slm, turn, constraint, tools) for turn in (TURN_1, TURN_2)]
        slm.prefix_cache = PrefixCache(slm.config.prefill_block)
        warm = [run(slm, turn, constraint, tools) for turn in (TURN_1, TURN_2)]
        stats = slm.prefix_cache.stats
    finally:
        slm.prefix_cache = saved
    prompt_2 = slm.prepare(GenerationRequest(TURN_2, constraint=constraint, tools=tools)).prompt_ids
    assert len(prompt_2) > 2 * slm.config.prefill_block
    assert (stats.lookups, stats.hits) == (2, 1)  # turn 2 hit turn 1's blocks
    assert stats.tokens_reused >= slm.config.prefill_block
    for a, b in zip(cold, warm, strict=True):
        assert b.token_ids == a.token_ids
        assert [e.logprob for e in b.events] == [e.logprob for e in a.events]
        assert [e.top_logprobs for e in b.events] == [e.top_logprobs for e in a.events]
        assert b.finish_reason == a.finish_reason
