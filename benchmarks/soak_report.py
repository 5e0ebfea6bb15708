"""The soak's verdict: client-side counts, latencies and the ledger reconciliation in one summary
(pure, unit-tested), and the table printed from it."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from benchmarks.soak_client import ClientResult
from benchmarks.soak_plan import FALLBACK_ROUTES, REMOTE_ROUTES
from router.stats import percentile

ACCEPTABLE_5XX = (503, 504)  # 503 only with Retry-After (shed load); 504 is counted apart


def _ms(values: Sequence[float], q: float) -> float | None:
    found = percentile([v * 1e3 for v in values], q)
    return None if found is None else round(found, 1)


def unhandled_5xx(r: ClientResult) -> bool:
    """A 5xx that is neither a 503 with Retry-After nor a 504 (both tell the client what to do)."""
    status = r.final_status
    if r.cut or status is None or status < 500:
        return False
    if status == 503:
        # Retry-After rides on the HTTP head; an in-stream 503 cannot carry one.
        return r.stream_error_status is not None or r.retry_after is None
    return status != 504


def summarize(
    results: Sequence[ClientResult],
    ledger: dict[str, Any],
    *,
    wall_s: float,
    not_sent: int,
    rss_mb: dict[str, float | None],
    upstream: dict[str, int],
) -> dict[str, Any]:
    """Counts, latencies, the reconciliation and the verdict (``passed``, ``failures``)."""
    answered = [r for r in results if not r.cut and r.transport_error is None]
    ok = [r for r in answered if r.final_status == 200]
    fault = [r for r in results if unhandled_5xx(r) and r.route in FALLBACK_ROUTES]
    lone = [r for r in results if unhandled_5xx(r) and r.route in REMOTE_ROUTES - FALLBACK_ROUTES]
    other = [r for r in results if unhandled_5xx(r) and r.route not in REMOTE_ROUTES]
    shed = [r for r in answered if r.final_status == 503 and not unhandled_5xx(r)]
    latency: dict[str, Any] = {"all": {"p50_ms": _ms([r.latency_s for r in ok], 50),
                                       "p95_ms": _ms([r.latency_s for r in ok], 95)}}  # fmt: skip
    for route in sorted({r.route for r in ok}):
        values = [r.latency_s for r in ok if r.route == route]
        latency[route] = {"p50_ms": _ms(values, 50), "p95_ms": _ms(values, 95), "n": len(values)}
    failures = []
    if ledger["lost"]:
        failures.append(f"{ledger['lost']} ledger rows lost")
    if fault:
        failures.append(f"{len(fault)} 5xx answers on routes that could fall back to another tier")
    if other:
        failures.append(f"{len(other)} unexpected 5xx answers on SLM-only routes")
    warnings = []
    if not upstream.get("http_500") and not upstream.get("closed") and not ledger["error_attempts"]:
        warnings.append("no request met an upstream fault: widen --fault-from/--fault-to")
    return {
        "requests": {
            "sent": len(results),
            "not_sent": not_sent,
            "answered": len(answered),
            "ok_200": len(ok),
            "cut_disconnect": sum(r.cut and r.behaviour == "disconnect" for r in results),
            "cut_timeout": sum(r.cut and r.behaviour == "timeout" for r in results),
            "transport_errors": sum(r.transport_error is not None for r in results),
            "client_status": dict(sorted(Counter(str(r.final_status) for r in answered).items())),
            "stream_errors": sum(r.stream_error_status is not None for r in results),
        },
        "faults": {
            "fault_5xx": len(fault),
            "fault_5xx_examples": [f"{r.task_id} {r.route} {r.final_status}" for r in fault[:5]],
            "single_tier_upstream_5xx": len(lone),
            "single_tier_upstream_statuses": dict(Counter(str(r.final_status) for r in lone)),
            "other_5xx": len(other),
            "shed_503_retry_after": len(shed),
            "http_504": sum(r.final_status == 504 for r in answered),
            "answered_by_other_tier": ledger["failover_answers"],
            "upstream": upstream,
        },
        "ledger": ledger,
        "ledger_499": int(ledger["ledger_status"].get("499", 0)),
        "ledger_504": int(ledger["ledger_status"].get("504", 0)),
        "latency": latency,
        "wall_s": round(wall_s, 2),
        "rss_mb": rss_mb,
        "passed": not failures,
        "failures": failures,
        "warnings": warnings,
    }


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def table(summary: dict[str, Any]) -> str:
    """The summary as a Markdown table (what BENCHMARKS.md quotes)."""
    req, faults, led = summary["requests"], summary["faults"], summary["ledger"]
    lat, rss = summary["latency"]["all"], summary["rss_mb"]
    issues = ", ".join(f"{k} {v}" for k, v in led["issues"].items() if v) or "none"
    rows = [
        ("requests sent / not sent", f"{req['sent']} / {req['not_sent']}"),
        ("answered 200", req["ok_200"]),
        ("client status (answered)", req["client_status"]),
        ("client hung up: disconnect / timeout",
         f"{req['cut_disconnect']} / {req['cut_timeout']}"),
        ("transport errors / in-stream errors",
         f"{req['transport_errors']} / {req['stream_errors']}"),
        ("5xx on routes with a fallback tier (target 0)", faults["fault_5xx"]),
        ("5xx on the upstream-only route (no other tier; reported)",
         faults["single_tier_upstream_5xx"]),
        ("other 5xx", faults["other_5xx"]),
        ("503 + Retry-After / 504", f"{faults['shed_503_retry_after']} / {faults['http_504']}"),
        ("answered by the other tier after an error", faults["answered_by_other_tier"]),
        ("failed attempts by tier (ledger)", led["error_attempts"]),
        ("upstream: served / 500 / closed", f"{faults['upstream'].get('served', 0)} / "
         f"{faults['upstream'].get('http_500', 0)} / {faults['upstream'].get('closed', 0)}"),
        ("ledger rows found / lost (target 0)", f"{led['found']} / {led['lost']}"),
        ("refused at the door, no row", led["refused_unrecorded"]),
        ("ledger status", led["ledger_status"]),
        ("hung-up requests recorded as", led["cut_recorded_as"]),
        ("ledger 499 / 504", f"{summary['ledger_499']} / {summary['ledger_504']}"),
        ("accounting issues", issues),
        ("attempt tokens in / out", f"{led['attempt_tokens']['prompt']} / "
         f"{led['attempt_tokens']['completion']}"),
        ("ledger cost USD", f"{led['cost_usd']:.8f}"),
        ("latency p50 / p95 ms (200s)", f"{_fmt(lat['p50_ms'])} / {_fmt(lat['p95_ms'])}"),
        ("server RSS MB start / peak / end",
         f"{_fmt(rss.get('start'))} / {_fmt(rss.get('peak'))} / {_fmt(rss.get('end'))}"),
        ("wall s", summary["wall_s"]),
        ("verdict", "PASS" if summary["passed"] else "FAIL: " + "; ".join(summary["failures"])),
        *(("warning", w) for w in summary["warnings"]),
    ]  # fmt: skip
    lines = ["| measure | value |", "|---|---|"]
    lines += [f"| {name} | {_fmt(value) if not isinstance(value, dict) else value} |"
              for name, value in rows]  # fmt: skip
    return "\n".join(lines)
