"""Upstream usage: vLLM/OpenAI prefix-cache hits (``prompt_tokens_details``) reach the result."""

from __future__ import annotations

from typing import Any

from decoding.backend import FinishEvent, collect
from decoding.openai_wire import TokenTable, cached_of, events_of, result_from_response

RESPONSE: dict[str, Any] = {
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}
    ],
    "usage": {
        "prompt_tokens": 900,
        "completion_tokens": 1,
        "prompt_tokens_details": {"cached_tokens": 768},
    },
}


def test_cached_tokens_are_read_from_the_usage_details() -> None:
    assert cached_of(RESPONSE["usage"]) == 768
    assert cached_of({"prompt_tokens": 5}) == 0
    assert cached_of({"prompt_tokens_details": None}) == 0
    result = result_from_response(RESPONSE, name="up", tokens=TokenTable())
    assert (result.prompt_tokens, result.cached_tokens) == (900, 768)
    finish = [e for e in events_of(result) if isinstance(e, FinishEvent)]
    assert [e.cached_tokens for e in finish] == [768]


def test_collect_counts_the_first_choice_cached_prompt_once() -> None:
    events = [
        FinishEvent(0, "stop", "a", 900, None, 512),
        FinishEvent(1, "stop", "b", 900, None, 768),
    ]
    result = collect(events, "m")
    assert (result.prompt_tokens, result.cached_tokens) == (900, 512)
