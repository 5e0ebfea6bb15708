"""GatewayMetrics: literal records in, exact counter values out of the parsed exposition text."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import GatewayMetrics
from router.ledger import Ledger
from router.records import AttemptRecord, RequestRecord

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(metrics: GatewayMetrics) -> Samples:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain; version=0.0.4")
    out: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def cascade() -> RequestRecord:
    """A tool request the SLM was unsure of, answered by the LLM."""
    slm = AttemptRecord(
        request_id="r1", attempt_no=0, route="auto", tier="slm", backend="slm", model="smol",
        started_at=1000.0, latency_s=0.4, ttft_s=0.05, prompt_tokens=120, completion_tokens=30,
        cost_usd=0.0001, outcome="escalated", fallback_reason="low_confidence",
        spec_drafted=40, spec_accepted=25, spec_steps=10, energy_j=2.0, energy_measured=False,
    )  # fmt: skip
    llm = AttemptRecord(
        request_id="r1", attempt_no=1, route="auto", tier="llm", backend="llm", model="qwen",
        started_at=1000.4, latency_s=1.1, ttft_s=0.2, prompt_tokens=120, completion_tokens=28,
        cost_usd=0.002, outcome="accepted", spec_drafted=10, spec_accepted=9, energy_j=5.5,
        energy_measured=True,
    )  # fmt: skip
    return RequestRecord(
        request_id="r1", route="auto", created_at=1000.0, latency_s=1.5, task_id="t1",
        tier="llm", backend="llm", ttft_s=0.6, prompt_tokens=120, completion_tokens=28,
        cost_usd=0.0021, counterfactual_cost_usd=0.002, schema_valid=True, executable=True,
        fallback=True, fallback_reason="low_confidence", expects_tools=True, attempts=[slm, llm],
    )  # fmt: skip


def direct() -> RequestRecord:
    """A JSON request the SLM answered alone, with invalid output."""
    slm = AttemptRecord(
        request_id="r2", attempt_no=0, route="auto", tier="slm", backend="slm", model="smol",
        started_at=1001.0, latency_s=0.3, prompt_tokens=50, completion_tokens=20,
        cost_usd=0.00005, outcome="accepted",
    )  # fmt: skip
    return RequestRecord(
        request_id="r2", route="auto", created_at=1001.0, latency_s=0.3, tier="slm",
        backend="slm", ttft_s=0.03, prompt_tokens=50, completion_tokens=20, cost_usd=0.00005,
        counterfactual_cost_usd=0.0009, schema_valid=False, expects_json=True, attempts=[slm],
    )  # fmt: skip


def refused() -> RequestRecord:
    """A request that failed before any backend ran (no attempts, no tier)."""
    return RequestRecord(request_id="r3", route="cheap", created_at=1002.0, latency_s=0.002,
                         status=503, error_type="overloaded")  # fmt: skip


def test_request_counts_by_route_tier_status() -> None:
    m = GatewayMetrics()
    for rec in (cascade(), direct(), direct(), refused()):
        m.observe_request(rec)
    s = scrape(m)
    assert value(s, "slmgate_requests_total", route="auto", tier="llm", status="200") == 1
    assert value(s, "slmgate_requests_total", route="auto", tier="slm", status="200") == 2
    assert value(s, "slmgate_requests_total", route="cheap", tier="none", status="503") == 1


def test_attempts_fallbacks_and_validity() -> None:
    m = GatewayMetrics()
    for rec in (cascade(), direct(), direct()):
        m.observe_request(rec)
    s = scrape(m)
    assert value(s, "slmgate_attempts_total", route="auto", tier="slm", outcome="escalated") == 1
    assert value(s, "slmgate_attempts_total", route="auto", tier="slm", outcome="accepted") == 2
    assert value(s, "slmgate_attempts_total", route="auto", tier="llm", outcome="accepted") == 1
    assert value(s, "slmgate_fallbacks_total", route="auto", reason="low_confidence") == 1
    assert value(s, "slmgate_schema_validity_total", route="auto", result="valid") == 1
    assert value(s, "slmgate_schema_validity_total", route="auto", result="invalid") == 2
    assert value(s, "slmgate_executable_calls_total", route="auto", result="valid") == 1
    assert ("slmgate_executable_calls_total",
            frozenset({("route", "auto"), ("result", "invalid")})) not in s  # fmt: skip


def test_tokens_cost_and_counterfactual_by_tier() -> None:
    m = GatewayMetrics()
    m.observe_request(cascade())
    m.observe_request(direct())
    s = scrape(m)
    assert value(s, "slmgate_tokens_total", route="auto", tier="slm", direction="in") == 170
    assert value(s, "slmgate_tokens_total", route="auto", tier="slm", direction="out") == 50
    assert value(s, "slmgate_tokens_total", route="auto", tier="llm", direction="in") == 120
    assert value(s, "slmgate_tokens_total", route="auto", tier="llm", direction="out") == 28
    assert value(s, "slmgate_cost_usd_total", route="auto", tier="slm") == pytest.approx(0.00015)
    assert value(s, "slmgate_cost_usd_total", route="auto", tier="llm") == 0.002
    assert value(s, "slmgate_counterfactual_cost_usd_total", route="auto", tier="llm") == 0.002
    assert value(s, "slmgate_counterfactual_cost_usd_total", route="auto", tier="slm") == 0.0009


def test_request_without_attempts_spends_its_own_totals() -> None:
    m = GatewayMetrics()
    m.observe_request(refused())
    s = scrape(m)
    assert value(s, "slmgate_cost_usd_total", route="cheap", tier="none") == 0
    assert value(s, "slmgate_tokens_total", route="cheap", tier="none", direction="in") == 0
    assert not any(name == "slmgate_attempts_total" for name, _ in s)


def test_latency_and_ttft_histograms() -> None:
    m = GatewayMetrics()
    for rec in (cascade(), direct(), refused()):
        m.observe_request(rec)
    s = scrape(m)
    assert value(s, "slmgate_request_latency_seconds_count", route="auto") == 2
    assert value(s, "slmgate_request_latency_seconds_sum", route="auto") == 1.8
    assert value(s, "slmgate_request_latency_seconds_bucket", route="auto", le="0.5") == 1
    assert value(s, "slmgate_request_latency_seconds_bucket", route="auto", le="2.5") == 2
    assert value(s, "slmgate_request_latency_seconds_bucket", route="cheap", le="0.01") == 1
    assert value(s, "slmgate_ttft_seconds_count", route="auto") == 2
    assert value(s, "slmgate_ttft_seconds_sum", route="auto") == pytest.approx(0.63)
    assert value(s, "slmgate_ttft_seconds_bucket", route="auto", le="0.05") == 1
    assert ("slmgate_ttft_seconds_count", frozenset({("route", "cheap")})) not in s


def test_speculation_and_energy_by_source() -> None:
    m = GatewayMetrics()
    m.observe_request(cascade())
    m.observe_request(direct())  # no speculation, no energy: adds nothing
    s = scrape(m)
    assert value(s, "slmgate_spec_drafted_tokens_total", route="auto", tier="slm") == 40
    assert value(s, "slmgate_spec_accepted_tokens_total", route="auto", tier="slm") == 25
    assert value(s, "slmgate_spec_drafted_tokens_total", route="auto", tier="llm") == 10
    assert value(s, "slmgate_spec_accepted_tokens_total", route="auto", tier="llm") == 9
    assert value(s, "slmgate_energy_joules_total", route="auto", tier="slm",
                 source="estimated") == 2.0  # fmt: skip
    assert value(s, "slmgate_energy_joules_total", route="auto", tier="llm",
                 source="measured") == 5.5  # fmt: skip


def test_bad_figures_do_not_fail_a_request() -> None:
    m = GatewayMetrics()
    rec = direct()
    rec.counterfactual_cost_usd = -1.0
    rec.attempts[0].cost_usd = float("nan")
    m.observe_request(rec)
    s = scrape(m)
    assert value(s, "slmgate_counterfactual_cost_usd_total", route="auto", tier="slm") == 0
    assert value(s, "slmgate_cost_usd_total", route="auto", tier="slm") == 0


def test_gauges_errors_breaker_and_ledger_failures() -> None:
    m = GatewayMetrics()
    m.set_queue_depth("slm", 3)
    m.set_queue_depth("slm", 1)
    m.backend_error("llm", "timeout")
    m.backend_error("llm", "timeout")
    m.backend_error("llm", "http_5xx")
    m.set_breaker_state("llm", "open")
    m.set_breaker_state("slm", "open")
    m.set_breaker_state("slm", "half_open")
    m.ledger_write_failure()
    m.ledger_write_failure(RuntimeError("database is locked"))  # as Ledger(on_failure=...)
    s = scrape(m)
    assert value(s, "slmgate_queue_depth", backend="slm") == 1
    assert value(s, "slmgate_backend_errors_total", backend="llm", kind="timeout") == 2
    assert value(s, "slmgate_backend_errors_total", backend="llm", kind="http_5xx") == 1
    assert value(s, "slmgate_breaker_state", backend="llm", state="open") == 1
    assert value(s, "slmgate_breaker_state", backend="llm", state="closed") == 0
    assert value(s, "slmgate_breaker_state", backend="slm", state="half_open") == 1
    assert value(s, "slmgate_breaker_state", backend="slm", state="open") == 0
    assert value(s, "slmgate_ledger_write_failures_total") == 2
    with pytest.raises(ValueError, match="breaker state"):
        m.set_breaker_state("llm", "ajar")


def test_each_instance_has_its_own_registry() -> None:
    a, b = GatewayMetrics(), GatewayMetrics()
    a.observe_request(direct())
    assert value(scrape(a), "slmgate_requests_total", route="auto", tier="slm", status="200") == 1
    assert not any(name == "slmgate_requests_total" for name, _ in scrape(b))


def test_ledger_records_dropped_by_reason() -> None:
    m = GatewayMetrics()
    s = scrape(m)
    assert value(s, "slmgate_ledger_records_dropped_total", reason="queue_full") == 0
    assert value(s, "slmgate_ledger_records_dropped_total", reason="write_failed") == 0
    m.ledger_records_dropped(3, "write_failed")
    m.ledger_records_dropped(1, "queue_full")
    m.ledger_records_dropped(2, "something else")  # unknown reasons stay in the bounded set
    m.ledger_records_dropped(-5, "queue_full")  # a bad figure never lowers a counter
    s = scrape(m)
    assert value(s, "slmgate_ledger_records_dropped_total", reason="write_failed") == 5
    assert value(s, "slmgate_ledger_records_dropped_total", reason="queue_full") == 1


def test_ledger_outage_drops_reach_the_counter(tmp_path: Path) -> None:
    """Wired as ``Ledger(on_drop=metrics.ledger_records_dropped)``: a database that is not there
    (its directory is missing) drops every record after the retries; /metrics counts them."""
    m = GatewayMetrics()
    ledger = Ledger(f"sqlite:///{tmp_path / 'missing' / 'l.db'}", queue_size=2, retries=1,
                    backoff_s=0.0, on_failure=m.ledger_write_failure,
                    on_drop=m.ledger_records_dropped)  # fmt: skip
    rec = direct()
    for i in range(3):  # the writer is not running yet: the third finds the queue full
        ledger.record(replace(rec, request_id=f"r{i}"))
    ledger.start()
    try:
        assert ledger.flush(30)
        health = ledger.health()
        assert (health["dropped_queue_full"], health["dropped_write_failed"]) == (1, 2)
        s = scrape(m)
        assert value(s, "slmgate_ledger_records_dropped_total", reason="queue_full") == 1
        assert value(s, "slmgate_ledger_records_dropped_total", reason="write_failed") == 2
        assert value(s, "slmgate_ledger_write_failures_total") == health["write_failures"]
    finally:
        ledger.close()
