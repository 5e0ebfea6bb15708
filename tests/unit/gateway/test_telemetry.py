"""Telemetry: literal records in, exact spans out (in memory, and over real OTLP/HTTP)."""

from __future__ import annotations

import math
import socket
import time
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from gateway.telemetry import Telemetry, TelemetryConfig
from router.records import AttemptRecord, RequestRecord
from tests.otlp_receiver import OtlpReceiver

S = 1_000_000_000  # ns per s


def cascade() -> RequestRecord:
    """A JSON request the SLM was unsure of, answered by the LLM (times exact in binary)."""
    slm = AttemptRecord(
        request_id="r1", attempt_no=0, route="auto", tier="slm", backend="local", model="smol",
        started_at=1000.0, latency_s=0.5, ttft_s=0.125, prompt_tokens=120, completion_tokens=30,
        cost_usd=0.0001, outcome="escalated", fallback_reason="low_confidence", confidence=0.25,
        schema_valid=True, spec_drafted=40, spec_accepted=25, spec_steps=10,
        grammar_engine="xgrammar", task_id="t1",
    )  # fmt: skip
    llm = AttemptRecord(
        request_id="r1", attempt_no=1, route="auto", tier="llm", backend="remote", model="qwen",
        started_at=1000.5, latency_s=1.0, prompt_tokens=130, completion_tokens=28,
        cost_usd=0.002, outcome="accepted", schema_valid=True, task_id="t1",
    )  # fmt: skip
    return RequestRecord(
        request_id="r1", route="auto", created_at=1000.0, latency_s=1.75, task_id="t1",
        tier="llm", backend="remote", ttft_s=0.75, prompt_tokens=250, completion_tokens=58,
        cost_usd=0.0021, counterfactual_cost_usd=0.004, schema_valid=True, fallback=True,
        fallback_reason="low_confidence", stream=True, expects_json=True, attempts=[slm, llm],
    )  # fmt: skip


def failed() -> RequestRecord:
    """A free-text request whose only backend call failed."""
    att = AttemptRecord(
        request_id="r2", attempt_no=0, route="chat", tier="llm", backend="remote", model="qwen",
        started_at=2000.0, latency_s=0.25, outcome="error",
        error="ConnectError: [Errno 111] Connection refused",
    )  # fmt: skip
    return RequestRecord(
        request_id="r2", route="chat", created_at=2000.0, latency_s=0.5, status=502,
        error_type="backend_unavailable", attempts=[att],
    )  # fmt: skip


