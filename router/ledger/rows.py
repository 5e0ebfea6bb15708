"""Records to rows and back: what one batch writes, and how stored rows read as dicts.

Pure functions (no database), so a batch's rows are checked on literals.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from router.ledger.outcomes import inferred, request_checked
from router.ledger.schema import ATTEMPT_FIELDS, REQUEST_FIELDS
from router.records import AttemptRecord, RequestRecord

_RECORD_FIELDS = {f.name for f in dataclasses.fields(RequestRecord)} - {"attempts"}

Rows = tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]


def task_of(req: RequestRecord) -> str:
    """The task a request belongs to: its ``task_id``, else its own id (a one-request task)."""
    return req.task_id or req.request_id


def request_row(req: RequestRecord, task_id: str) -> dict[str, Any]:
    energies = [a.energy_j for a in req.attempts if a.energy_j is not None]
    measured = [a.energy_measured for a in req.attempts if a.energy_j is not None]
    return {
        "request_id": req.request_id,
        "task_id": task_id,
        "route": req.route,
        "created_at": req.created_at,
        "latency_s": req.latency_s,
        "status": req.status,
        "error_type": req.error_type,
        "tier": req.tier,
        "backend": req.backend,
        "ttft_s": req.ttft_s,
        "prompt_tokens": req.prompt_tokens,
        "completion_tokens": req.completion_tokens,
        "cost_usd": req.cost_usd,
        "counterfactual_cost_usd": req.counterfactual_cost_usd,
        "schema_valid": req.schema_valid,
        "executable": req.executable,
        "fallback": req.fallback,
        "fallback_reason": req.fallback_reason,
        "stream": req.stream,
        "expects_json": req.expects_json,
        "expects_tools": req.expects_tools,
        "energy_j": sum(energies) if energies else None,
        "energy_measured": all(measured) if measured else None,
        "key_id": req.key_id,
    }


def attempt_row(att: AttemptRecord, request_id: str, task_id: str) -> dict[str, Any]:
    return {
        "request_id": request_id,
        "attempt_no": att.attempt_no,
        "task_id": task_id,
        "route": att.route,
        "tier": att.tier,
        "backend": att.backend,
        "model": att.model,
        "started_at": att.started_at,
        "latency_s": att.latency_s,
        "ttft_s": att.ttft_s,
        "prompt_tokens": att.prompt_tokens,
        "completion_tokens": att.completion_tokens,
        "cost_usd": att.cost_usd,
        "compute_s": att.compute_s,
        "grammar_engine": att.grammar_engine,
        "confidence": att.confidence,
        "signals": {str(k): float(v) for k, v in att.signals.items()},
        "schema_valid": att.schema_valid,
        "executable": att.executable,
        "outcome": att.outcome,
        "fallback_reason": att.fallback_reason,
        "error": att.error,
        "spec_drafted": att.spec_drafted,
        "spec_accepted": att.spec_accepted,
        "spec_steps": att.spec_steps,
        "hint_mode": att.hint_mode,
        "hint_drafted": att.hint_drafted,
        "hint_reused": att.hint_reused,
        "energy_j": att.energy_j,
        "energy_measured": att.energy_measured,
    }


def batch_rows(batch: Sequence[RequestRecord]) -> Rows:
    """Request, attempt and per-task delta rows for one batch (tasks pre-aggregated, so one
    upsert statement never touches the same task twice)."""
    requests: list[dict[str, Any]] = []
    attempts: list[dict[str, Any]] = []
    tasks: dict[str, dict[str, Any]] = {}
    for req in batch:
        task_id = task_of(req)
        requests.append(request_row(req, task_id))
        cost = 0.0
        for att in req.attempts:
            attempts.append(attempt_row(att, req.request_id, task_id))
            cost += att.cost_usd
        delta = tasks.get(task_id)
        if delta is None:
            delta = tasks[task_id] = {
                "task_id": task_id,
                "created_at": req.created_at,
                "route": req.route,
                "requests": 0,
                "failed_requests": 0,
                "checked_requests": 0,
                "fallbacks": 0,
                "cost_usd": 0.0,
            }
        elif req.created_at < delta["created_at"]:
            delta["created_at"], delta["route"] = req.created_at, req.route
        delta["requests"] += 1
        delta["failed_requests"] += 0 if req.succeeded else 1
        delta["checked_requests"] += 1 if request_checked(req) else 0
        delta["fallbacks"] += 1 if req.fallback else 0
        delta["cost_usd"] += cost
    for delta in tasks.values():
        delta["success"], delta["outcome_source"] = inferred(
            delta["failed_requests"], delta["checked_requests"]
        )
    # one lock order for every writer, so concurrent replicas' upserts cannot deadlock
    return requests, attempts, [tasks[k] for k in sorted(tasks)]


def request_dict(row: Any) -> dict[str, Any]:
    """A stored request as the API shows it, with its inferred ``succeeded``."""
    out = {name: row[name] for name in REQUEST_FIELDS}
    for key in ("schema_valid", "executable"):
        out[key] = None if out[key] is None else bool(out[key])
    if out["energy_measured"] is not None:
        out["energy_measured"] = bool(out["energy_measured"])
    for key in ("fallback", "stream", "expects_json", "expects_tools"):
        out[key] = bool(out[key])
    out["succeeded"] = (
        out["status"] == 200 and out["schema_valid"] is not False and out["executable"] is not False
    )
    return out


def attempt_dict(row: Any) -> dict[str, Any]:
    out = {name: row[name] for name in ATTEMPT_FIELDS}
    for key in ("schema_valid", "executable"):
        out[key] = None if out[key] is None else bool(out[key])
    out["energy_measured"] = bool(out["energy_measured"])
    out["signals"] = dict(out["signals"] or {})
    return out


def records_from_task(task: dict[str, Any]) -> list[RequestRecord]:
    """Rebuild RequestRecords (with attempts) from ``Ledger.task`` output: a round-trip aid."""
    out: list[RequestRecord] = []
    for req in task["requests"]:
        fields = {k: v for k, v in req.items() if k in _RECORD_FIELDS}
        attempts = [AttemptRecord(**att) for att in req["attempts"]]
        out.append(RequestRecord(**fields, attempts=attempts))
    return out
