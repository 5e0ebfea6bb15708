"""``slmgate bench serve``: the request mix and the report (no model, no server)."""

from __future__ import annotations

from benchmarks.serve_bench import match_rates, render_report, workload


def test_workload_takes_text_json_and_tool_requests_in_turns() -> None:
    mix = workload(6)
    assert [kind for kind, _ in mix] == ["text", "json", "tool", "text", "json", "tool"]
    text, schema, tool = (body for _, body in mix[:3])
    assert set(text) == {"messages"}
    assert schema["response_format"]["type"] == "json_schema"
    assert isinstance(schema["response_format"]["json_schema"]["schema"], dict)
    assert tool["tool_choice"] == "auto"
    assert tool["tools"][0]["type"] == "function"
    assert mix[0][1] != mix[3][1]  # different questions, not one repeated
    assert workload(6) == mix  # fixed: every arm and run gets the same requests


def level(tokens_per_s: float, p95: float) -> dict[str, float | int | None]:
    return {"output_tokens_per_s": tokens_per_s, "requests_per_s": 1.0, "p50_latency_s": 1.0,
            "p95_latency_s": p95, "p50_ttft_s": 0.1, "p95_ttft_s": None, "errors": 0}  # fmt: skip


def test_report_gives_ratios_to_serial_and_to_concurrency_one() -> None:
    result = {
        "levels": [
            {"concurrency": 1, "arms": {"serial": level(10, 2.0), "batched": level(10, 2.0)}},
            {"concurrency": 8, "arms": {"serial": level(10, 16.0), "batched": level(45, 4.0)}},
        ],
        "ledger": {"serial": {"sent": 2, "rows": 2}},
    }
    report = render_report(result)
    assert "c=8 batched/serial tokens/s: 4.50x" in report
    assert "c=8 batched p95 latency / c=1 p95: 2.00x" in report
    assert "| 8 | batched | 45.0 |" in report


def test_match_rate_counts_identical_outputs_per_arm_over_levels() -> None:
    levels = [
        {"concurrency": 1, "arms": {"serial": {"outputs": ["a", "b"]},
                                    "batched": {"outputs": ["a", "c"]}}},
        {"concurrency": 4, "arms": {"serial": {"outputs": ["d"]}, "batched": {"outputs": ["d"]}}},
    ]  # fmt: skip
    assert match_rates(levels) == {"batched": [2, 3]}