@pytest.fixture
def memory() -> Iterator[tuple[Telemetry, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    telemetry = Telemetry(TelemetryConfig(endpoint=None), exporter=exporter)
    yield telemetry, exporter
    telemetry.shutdown()


def finished(telemetry: Telemetry, exporter: InMemorySpanExporter) -> dict[str, ReadableSpan]:
    assert telemetry.force_flush()
    return {s.name: s for s in exporter.get_finished_spans()}


def test_cascade_gives_request_span_with_one_child_per_attempt(
    memory: tuple[Telemetry, InMemorySpanExporter],
) -> None:
    telemetry, exporter = memory
    telemetry.export(cascade(), api_key_name="ci")
    spans = finished(telemetry, exporter)
    assert set(spans) == {"chat auto", "chat smol", "chat qwen"}
    req, slm, llm = spans["chat auto"], spans["chat smol"], spans["chat qwen"]

    assert req.parent is None
    assert req.context is not None
    for child in (slm, llm):
        assert child.parent is not None
        assert child.context is not None
        assert child.parent.span_id == req.context.span_id
        assert child.context.trace_id == req.context.trace_id
        assert child.kind is SpanKind.CLIENT
    assert req.kind is SpanKind.SERVER
    assert (req.start_time, req.end_time) == (1000 * S, 1001_750_000_000)
    assert (slm.start_time, slm.end_time) == (1000 * S, 1000_500_000_000)
    assert (llm.start_time, llm.end_time) == (1000_500_000_000, 1001_500_000_000)
    assert req.resource.attributes["service.name"] == "slmgate"

    assert dict(req.attributes or {}) == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "slmgate",
        "gen_ai.request.model": "auto",
        "gen_ai.response.model": "qwen",
        "gen_ai.response.id": "r1",
        "gen_ai.conversation.id": "t1",
        "gen_ai.output.type": "json",
        "gen_ai.request.stream": True,
        "gen_ai.usage.input_tokens": 250,
        "gen_ai.usage.output_tokens": 58,
        "gen_ai.usage.cost": 0.0021,
        "gen_ai.response.time_to_first_chunk": 0.75,
        "http.response.status_code": 200,
        "slmgate.route": "auto",
        "slmgate.tier": "llm",
        "slmgate.backend": "remote",
        "slmgate.fallback": True,
        "slmgate.fallback_reason": "low_confidence",
        "slmgate.schema_valid": True,
        "slmgate.stream": True,
        "slmgate.expects_tools": False,
        "slmgate.ttft_s": 0.75,
        "slmgate.counterfactual_cost": 0.004,
        "slmgate.api_key.name": "ci",
    }
    assert req.status.status_code is StatusCode.UNSET

    assert dict(slm.attributes or {}) == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "slmgate",
        "gen_ai.request.model": "smol",
        "gen_ai.conversation.id": "t1",
        "gen_ai.usage.input_tokens": 120,
        "gen_ai.usage.output_tokens": 30,
        "gen_ai.usage.cost": 0.0001,
        "slmgate.tier": "slm",
        "slmgate.backend": "local",
        "slmgate.attempt_no": 0,
        "slmgate.outcome": "escalated",
        "slmgate.fallback_reason": "low_confidence",
        "slmgate.schema_valid": True,
        "slmgate.confidence": 0.25,
        "slmgate.ttft_s": 0.125,
        "slmgate.spec.drafted": 40,
        "slmgate.spec.accepted": 25,
        "slmgate.spec.steps": 10,
        "slmgate.grammar_engine": "xgrammar",
    }
    llm_attrs = dict(llm.attributes or {})
    assert llm_attrs["slmgate.outcome"] == "accepted"
    assert llm_attrs["slmgate.attempt_no"] == 1
    assert llm_attrs["gen_ai.usage.cost"] == 0.002
    assert "slmgate.fallback_reason" not in llm_attrs
    assert telemetry.dropped == 0


def test_error_request_and_attempt_are_marked_and_none_fields_omitted(
    memory: tuple[Telemetry, InMemorySpanExporter],
) -> None:
    telemetry, exporter = memory
    telemetry.export(failed())
    spans = finished(telemetry, exporter)
    req, att = spans["chat chat"], spans["chat qwen"]

    assert req.status.status_code is StatusCode.ERROR
    assert req.status.description == "backend_unavailable"
    attrs = dict(req.attributes or {})
    assert attrs["error.type"] == "backend_unavailable"
    assert attrs["http.response.status_code"] == 502
    assert attrs["gen_ai.output.type"] == "text"
    for absent in ("gen_ai.response.model", "gen_ai.conversation.id", "slmgate.api_key.name",
                   "slmgate.tier", "slmgate.schema_valid", "slmgate.executable",
                   "slmgate.fallback_reason", "slmgate.ttft_s",
                   "gen_ai.response.time_to_first_chunk"):  # fmt: skip
        assert absent not in attrs, absent

    assert att.status.status_code is StatusCode.ERROR
    assert att.status.description == "ConnectError: [Errno 111] Connection refused"
    att_attrs = dict(att.attributes or {})
    assert att_attrs["error.type"] == "ConnectError"
    assert att_attrs["slmgate.outcome"] == "error"
    assert "slmgate.confidence" not in att_attrs


