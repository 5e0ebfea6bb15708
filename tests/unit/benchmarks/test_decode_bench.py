"""``slmgate bench decode``: arm names, the workloads' prompts and the report (no model)."""

from __future__ import annotations

from typing import Any

import pytest

from benchmarks.decode_bench import Arm, perplexity_text, render


def test_arms_parse_dtype_quantisation_and_mode() -> None:
    assert Arm.parse("bfloat16") == Arm("bfloat16", "none", True)
    assert Arm.parse("bfloat16+int4") == Arm("bfloat16", "int4", True)
    assert Arm.parse("float32+int8/serial") == Arm("float32", "int8", False)
    assert Arm.parse("float32+int8/serial").label == "float32+int8/serial"
    assert Arm.parse("bfloat16/team") == Arm("bfloat16", "none", True, extra_team=True)
    assert Arm.parse("bfloat16/team").label == "bfloat16/team"
    with pytest.raises(ValueError, match="serial"):
        Arm.parse("bfloat16/fast")


def test_the_perplexity_text_is_fixed_public_data() -> None:
    text = perplexity_text()
    assert text == perplexity_text()
    assert text.startswith("Question: ")
    assert len(text) >= 6000


def _arm(name: str, tok_s: float, ppl: float | None) -> dict[str, Any]:
    work = {"decode_tok_s": tok_s, "prefill_tok_s": 100.0}
    return {"arm": name, "perplexity": ppl, "workloads": {"short/text": work, "4k/text": work}}


def test_report_gives_each_arm_its_ratio_to_llamacpp() -> None:
    report = {
        "machine": "test machine",
        "arms": [_arm("llama.cpp (m.gguf)", 50.0, None), _arm("bfloat16", 25.0, 6.4),
                 {"arm": "float32", "skipped": "out of memory"}],
    }  # fmt: skip
    table = render(report)
    assert "| bfloat16 | 6.400 | 25.0 (0.50x) | 25.0 (0.50x) | 100 |" in table
    assert "| llama.cpp (m.gguf) | n/a | 50.0 | 50.0 | 100 |" in table
    assert "| float32 | skipped: out of memory |" in table
    assert "ratio to llama.cpp (m.gguf)" in table


def test_without_llamacpp_ratios_are_to_the_first_arm() -> None:
    arms = [_arm("bfloat16/team", 10.0, 6.4), _arm("bfloat16", 17.0, 6.4)]
    report = {"machine": "m", "arms": arms}
    table = render(report)
    assert "| bfloat16 | 6.400 | 17.0 (1.70x) | 17.0 (1.70x) | 100 |" in table
    assert "ratio to bfloat16/team" in table
