"""``slmgate bench gateway``: configs, medians, the report and the table, without servers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks.gateway_bench import (
    MODEL,
    Arm,
    _parser,
    build_report,
    chat_body,
    litellm_config,
    median_run,
    render,
    slmgate_config,
)
from gateway.config import from_mapping


def test_slmgate_config_is_one_openai_model_and_no_other_route(tmp_path: Path) -> None:
    config = from_mapping(slmgate_config(9999, "sk-test", "sqlite", tmp_path / "cache"))
    (model,) = config.models
    assert (model.name, model.kind, model.base_url) == (MODEL, "openai", "http://127.0.0.1:9999/v1")
    assert config.routes == ()  # only the model itself, as a single-tier route
    assert config.api_keys == ("sk-test",)
    assert config.resolved_ledger_url() == f"sqlite:///{tmp_path / 'cache' / 'ledger.sqlite3'}"
    off = from_mapping(slmgate_config(9999, "sk-test", "off", tmp_path / "cache"))
    assert off.resolved_ledger_url() is None


def test_litellm_config_and_body() -> None:
    config = litellm_config(9999, "sk-master")
    (entry,) = config["model_list"]
    assert entry["model_name"] == MODEL
    assert entry["litellm_params"]["model"] == "openai/fake-large"
    assert entry["litellm_params"]["api_base"] == "http://127.0.0.1:9999/v1"
    assert config["general_settings"]["master_key"] == "sk-master"
    body = json.loads(chat_body())
    assert body["model"] == MODEL
    assert body["max_tokens"] == 8
    assert "stream" not in body


def _run(p50: float, rps: float, errors: int = 0) -> dict[str, Any]:
    sample = "HTTP 500: x" if errors else None
    return {"p50_ms": p50, "p95_ms": 2 * p50, "p99_ms": 3 * p50, "requests_per_s": rps,
            "errors": errors, "requests": 100, "error_sample": sample}  # fmt: skip


def test_median_run_takes_medians_and_sums_errors() -> None:
    m = median_run([_run(1.0, 100), _run(3.0, 300, errors=2), _run(2.0, 200), {"failed": "boom"}])
    assert (m["p50_ms"], m["requests_per_s"]) == (2.0, 200)
    assert m["errors"] == 2
    assert m["requests"] == 300
    assert m["rounds"] == 4
    assert m["failed_rounds"] == 1
    assert m["error_sample"] == "HTTP 500: x"


def _arms() -> list[Arm]:
    direct = Arm("direct", "direct", runs={1: [_run(0.2, 5000)], 8: [_run(0.5, 9000)]})
    sqlite = Arm(
        "sqlite", "slmgate ledger=sqlite", runs={1: [_run(1.0, 1000)], 8: [_run(4.0, 2000)]}
    )
    litellm = Arm("litellm", "litellm proxy 1.0", runs={1: [_run(5.0, 200)], 8: [_run(20, 400)]})
    postgres = Arm("postgres", "slmgate ledger=postgres", skipped="PostgreSQL not reachable")
    replicas = Arm("replicas", "slmgate x3 replicas", info={"single": "sqlite"},
                   runs={1: [_run(1.0, 1100)], 8: [_run(2.0, 5000, errors=1)]})  # fmt: skip
    return [direct, sqlite, postgres, litellm, replicas]


def test_build_report_derives_overheads_ratios_and_targets() -> None:
    report = build_report(_arms(), [1, 8])
    one = report["arms"]["sqlite"]["by_connections"]["1"]
    assert one["added_p50_ms"] == pytest.approx(0.8)
    assert one["vs_litellm"] == pytest.approx(5.0)
    assert report["arms"]["direct"]["by_connections"]["1"]["vs_litellm"] is None
    assert report["arms"]["postgres"]["skipped"] == "PostgreSQL not reachable"
    assert report["replicas"]["8"]["ratio"] == pytest.approx(2.5)
    targets = report["targets"]
    assert targets["added_p50_ms_sqlite_1conn"]["met"] is True
    assert targets["vs_litellm_rps_sqlite_1conn"]["met"] is True
    assert targets["vs_litellm_rps_sqlite_8conn"]["met"] is True  # 2000 / 400 = 5x


def test_render_shows_skips_errors_and_targets() -> None:
    text = render(build_report(_arms(), [1, 8]), [1, 8])
    assert "| slmgate ledger=postgres | skipped: PostgreSQL not reachable |" in text
    assert "| slmgate ledger=sqlite | 1.000 | 2.000 | 1000 | +0.800 | 5.00x | 0 |" in text
    assert "slmgate x3 replicas ⚠" in text  # an arm with errors is flagged
    assert "errors, slmgate x3 replicas at 8 conn: HTTP 500: x" in text
    assert "x3 replicas vs 1 (sqlite): 2.50x requests/s" in text
    assert "target added_p50_ms_sqlite_1conn: <= 1 ms, measured +0.800 ms: met" in text


def test_without_litellm_the_ratio_target_is_not_measured() -> None:
    arms = [a for a in _arms() if a.key != "litellm"]
    report = build_report(arms, [1])
    assert report["targets"]["vs_litellm_rps_sqlite_1conn"]["met"] is None
    assert "measured -: not measured" in render(report, [1])


def test_parser_defaults() -> None:
    args = _parser().parse_args([])
    assert args.connections == "1,8"
    assert args.rounds >= 1
    assert args.requests >= 100
    assert "litellm" in args.arms
    assert "replicas" in args.arms
