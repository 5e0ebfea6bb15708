"""`slmgate bench spec`'s pure parts: which requests a trace yields, and how runs are summarised."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.spec_bench import Run, summarise, trace_requests
from decoding.types import SpecStats

CONVERSATION = {
    "messages": [
        {"role": "system", "content": "policy " * 10},
        {"role": "user", "content": "hello there"},
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": "refund please"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function",
            "function": {"name": "refund", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "done " * 50},
        {"role": "assistant", "content": "refunded"},
    ],
    "tools": [{"type": "function", "function": {"name": "refund", "parameters": {}}}],
}  # fmt: skip


@pytest.fixture
def traces(tmp_path: Path) -> Path:
    path = tmp_path / "traces.jsonl"
    path.write_text(json.dumps(CONVERSATION) + "\n" + json.dumps(CONVERSATION) + "\n")
    return path


def test_every_assistant_turn_is_a_request_with_its_whole_prefix(traces: Path) -> None:
    requests = trace_requests(traces, 10, max_messages=0, max_chars=0, system=True, tools=True)
    assert len(requests) == 6  # three assistant turns per conversation
    assert [len(r.messages) for r in requests[:3]] == [2, 4, 6]
    assert requests[2].messages == tuple(CONVERSATION["messages"][:6])  # type: ignore[index]
    assert requests[0].tools == tuple(CONVERSATION["tools"])  # type: ignore[arg-type]
    assert trace_requests(traces, 4, 0, 0, True, True)[3].messages == requests[0].messages


def test_bounded_prompts_keep_the_last_messages_cut_to_size(traces: Path) -> None:
    requests = trace_requests(traces, 3, max_messages=1, max_chars=20, system=False, tools=False)
    # The tool result is kept without its call: the turn starts after it is dropped.
    assert [len(r.messages) for r in requests] == [1, 1, 0]
    assert requests[1].messages[0]["content"] == "refund please"
    assert requests[0].tools == ()
    long = trace_requests(traces, 3, max_messages=2, max_chars=20, system=True, tools=False)
    assert long[2].messages[0]["role"] == "system"
    assert all(len(m.get("content") or "") <= 20 for m in long[2].messages)


def test_summary_medians_and_prefix_reuse() -> None:
    plain = [
        Run([1, 2, 3], 1000, 0, 3.0, 2.0, 2.9, None),
        Run([4, 5], 1000, 512, 4.0, 1.0, 3.9, None),
    ]
    fast = [
        Run([1, 2, 3], 1000, 0, 1.0, 0.5, 0.9, SpecStats("suffix", 4, 2, 1, (0, 0, 1))),
        Run([4, 6], 1000, 512, 2.0, 0.5, 1.9, SpecStats("suffix", 2, 1, 1, (0, 1))),
    ]
    summary = summarise("suffix", fast, plain)
    assert summary.median_speedup == pytest.approx((3.0 + 2.0) / 2)
    assert summary.decode_speedup == pytest.approx((4.0 + 2.0) / 2)
    assert summary.mean_accepted_length == pytest.approx(5 / 2)
    assert (summary.identical, summary.identical_requests) == (False, 1)
    assert (summary.prompt_tokens, summary.reused_prompt_tokens) == (2000, 512)
