"""``slmgate bench tiers``: the table and the arguments (the measurement itself needs models)."""

from __future__ import annotations

import pytest

from benchmarks import tiers_bench


def test_render_names_each_tier_with_its_figures() -> None:
    row = {"source": "builtin:qwen2.5-coder-0.5b-instruct", "load_s": 2.04, "rss_mib": 1180.4,
           "prompt_tokens": 52, "ttft_s": 0.314, "prefill_tok_s": 165.6, "decode_tok_s": 17.26}
    table = tiers_bench.render([row]).splitlines()  # fmt: skip
    assert table[0].startswith("| tier model | load s | memory MiB |")
    assert table[2] == "| qwen2.5-coder-0.5b-instruct | 2.0 | 1180 | 52 | 0.31 | 166 | 17.3 |"


def test_rss_is_read_from_proc() -> None:
    assert tiers_bench.rss_mib() > 1.0


def test_parse_args_defaults_and_bounds() -> None:
    args = tiers_bench.parse_args([])
    assert args.sources.split(",") == list(tiers_bench.DEFAULT_SOURCES)
    with pytest.raises(SystemExit):
        tiers_bench.parse_args(["--repeats", "0"])
