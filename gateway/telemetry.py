"""OpenTelemetry trace export of finished requests, in the GenAI semantic conventions.

Nothing is instrumented inline: after a request ends, :meth:`Telemetry.export` turns its
:class:`~router.records.RequestRecord` into one ``chat {route}`` span with one ``chat {model}``
child per backend attempt, all with explicit start/end times taken from the record. Spans go to a
``BatchSpanProcessor`` whose bounded queue drops (never blocks) when the collector falls behind,
so the request path pays for building a few spans and a deque append, and an unreachable
collector costs log lines, not latency.

Attribute names follow https://github.com/open-telemetry/semantic-conventions-genai
(``gen_ai.*``); gateway-specific facts (tiers, fallbacks, validity) go under ``slmgate.*``.
``gen_ai.usage.cost`` is not in the spec; Langfuse reads it as the call's USD cost.

Each :class:`Telemetry` owns its ``TracerProvider`` (never the global one), so several apps in one
process (tests) stay apart and nothing else in the process starts exporting by accident.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode, set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.re import parse_env_headers

from router.records import AttemptRecord, RequestRecord

log = logging.getLogger(__name__)

TRACES_PATH = "/v1/traces"
PROVIDER = "slmgate"  # gen_ai.provider.name: the backend kind is not in the record
EVALUATION_NAME = "task_success"
Attrs = dict[str, Any]


@dataclass(frozen=True, slots=True)
class TelemetryConfig:
    """Where and how to export. ``endpoint`` is the full OTLP/HTTP traces URL (…/v1/traces);
    None only with an injected exporter (tests)."""

    endpoint: str | None
    service_name: str = "slmgate"
    headers: Mapping[str, str] = field(default_factory=dict)
    export_timeout_s: float = 5.0  # per OTLP request, retries included
    max_queue: int = 2048  # spans buffered before new ones are dropped

    @classmethod
    def from_env(
        cls, endpoint_from_config: str | None, env: Mapping[str, str] | None = None
    ) -> TelemetryConfig | None:
        """The gateway's own setting first (a base URL, as ``OTEL_EXPORTER_OTLP_ENDPOINT``),
        then the standard variables; None (telemetry off) when none is set, so a stray
        collector default never receives traffic it was not promised."""
        env = os.environ if env is None else env
        if endpoint_from_config:
            endpoint = traces_url(endpoint_from_config)
        elif env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
            endpoint = env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]  # signal URL: used as-is
        elif env.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
            endpoint = traces_url(env["OTEL_EXPORTER_OTLP_ENDPOINT"])
        else:
            return None
        raw = env.get("OTEL_EXPORTER_OTLP_TRACES_HEADERS") or env.get("OTEL_EXPORTER_OTLP_HEADERS")
        return cls(
            endpoint=endpoint,
            service_name=env.get("OTEL_SERVICE_NAME") or "slmgate",
            headers=parse_env_headers(raw, liberal=True) if raw else {},
        )


def traces_url(base: str) -> str:
    """``base`` + ``/v1/traces``, as the OTLP exporter treats ``OTEL_EXPORTER_OTLP_ENDPOINT``
    (a URL already ending in the signal path is kept)."""
    base = base.removesuffix("/")
    return base if base.endswith(TRACES_PATH) else base + TRACES_PATH


def _put(attrs: Attrs, key: str, value: object) -> None:
    """Set one attribute: OTel rejects None, and NaN/inf figures would poison backends' sums."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return
    if isinstance(value, bool | int | float | str):
        attrs[key] = value
    else:
        attrs[key] = str(value)


def _times(start_s: float, duration_s: float, default_ns: int | None = None) -> tuple[int, int]:
    """(start, end) in unix ns; a non-finite start gives ``default_ns`` (else now), a
    non-finite or negative duration zero, rather than an exception or a span ending before it
    starts."""
    start = round(start_s * 1e9) if math.isfinite(start_s) else default_ns or time.time_ns()
    if not math.isfinite(duration_s) or duration_s < 0:
        duration_s = 0.0
    return start, start + round(duration_s * 1e9)


def _error_type(message: str | None) -> str:
    """``error.type`` must be low-cardinality: the exception class from ``"Class: text"``."""
    return (message or "").split(":", 1)[0].strip() or "error"


def _answering(record: RequestRecord) -> AttemptRecord | None:
    """The attempt whose output the caller got (the last accepted: specreason books one per
    kept step); None when none was accepted (a failed request)."""
    for attempt in reversed(record.attempts):
        if attempt.outcome == "accepted":
            return attempt
    return None


