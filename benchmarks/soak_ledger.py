"""The soak's books: read the ledger by table reflection and reconcile it with what clients saw.

Reflection instead of the ledger's own table objects, because the ledger module is being split
into a package: the tables (``requests``, ``attempts``) stay, and the few column names read here
are looked up through aliases. ``reconcile`` is pure (row dicts in, counts out) and unit-tested.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import sqlalchemy as sa

from benchmarks.soak_client import ClientResult

REQUEST_COLUMNS: dict[str, tuple[str, ...]] = {
    "request_id": ("request_id", "id"),
    "task_id": ("task_id",),
    "route": ("route",),
    "status": ("status", "status_code", "http_status"),
    "prompt_tokens": ("prompt_tokens",),
    "completion_tokens": ("completion_tokens",),
    "cost_usd": ("cost_usd", "cost"),
    "stream": ("stream",),
}
ATTEMPT_COLUMNS: dict[str, tuple[str, ...]] = {
    "request_id": ("request_id",),
    "attempt_no": ("attempt_no", "attempt", "position"),
    "tier": ("tier",),
    "outcome": ("outcome",),
    "prompt_tokens": ("prompt_tokens",),
    "completion_tokens": ("completion_tokens",),
    "cost_usd": ("cost_usd", "cost"),
    "error": ("error",),
}
CUT_STATUSES = (499, 504)  # cancelled by the client, timed out by the gateway
ISSUES = (
    "cost_mismatch", "completed_without_tokens", "completed_without_accepted_attempt",
    "tokens_exceed_attempts", "cut_without_attempts", "cut_outcome_not_cancelled",
    "tokens_lost", "status_mismatch",
)  # fmt: skip
EXAMPLES = 5


def normalise(row: Mapping[str, Any], columns: Mapping[str, tuple[str, ...]]) -> dict[str, Any]:
    """``row`` under the canonical names of ``columns`` (first alias present; else None)."""
    out: dict[str, Any] = {}
    for name, aliases in columns.items():
        out[name] = next((row[a] for a in aliases if a in row), None)
    return out


def _column(table: sa.Table, columns: Mapping[str, tuple[str, ...]], name: str) -> Any:
    for alias in columns[name]:
        if alias in table.c:
            return table.c[alias]
    raise LookupError(f"ledger table {table.name!r} has none of {columns[name]}")


def read_ledger(url: str, task_prefix: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(request rows, attempt rows) of the tasks whose id starts with ``task_prefix``."""
    engine = sa.create_engine(url)
    try:
        meta = sa.MetaData()
        meta.reflect(engine, only=["requests", "attempts"])
        req_t, att_t = meta.tables["requests"], meta.tables["attempts"]
        task_col = _column(req_t, REQUEST_COLUMNS, "task_id")
        with engine.connect() as conn:
            rows = conn.execute(sa.select(req_t).where(task_col.like(task_prefix + "%")))
            requests = [normalise(dict(r), REQUEST_COLUMNS) for r in rows.mappings()]
            ids = [r["request_id"] for r in requests]
            rid_col = _column(att_t, ATTEMPT_COLUMNS, "request_id")
            attempts: list[dict[str, Any]] = []
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                found = conn.execute(sa.select(att_t).where(rid_col.in_(chunk))).mappings()
                attempts.extend(normalise(dict(a), ATTEMPT_COLUMNS) for a in found)
    finally:
        engine.dispose()
    return requests, attempts


def client_label(r: ClientResult) -> str:
    """How a client's request ended, as the client saw it."""
    if r.cut:
        return f"cut:{r.behaviour}"
    if r.transport_error is not None:
        return "transport_error"
    return str(r.final_status)


def refused_before_admission(r: ClientResult) -> bool:
    """429, or 503 with Retry-After: refused at the door (no router work, no ledger row)."""
    status = r.final_status
    return not r.cut and (status == 429 or (status == 503 and r.retry_after is not None))


