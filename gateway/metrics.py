"""Prometheus metrics for ``GET /metrics``, fed one finished request at a time.

Each :class:`GatewayMetrics` owns its registry (not prometheus_client's global one), so several
apps in one process (tests) keep separate counts. Labels are bounded by configuration (routes,
tiers, backends) and by small fixed vocabularies (outcomes, fallback reasons, error kinds).
"""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from router.ledger.writer import QUEUE_FULL, WRITE_FAILED
from router.records import RequestRecord

#: The classic text format every Prometheus version parses (all names here are legacy-valid);
#: prometheus_client ≥ 0.22 advertises 1.0.0, which Prometheus 2.x does not recognise.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
BREAKER_STATES = ("closed", "open", "half_open")
SERVER_STATES = ("starting", "ready", "unhealthy", "restarting", "stopped")  # vllm_launch
#: Why the ledger dropped records: refused on arrival, or given up by its writer.
LEDGER_DROP_REASONS = (QUEUE_FULL, WRITE_FAILED)
NO_TIER = "none"  # label for requests no tier answered (errors before or during every attempt)
#: Latency buckets in seconds: sub-100 ms cache-like answers up to multi-minute CPU generations.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
                   300.0)  # fmt: skip


def _amount(value: float | int | None) -> float:
    """A counter increment: counters only go up, and a bad figure must not fail a request."""
    return float(value) if value is not None and value > 0 else 0.0


def _flag(value: bool | None) -> str | None:
    return None if value is None else ("valid" if value else "invalid")


