"""``slmgate bench backends``: the arms' tiers and the report, without servers."""

from __future__ import annotations

import json

import pytest

from benchmarks.backends_bench import (
    ArmReport,
    Result,
    arm_model,
    build_parser,
    markdown,
    summarise,
)
from decoding.models import ModelSpec


def test_each_arm_is_one_tier_on_the_same_weights() -> None:
    args = build_parser().parse_args(["--vllm-python", "/venv/bin/python"])
    specs = {arm: ModelSpec.from_mapping(arm_model(arm, args)) for arm in
             ("embedded", "embedded-spec", "vllm", "vllm-spec")}  # fmt: skip
    weights = "builtin:qwen2.5-coder-0.5b-instruct"
    assert specs["embedded"].source == specs["embedded-spec"].source == weights
    assert (specs["embedded"].speculation, specs["embedded-spec"].speculation) == ("none", "both")
    launched = [specs["vllm"].launch, specs["vllm-spec"].launch]
    assert [launch.model for launch in launched if launch] == [weights, weights]
    assert specs["vllm"].speculative_config is None
    assert specs["vllm-spec"].speculative_config == {"method": "suffix",
                                                     "num_speculative_tokens": 16}  # fmt: skip


def test_summary_counts_errors_as_invalid_and_sums_speculation() -> None:
    report = ArmReport("vllm-spec", 12.0, [
        Result("text", 2.0, 0.5, 40, True, speculation={"drafted": 10, "accepted": 6}),
        Result("text", 4.0, 0.7, 40, True, speculation={"drafted": 30, "accepted": 10}),
        Result("json", 1.0, None, 0, False, error="502 upstream"),
        Result("json", 2.0, 0.4, 20, True),
    ])  # fmt: skip
    summary = summarise(report)
    assert summary["text"]["tokens_per_s"] == pytest.approx(80 / 6.0, abs=0.01)
    assert summary["text"]["median_request_tokens_per_s"] == pytest.approx(15.0)
    assert summary["text"]["spec_acceptance"] == pytest.approx(16 / 40)
    assert summary["json"]["valid_of_all"] == 0.5  # the error counts as invalid
    assert summary["json"]["errors"] == 1
    assert summary["all"]["requests"] == 4
    assert summary["all"]["median_ttft_s"] == pytest.approx(0.5)
    table = markdown([summary])
    assert "| vllm-spec | text | 13.33 | 15.0 | 0.6 | 100% | 0 | 0.40 (2) |" in table
    json.dumps(summary)  # what --json writes
