"""Offline simulator and trace loading, on tiny traces with hand-computed results."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spec.simulate import main, simulate
from spec.stand import StandDrafter
from spec.suffix import SuffixConfig, SuffixDrafter
from spec.traces import ProxyTokenizer, TraceRequest, chat_requests, load_requests

SAME = TraceRequest(prompt_ids=(1, 2), output_ids=(3, 4, 5, 6))


def test_repeated_output_is_drafted_from_the_global_index() -> None:
    result = simulate(SuffixDrafter(), [SAME, SAME, SAME], k=16)
    # Request 1: nothing seen yet, every token is its own step (4 steps, 0 accepted).
    # Requests 2 and 3: step 1 emits 3 (no suffix of [1, 2] is in any index); step 2 matches
    # [3] (1 token, so the default cap allows 1 draft token): accepts 4, bonus 5; step 3
    # matches [3, 4, 5]: drafts and accepts 6. 3 steps and 2 accepted tokens each.
    assert (result.requests, result.output_tokens) == (3, 12)
    assert (result.steps, result.accepted_tokens, result.drafted_tokens) == (10, 4, 4)
    assert result.tokens_per_step == pytest.approx(12 / 10)
    assert result.acceptance_length == pytest.approx(4 / 10)
    assert result.acceptance_rate == 1.0
    assert result.speedup == pytest.approx(1.2)


def test_a_long_enough_match_drafts_the_whole_rest() -> None:
    drafter = SuffixDrafter(SuffixConfig(max_spec_factor=4.0))
    result = simulate(drafter, [SAME, SAME], k=16)
    # Request 2: step 1 emits 3; step 2 matches [3] and may draft 4 tokens: 4 5 6 accepted.
    assert (result.steps, result.accepted_tokens) == (4 + 2, 3)


def test_k_zero_is_plain_decoding() -> None:
    result = simulate(SuffixDrafter(), [SAME, SAME], k=0)
    assert (result.steps, result.accepted_tokens, result.speedup) == (8, 0, 1.0)


def test_wrong_drafts_cost_nothing_but_count_as_drafted() -> None:
    first = TraceRequest(prompt_ids=(0,), output_ids=(7, 8, 9))
    second = TraceRequest(prompt_ids=(0,), output_ids=(7, 8, 1))
    result = simulate(SuffixDrafter(SuffixConfig(max_spec_factor=4.0)), [first, second], k=16)
    # Request 2: step 1 emits 7; step 2 drafts 8 9, accepts 8, bonus 1. 3 + 2 steps.
    assert (result.steps, result.drafted_tokens, result.accepted_tokens) == (5, 2, 1)
    assert result.acceptance_rate == 0.5


def test_stand_learns_within_a_request() -> None:
    request = TraceRequest(prompt_ids=(1, 2, 3, 1, 2, 3), output_ids=(1, 2, 3, 1, 2, 3))
    result = simulate(StandDrafter(), [request], k=16)
    assert result.accepted_tokens > 0
    assert result.steps < len(request.output_ids)


def test_empty_trace() -> None:
    result = simulate(SuffixDrafter(), [], k=16)
    assert (result.requests, result.steps, result.speedup, result.propose_us_median) == (
        0,
        0,
        0.0,
        0.0,
    )


CONVERSATION: dict[str, Any] = {
    "messages": [
        {"role": "system", "content": "You help."},
        {"role": "user", "content": "Find order #W1."},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_order", "arguments": '{"order_id": "#W1"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "name": "get_order", "content": "shipped"},
        {"role": "assistant", "content": "It has shipped."},
    ],
    "tools": [{"type": "function", "function": {"name": "get_order", "parameters": {}}}],
}


def test_chat_conversation_gives_one_request_per_assistant_turn() -> None:
    tokenizer = ProxyTokenizer()
    first, second = chat_requests(CONVERSATION["messages"], CONVERSATION["tools"], tokenizer)
    call = '<tool_call>\n{"name": "get_order", "arguments": {"order_id": "#W1"}}\n</tool_call>'
    assert first.output_ids == tuple(tokenizer.encode(call + "<|im_end|>\n"))
    assert second.output_ids == tuple(tokenizer.encode("It has shipped.<|im_end|>\n"))
    # The second prompt contains the first turn verbatim, tool result included.
    prompt_text = "".join(tokenizer.pieces(call))
    assert prompt_text == call
    assert first.prompt_ids == second.prompt_ids[: len(first.prompt_ids)]
    assert len(second.prompt_ids) > len(first.prompt_ids) + len(first.output_ids)


@settings(database=None)
@given(st.text())
def test_proxy_tokenizer_covers_every_character(text: str) -> None:
    assert "".join(ProxyTokenizer().pieces(text)) == text


def write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_load_requests_reads_both_formats_and_limit(tmp_path: Path) -> None:
    ids_record = {"prompt_ids": [1, 2], "output_ids": [3]}
    path = write_jsonl(tmp_path / "t.jsonl", [ids_record, CONVERSATION, ids_record])
    assert len(load_requests(path)) == 4  # 1 + 2 assistant turns + 1
    assert load_requests(path, limit=1) == [TraceRequest((1, 2), (3,))]


def test_load_requests_names_the_bad_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt_ids": [1], "output_ids": [2]}, {"x": 1}])
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected prompt_ids/output_ids"):
        load_requests(path)


def test_cli_defaults_run_both_drafters(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", [SAME_RECORD] * 3)
    assert main([str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["suffix", "stand"]
    assert "speedup 1.20x" in lines[0]  # as in test_repeated_output_is_drafted_...


SAME_RECORD = {"prompt_ids": list(SAME.prompt_ids), "output_ids": list(SAME.output_ids)}


def test_cli_json_with_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", [SAME_RECORD] * 3)
    argv = [str(path), "--drafter", "suffix", "--k", "16", "--limit", "2", "--tree", "--json"]
    assert main(argv) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["drafter"] == "suffix-tree"
    assert (row["requests"], row["output_tokens"], row["steps"]) == (2, 8, 7)
    assert row["speedup"] == pytest.approx(8 / 7, abs=1e-4)
    assert {"acceptance_length", "acceptance_rate", "propose_us_median", "propose_us_p95"} <= set(
        row
    )


def test_cli_rejects_negative_k(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", [SAME_RECORD])
    with pytest.raises(SystemExit):
        main([str(path), "--k", "-1"])