class GatewayMetrics:
    """The gateway's counters, gauges and histograms in a private registry."""

    def __init__(self, namespace: str = "slmgate") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        r, ns = self.registry, namespace
        self.requests = Counter("requests", "Requests answered, by route, answering tier and "
                                "HTTP status.", ["route", "tier", "status"], namespace=ns,
                                registry=r)  # fmt: skip
        self.attempts = Counter("attempts", "Backend attempts, by route, tier and outcome "
                                "(accepted, escalated, aborted, error).",
                                ["route", "tier", "outcome"], namespace=ns, registry=r)  # fmt: skip
        self.fallbacks = Counter("fallbacks", "Requests that fell back to a later tier, by "
                                 "route and reason.", ["route", "reason"], namespace=ns,
                                 registry=r)  # fmt: skip
        self.tokens = Counter("tokens", "Tokens processed by attempts, by tier and direction "
                              "(in: prompt, out: completion).", ["route", "tier", "direction"],
                              namespace=ns, registry=r)  # fmt: skip
        self.cost = Counter("cost_usd", "Cost of all attempts in USD, by route and tier.",
                            ["route", "tier"], namespace=ns, registry=r)  # fmt: skip
        self.counterfactual = Counter(
            "counterfactual_cost_usd", "What the same requests would have cost on the route's "
            "top tier alone, in USD, by route and answering tier.", ["route", "tier"],
            namespace=ns, registry=r)  # fmt: skip
        self.latency = Histogram("request_latency_seconds", "End-to-end request latency.",
                                 ["route"], buckets=LATENCY_BUCKETS, namespace=ns,
                                 registry=r)  # fmt: skip
        self.ttft = Histogram("ttft_seconds", "Time to first token of the answer.", ["route"],
                              buckets=LATENCY_BUCKETS, namespace=ns, registry=r)  # fmt: skip
        self.schema = Counter("schema_validity", "Requests expecting JSON, by whether the "
                              "answer validated (valid, invalid).", ["route", "result"],
                              namespace=ns, registry=r)  # fmt: skip
        self.executable = Counter("executable_calls", "Requests expecting tool calls, by "
                                  "whether the call was executable (valid, invalid).",
                                  ["route", "result"], namespace=ns, registry=r)  # fmt: skip
        self.spec_drafted = Counter("spec_drafted_tokens", "Speculative tokens drafted.",
                                    ["route", "tier"], namespace=ns, registry=r)  # fmt: skip
        self.spec_accepted = Counter("spec_accepted_tokens", "Speculative tokens accepted.",
                                     ["route", "tier"], namespace=ns, registry=r)  # fmt: skip
        self.energy = Counter("energy_joules", "Energy of attempts in joules, by whether it was "
                              "measured (NVML, RAPL) or estimated.", ["route", "tier", "source"],
                              namespace=ns, registry=r)  # fmt: skip
        self.queue_depth = Gauge("queue_depth", "Requests waiting or running per backend.",
                                 ["backend"], namespace=ns, registry=r)  # fmt: skip
        self.backend_errors = Counter("backend_errors", "Backend failures, by kind.",
                                      ["backend", "kind"], namespace=ns, registry=r)  # fmt: skip
        self.breaker = Gauge("breaker_state", "Circuit breaker state per backend: 1 for the "
                             "current state, 0 for the others.", ["backend", "state"],
                             namespace=ns, registry=r)  # fmt: skip
        self.server_state = Gauge("server_state", "State of each server the gateway launched "
                                  "(kind vllm with launch): 1 for the current state, 0 for the "
                                  "others.", ["backend", "state"], namespace=ns,
                                  registry=r)  # fmt: skip
        self.server_restarts = Gauge("server_restarts", "Times the gateway restarted each "
                                     "server it launched.", ["backend"], namespace=ns,
                                     registry=r)  # fmt: skip
        self.ledger_failures = Counter("ledger_write_failures", "Failed ledger writes (the "
                                       "ledger's on_failure calls).", namespace=ns,
                                       registry=r)  # fmt: skip
        self.ledger_dropped = Counter("ledger_records_dropped", "Request records the ledger "
                                      "gave up on (the ledger's on_drop calls), by reason: "
                                      "queue_full (refused on arrival) or write_failed (retries "
                                      "spent, duplicate id, unwritten at close).", ["reason"],
                                      namespace=ns, registry=r)  # fmt: skip
        for reason in LEDGER_DROP_REASONS:  # exported at 0, so alerts see the series at once
            self.ledger_dropped.labels(reason)
        self.shared_fallbacks = Counter("shared_state_fallbacks", "Shared-state operations "
                                        "(rate limits, budgets, breakers) served from this "
                                        "replica's own state because Redis failed or was down, "
                                        "by operation.", ["op"], namespace=ns,
                                        registry=r)  # fmt: skip
        self.shared_up = Gauge("shared_state_up", "1 while the last Redis operation worked, 0 "
                               "while this replica uses its own state; absent without "
                               "redis_url.", namespace=ns, registry=r)  # fmt: skip
        self.quota_refusals = Counter("quota_refusals", "Requests refused by an API key's "
                                      "limits, by reason.", ["reason"], namespace=ns,
                                      registry=r)  # fmt: skip

    def observe_request(self, rec: RequestRecord) -> None:
        """Count one finished request and its attempts."""
        route, tier = rec.route, rec.tier or NO_TIER
        self._child(self.requests, route, tier, str(rec.status)).inc()
        self._child(self.latency, route).observe(rec.latency_s)
        if rec.ttft_s is not None:
            self._child(self.ttft, route).observe(rec.ttft_s)
        if rec.fallback:
            self._child(self.fallbacks, route, rec.fallback_reason or "unknown").inc()
        if (schema := _flag(rec.schema_valid)) is not None:
            self._child(self.schema, route, schema).inc()
        if (call := _flag(rec.executable)) is not None:
            self._child(self.executable, route, call).inc()
        self._child(self.counterfactual, route, tier).inc(_amount(rec.counterfactual_cost_usd))
        if not rec.attempts:  # a request refused before any backend ran: its own totals
            self._spend(route, tier, rec.prompt_tokens, rec.completion_tokens, rec.cost_usd)
            return
        for att in rec.attempts:
            self._child(self.attempts, route, att.tier, att.outcome).inc()
            self._spend(route, att.tier, att.prompt_tokens, att.completion_tokens, att.cost_usd)
            if att.spec_drafted is not None:
                self._child(self.spec_drafted, route, att.tier).inc(_amount(att.spec_drafted))
            if att.spec_accepted is not None:
                self._child(self.spec_accepted, route, att.tier).inc(_amount(att.spec_accepted))
            if att.energy_j is not None:
                source = "measured" if att.energy_measured else "estimated"
                self._child(self.energy, route, att.tier, source).inc(_amount(att.energy_j))

    def _child(self, metric: Any, *values: str) -> Any:
        """``metric.labels(*values)``, memoised: ~10 lookups per request, each with a lock and
        label checks in prometheus_client (label values here come from config and outcomes)."""
        key = (id(metric), values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    def _spend(self, route: str, tier: str, prompt: int, completion: int, cost: float) -> None:
        self._child(self.tokens, route, tier, "in").inc(_amount(prompt))
        self._child(self.tokens, route, tier, "out").inc(_amount(completion))
        self._child(self.cost, route, tier).inc(_amount(cost))

    def set_queue_depth(self, backend: str, n: int) -> None:
        self.queue_depth.labels(backend).set(n)

    def backend_error(self, backend: str, kind: str) -> None:
        self.backend_errors.labels(backend, kind).inc()

    def set_breaker_state(self, backend: str, state: str) -> None:
        """Mark ``state`` (closed, open, half_open) as the backend's current one."""
        if state not in BREAKER_STATES:
            raise ValueError(f"unknown breaker state {state!r}; expected one of {BREAKER_STATES}")
        for name in BREAKER_STATES:
            self.breaker.labels(backend, name).set(1 if name == state else 0)

    def set_server_status(self, backend: str, state: str, restarts: int) -> None:
        for name in SERVER_STATES:
            self.server_state.labels(backend, name).set(1 if name == state else 0)
        self.server_restarts.labels(backend).set(restarts)

    def ledger_write_failure(self, exc: BaseException | None = None) -> None:
        """Count one failed ledger write; fits ``Ledger(on_failure=...)`` as is."""
        self.ledger_failures.inc()

    def ledger_records_dropped(self, n: int, reason: str) -> None:
        """Count ``n`` records the ledger dropped; fits ``Ledger(on_drop=...)`` as is."""
        if reason not in LEDGER_DROP_REASONS:
            reason = WRITE_FAILED  # a bounded label set whatever a caller passes
        self.ledger_dropped.labels(reason).inc(_amount(n))

    def shared_state_fallback(self, op: str) -> None:
        self.shared_fallbacks.labels(op).inc()

    def render(self) -> tuple[bytes, str]:
        """The exposition body and its content type, for ``GET /metrics``."""
        return generate_latest(self.registry), CONTENT_TYPE