def test_error_status_without_error_type_uses_the_status_code(
    memory: tuple[Telemetry, InMemorySpanExporter],
) -> None:
    telemetry, exporter = memory
    telemetry.export(RequestRecord(request_id="r3", route="x", created_at=1.0, latency_s=0.0,
                                   status=429))  # fmt: skip
    span = finished(telemetry, exporter)["chat x"]
    assert span.status.status_code is StatusCode.ERROR
    assert (span.attributes or {})["error.type"] == "429"


def test_traceparent_joins_the_callers_trace(
    memory: tuple[Telemetry, InMemorySpanExporter],
) -> None:
    telemetry, exporter = memory
    trace_id, span_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    telemetry.export(cascade(), traceparent=f"00-{trace_id}-{span_id}-01")
    req = finished(telemetry, exporter)["chat auto"]
    assert req.context is not None
    assert req.parent is not None
    assert format(req.context.trace_id, "032x") == trace_id
    assert format(req.parent.span_id, "016x") == span_id


@pytest.mark.parametrize(("success", "score", "value", "label"), [
    (True, None, 1.0, "success"),
    (False, None, 0.0, "failure"),
    (True, 0.75, 0.75, "success"),
    (False, math.nan, 0.0, "failure"),
])  # fmt: skip
def test_record_outcome_emits_an_evaluation_result_event(
    memory: tuple[Telemetry, InMemorySpanExporter],
    success: bool,
    score: float | None,
    value: float,
    label: str,
) -> None:
    telemetry, exporter = memory
    telemetry.record_outcome("t1", success, score)
    span = finished(telemetry, exporter)["evaluation task_success"]
    assert (span.attributes or {})["gen_ai.conversation.id"] == "t1"
    assert span.start_time == span.end_time
    [event] = span.events
    assert event.name == "gen_ai.evaluation.result"
    assert dict(event.attributes or {}) == {
        "gen_ai.evaluation.name": "task_success",
        "gen_ai.evaluation.score.value": value,
        "gen_ai.evaluation.score.label": label,
        "gen_ai.conversation.id": "t1",
    }


def test_weird_values_neither_raise_nor_poison_attributes(
    memory: tuple[Telemetry, InMemorySpanExporter],
) -> None:
    telemetry, exporter = memory
    record = cascade()
    record.cost_usd = math.nan
    record.latency_s = math.inf
    record.ttft_s = -math.inf
    record.attempts[0].confidence = math.nan
    record.attempts[0].started_at = math.nan
    record.attempts[1].latency_s = -1.0
    telemetry.export(record)
    spans = finished(telemetry, exporter)
    req, slm, llm = spans["chat auto"], spans["chat smol"], spans["chat qwen"]
    assert "gen_ai.usage.cost" not in (req.attributes or {})
    assert "slmgate.ttft_s" not in (req.attributes or {})
    assert "slmgate.confidence" not in (slm.attributes or {})
    assert req.end_time == req.start_time  # infinite latency: zero-length, not an exception
    assert slm.start_time == req.start_time  # no start of its own: the request's
    assert slm.end_time == 1000_500_000_000
    assert llm.end_time == llm.start_time
    assert telemetry.dropped == 0


def test_a_broken_record_is_counted_not_raised(
    memory: tuple[Telemetry, InMemorySpanExporter],
) -> None:
    telemetry, exporter = memory
    record = cascade()
    record.attempts.append(object())  # type: ignore[arg-type]
    telemetry.export(record)
    assert telemetry.dropped == 1
    assert finished(telemetry, exporter) == {}  # no half-built trace