def request_attributes(record: RequestRecord, api_key_name: str | None = None) -> Attrs:
    """The ``chat {route}`` span's attributes (the request as the caller saw it)."""
    a: Attrs = {}
    answer = _answering(record)
    _put(a, "gen_ai.operation.name", "chat")
    _put(a, "gen_ai.provider.name", PROVIDER)
    _put(a, "gen_ai.request.model", record.route)
    _put(a, "gen_ai.response.model", answer.model if answer else None)
    _put(a, "gen_ai.response.id", record.request_id)
    _put(a, "gen_ai.conversation.id", record.task_id)
    _put(a, "gen_ai.output.type", "json" if record.expects_json else "text")
    _put(a, "gen_ai.request.stream", record.stream)
    _put(a, "gen_ai.usage.input_tokens", record.prompt_tokens)
    _put(a, "gen_ai.usage.output_tokens", record.completion_tokens)
    _put(a, "gen_ai.usage.cost", record.cost_usd)
    if record.stream:
        _put(a, "gen_ai.response.time_to_first_chunk", record.ttft_s)
    _put(a, "http.response.status_code", record.status)
    if record.status != 200:
        _put(a, "error.type", record.error_type or str(record.status))
    _put(a, "slmgate.route", record.route)
    _put(a, "slmgate.tier", record.tier)
    _put(a, "slmgate.backend", record.backend)
    _put(a, "slmgate.fallback", record.fallback)
    _put(a, "slmgate.fallback_reason", record.fallback_reason)
    _put(a, "slmgate.schema_valid", record.schema_valid)
    _put(a, "slmgate.executable", record.executable)
    _put(a, "slmgate.stream", record.stream)
    _put(a, "slmgate.expects_tools", record.expects_tools)
    _put(a, "slmgate.ttft_s", record.ttft_s)
    _put(a, "slmgate.counterfactual_cost", record.counterfactual_cost_usd)
    _put(a, "slmgate.api_key.name", api_key_name)
    return a


def attempt_attributes(attempt: AttemptRecord, task_id: str | None = None) -> Attrs:
    """A ``chat {model}`` child span's attributes (one backend call)."""
    a: Attrs = {}
    _put(a, "gen_ai.operation.name", "chat")
    _put(a, "gen_ai.provider.name", PROVIDER)
    _put(a, "gen_ai.request.model", attempt.model)
    _put(a, "gen_ai.conversation.id", attempt.task_id or task_id)
    _put(a, "gen_ai.usage.input_tokens", attempt.prompt_tokens)
    _put(a, "gen_ai.usage.output_tokens", attempt.completion_tokens)
    _put(a, "gen_ai.usage.cost", attempt.cost_usd)
    if attempt.outcome == "error":
        _put(a, "error.type", _error_type(attempt.error))
    _put(a, "slmgate.tier", attempt.tier)
    _put(a, "slmgate.backend", attempt.backend)
    _put(a, "slmgate.attempt_no", attempt.attempt_no)
    _put(a, "slmgate.outcome", attempt.outcome)
    _put(a, "slmgate.fallback_reason", attempt.fallback_reason)
    _put(a, "slmgate.schema_valid", attempt.schema_valid)
    _put(a, "slmgate.executable", attempt.executable)
    _put(a, "slmgate.confidence", attempt.confidence)
    _put(a, "slmgate.ttft_s", attempt.ttft_s)
    _put(a, "slmgate.compute_s", attempt.compute_s)
    _put(a, "slmgate.spec.drafted", attempt.spec_drafted)
    _put(a, "slmgate.spec.accepted", attempt.spec_accepted)
    _put(a, "slmgate.spec.steps", attempt.spec_steps)
    _put(a, "slmgate.grammar_engine", attempt.grammar_engine)
    _put(a, "slmgate.error", attempt.error)
    return a