def _row_issues(
    req: Mapping[str, Any], attempts: Sequence[Mapping[str, Any]], client: ClientResult | None,
    tol: float,
) -> list[str]:  # fmt: skip
    """What is inconsistent about one request row, its attempts and its client's view."""
    issues = []
    status = req["status"]
    cost = float(req["cost_usd"] or 0.0)
    att_cost = sum(float(a["cost_usd"] or 0.0) for a in attempts)
    att_completion = sum(int(a["completion_tokens"] or 0) for a in attempts)
    completion = int(req["completion_tokens"] or 0)
    if abs(att_cost - cost) > tol + 1e-6 * abs(cost):
        issues.append("cost_mismatch")
    if status == 200 and completion <= 0:
        issues.append("completed_without_tokens")
    if status == 200 and not any(a["outcome"] == "accepted" for a in attempts):
        issues.append("completed_without_accepted_attempt")
    if attempts and completion > att_completion:
        issues.append("tokens_exceed_attempts")
    if status in CUT_STATUSES and not attempts:
        issues.append("cut_without_attempts")
    if status in CUT_STATUSES and attempts and attempts[-1]["outcome"] != "cancelled":
        issues.append("cut_outcome_not_cancelled")
    if client is not None:
        seen = client.completion_tokens or (1 if client.saw_content else 0)
        if seen > att_completion:
            issues.append("tokens_lost")
        answered = not client.cut and client.transport_error is None
        if answered and client.final_status is not None and client.final_status != status:
            issues.append("status_mismatch")
    return issues


def reconcile(
    results: Sequence[ClientResult],
    requests: Iterable[Mapping[str, Any]],
    attempts: Iterable[Mapping[str, Any]],
    tol: float = 1e-12,
) -> dict[str, Any]:
    """Every sent task id against the ledger: lost rows, per-row accounting issues, totals.

    A row is lost when a sent task id has none, unless its client was refused at the door
    (429, or 503 with Retry-After: counted apart as ``refused_unrecorded``)."""
    by_task: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for req in requests:
        by_task[str(req["task_id"])].append(req)
    by_request: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for att in attempts:
        by_request[str(att["request_id"])].append(att)
    for rows in by_request.values():
        rows.sort(key=lambda a: int(a["attempt_no"] or 0))
    lost: list[ClientResult] = []
    refused = 0
    issues: Counter[str] = Counter({k: 0 for k in ISSUES})
    examples: dict[str, list[str]] = defaultdict(list)
    statuses: Counter[str] = Counter()
    cut_recorded: Counter[str] = Counter()
    errors_by_tier: Counter[str] = Counter()
    failover = prompt = completion = 0
    cost = 0.0
    for r in results:
        rows = by_task.get(r.task_id, [])
        if not rows:
            if refused_before_admission(r):
                refused += 1
            else:
                lost.append(r)
            continue
        for req in rows:
            atts = by_request.get(str(req["request_id"]), [])
            statuses[str(req["status"])] += 1
            if r.cut:
                cut_recorded[str(req["status"])] += 1
            prompt += sum(int(a["prompt_tokens"] or 0) for a in atts)
            completion += sum(int(a["completion_tokens"] or 0) for a in atts)
            cost += float(req["cost_usd"] or 0.0)
            outcomes = [a["outcome"] for a in atts]
            errors_by_tier.update(str(a["tier"]) for a in atts if a["outcome"] == "error")
            if req["status"] == 200 and "error" in outcomes and "accepted" in outcomes:
                failover += 1
            for issue in _row_issues(req, atts, r if len(rows) == 1 else None, tol):
                issues[issue] += 1
                if len(examples[issue]) < EXAMPLES:
                    examples[issue].append(r.task_id)
    return {
        "sent": len(results),
        "found": sum(1 for r in results if r.task_id in by_task),
        "lost": len(lost),
        "lost_examples": [r.task_id for r in lost[:EXAMPLES]],
        "lost_by_client": dict(Counter(client_label(r) for r in lost)),
        "refused_unrecorded": refused,
        "duplicates": sum(1 for r in results if len(by_task.get(r.task_id, [])) > 1),
        "ledger_status": dict(sorted(statuses.items())),
        "cut_recorded_as": dict(sorted(cut_recorded.items())),
        "failover_answers": failover,
        "error_attempts": dict(sorted(errors_by_tier.items())),
        "issues": dict(issues),
        "issue_examples": dict(examples),
        "attempt_tokens": {"prompt": prompt, "completion": completion},
        "cost_usd": cost,
    }