def test_config_from_env() -> None:
    base = "http://collector:4318"
    assert TelemetryConfig.from_env(None, {}) is None
    assert TelemetryConfig.from_env("", {"OTEL_SERVICE_NAME": "x"}) is None
    cfg = TelemetryConfig.from_env(base + "/", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://other"})
    assert cfg is not None
    assert cfg.endpoint == base + "/v1/traces"
    assert cfg.service_name == "slmgate"
    assert dict(cfg.headers) == {}
    cfg = TelemetryConfig.from_env(base + "/v1/traces", {})
    assert cfg is not None
    assert cfg.endpoint == base + "/v1/traces"
    cfg = TelemetryConfig.from_env(None, {"OTEL_EXPORTER_OTLP_ENDPOINT": base})
    assert cfg is not None
    assert cfg.endpoint == base + "/v1/traces"
    cfg = TelemetryConfig.from_env(None, {
        "OTEL_EXPORTER_OTLP_ENDPOINT": base,
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t:4318/custom",
        "OTEL_SERVICE_NAME": "gw-eu",
        "OTEL_EXPORTER_OTLP_HEADERS": "Authorization=Basic%20abc,x-tenant=7",
    })  # fmt: skip
    assert cfg is not None
    assert cfg.endpoint == "http://t:4318/custom"
    assert cfg.service_name == "gw-eu"
    assert dict(cfg.headers) == {"authorization": "Basic abc", "x-tenant": "7"}


def test_otlp_http_round_trip() -> None:
    with OtlpReceiver() as receiver:
        cfg = TelemetryConfig.from_env(receiver.endpoint, {})
        assert cfg is not None
        cfg = TelemetryConfig(cfg.endpoint, service_name="gw-test",
                              headers={"authorization": "Bearer k"})  # fmt: skip
        telemetry = Telemetry(cfg)
        try:
            telemetry.export(cascade(), api_key_name="ci")
            telemetry.record_outcome("t1", True)
            assert telemetry.force_flush()
        finally:
            telemetry.shutdown()
        spans = {s["name"]: s for s in receiver.wait_for(4)}

    assert set(spans) == {"chat auto", "chat smol", "chat qwen", "evaluation task_success"}
    req, slm, llm = spans["chat auto"], spans["chat smol"], spans["chat qwen"]
    assert req["parent_span_id"] is None
    assert slm["parent_span_id"] == llm["parent_span_id"] == req["span_id"]
    assert slm["trace_id"] == llm["trace_id"] == req["trace_id"]
    assert (req["start_ns"], req["end_ns"]) == (1000 * S, 1001_750_000_000)
    assert req["resource"]["service.name"] == "gw-test"
    assert req["scope"] == "slmgate.gateway"
    assert req["attributes"]["gen_ai.request.model"] == "auto"
    assert req["attributes"]["gen_ai.response.model"] == "qwen"
    assert req["attributes"]["gen_ai.usage.input_tokens"] == 250
    assert req["attributes"]["gen_ai.usage.cost"] == 0.0021
    assert req["attributes"]["slmgate.fallback"] is True
    assert req["attributes"]["slmgate.api_key.name"] == "ci"
    assert slm["attributes"]["slmgate.fallback_reason"] == "low_confidence"
    assert slm["attributes"]["slmgate.spec.accepted"] == 25
    [event] = spans["evaluation task_success"]["events"]
    assert event["name"] == "gen_ai.evaluation.result"
    assert event["attributes"]["gen_ai.evaluation.score.value"] == 1.0
    assert receiver.headers[0]["authorization"] == "Bearer k"
    assert receiver.headers[0]["content-type"] == "application/x-protobuf"


def test_refused_connection_never_raises_and_shutdown_is_bounded() -> None:
    with socket.socket() as s:  # a port nothing listens on (closed again at once)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    telemetry = Telemetry(TelemetryConfig(f"http://127.0.0.1:{port}/v1/traces",
                                          export_timeout_s=0.5))  # fmt: skip
    began = time.monotonic()
    telemetry.export(cascade())
    telemetry.export(failed())
    telemetry.record_outcome("t1", False, 0.0)
    telemetry.force_flush(timeout_ms=2000)
    telemetry.shutdown(timeout_s=2.0)
    assert time.monotonic() - began < 6.0
    assert telemetry.dropped == 0  # built and queued fine; the SDK logs the failed POSTs
    telemetry.export(cascade())  # after shutdown: a no-op, still no exception