class Telemetry:
    """One exporter pipeline. ``export`` and ``record_outcome`` never raise: a failure to build
    spans is counted in ``dropped`` (spans the full queue discards are the SDK's to count)."""

    def __init__(self, config: TelemetryConfig, *, exporter: SpanExporter | None = None) -> None:
        """``exporter`` replaces the OTLP/HTTP one (tests pass an ``InMemorySpanExporter``)."""
        if exporter is None:
            if not config.endpoint:
                raise ValueError("telemetry needs an endpoint or an exporter")
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter(
                endpoint=config.endpoint,
                headers=dict(config.headers) or None,
                timeout=config.export_timeout_s,
            )
        self.config = config
        self.dropped = 0
        # shutdown_on_exit=False: the app's lifespan calls shutdown() with a bound; the SDK's
        # atexit hook could hold the process for 30 s against a dead collector.
        self._provider = TracerProvider(
            resource=Resource.create({SERVICE_NAME: config.service_name}),
            shutdown_on_exit=False,
        )
        self._provider.add_span_processor(
            BatchSpanProcessor(
                exporter,
                max_queue_size=config.max_queue,
                export_timeout_millis=config.export_timeout_s * 1000,
            )
        )
        self._tracer = self._provider.get_tracer("slmgate.gateway")

    def export(
        self,
        record: RequestRecord,
        *,
        api_key_name: str | None = None,
        traceparent: str | None = None,
    ) -> None:
        """Queue the request's spans. ``traceparent`` (the caller's W3C header, if any) makes
        the request span a child of the caller's trace."""
        try:
            self._export(record, api_key_name, traceparent)
        except Exception:
            self.dropped += 1
            log.debug("telemetry: could not export %s", record.request_id, exc_info=True)

    def _export(
        self, record: RequestRecord, api_key_name: str | None, traceparent: str | None
    ) -> None:
        # Everything that can fail on odd data is computed before any span is started, so a
        # bad record never leaves a half-built trace behind.
        attrs = request_attributes(record, api_key_name)
        start, end = _times(record.created_at, record.latency_s)
        children = [
            (
                att,
                attempt_attributes(att, record.task_id),
                _times(att.started_at, att.latency_s, start),
            )
            for att in record.attempts
        ]
        parent_ctx: Context | None = None
        if traceparent:
            parent_ctx = TraceContextTextMapPropagator().extract({"traceparent": traceparent})
        span = self._tracer.start_span(
            f"chat {record.route}", context=parent_ctx, kind=SpanKind.SERVER,
            attributes=attrs, start_time=start,
        )  # fmt: skip
        if record.status != 200:
            span.set_status(Status(StatusCode.ERROR, record.error_type or str(record.status)))
        ctx = set_span_in_context(span)
        for att, child_attrs, (c_start, c_end) in children:
            child = self._tracer.start_span(
                f"chat {att.model}", context=ctx, kind=SpanKind.CLIENT,
                attributes=child_attrs, start_time=c_start,
            )  # fmt: skip
            if att.outcome == "error":
                child.set_status(Status(StatusCode.ERROR, att.error or "error"))
            child.end(end_time=c_end)
        span.end(end_time=end)

    def record_outcome(self, task_id: str, success: bool, score: float | None = None) -> None:
        """A task's reported result as a GenAI ``gen_ai.evaluation.result`` event. The spec
        makes it a log-based event, but the OTel logs SDK is still experimental, so it travels
        as a zero-length ``evaluation task_success`` span carrying that one span event."""
        try:
            value = score if score is not None and math.isfinite(score) else float(success)
            event: Attrs = {
                "gen_ai.evaluation.name": EVALUATION_NAME,
                "gen_ai.evaluation.score.value": float(value),
                "gen_ai.evaluation.score.label": "success" if success else "failure",
                "gen_ai.conversation.id": task_id,
            }
            now = time.time_ns()
            span = self._tracer.start_span(
                f"evaluation {EVALUATION_NAME}", kind=SpanKind.INTERNAL,
                attributes={"gen_ai.conversation.id": task_id}, start_time=now,
            )  # fmt: skip
            span.add_event("gen_ai.evaluation.result", attributes=event, timestamp=now)
            span.end(end_time=now)
        except Exception:
            self.dropped += 1
            log.debug("telemetry: could not record outcome of %s", task_id, exc_info=True)

    def force_flush(self, timeout_ms: int = 5000) -> bool:
        """Export what is queued; False when it did not finish within ``timeout_ms``."""
        return _bounded(lambda: self._provider.force_flush(timeout_ms), timeout_ms / 1000)

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Flush and stop, waiting at most ``timeout_s``: the SDK's own shutdown can wait 30 s
        per call (and retry per batch) against an unreachable collector."""
        _bounded(self._provider.shutdown, timeout_s)


def _bounded(fn: Callable[[], object], timeout_s: float) -> bool:
    """Run ``fn`` in a daemon thread and wait at most ``timeout_s``; True when it returned a
    truthy value (or None) in time. An overrunning call is abandoned, not killed."""
    result: list[object] = []

    def run() -> None:
        try:
            result.append(fn())
        except Exception:
            log.debug("telemetry: flush failed", exc_info=True)
            result.append(False)

    thread = threading.Thread(target=run, name="telemetry-flush", daemon=True)
    thread.start()
    thread.join(max(timeout_s, 0.0))
    return bool(result) and result[0] is not False
