"""Read queries behind ``/v1/tasks``, ``/v1/tasks/{id}`` and calibration, plus the window and
route filters every read shares. Each takes an open connection; the ledger maps database errors.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from router.ledger.outcomes import REPORTED
from router.ledger.rows import attempt_dict, request_dict
from router.ledger.schema import attempts_table, requests_table, tasks_table

# (signals, confidence, task success, kind of request: text | json | tools)
CalibrationRow = tuple[dict[str, float], float | None, bool, str]


def request_filter(start: float | None, end: float, route: str | None) -> list[Any]:
    """Requests created in ``[start, end]`` (any time when ``start`` is None) on ``route``."""
    r = requests_table.c
    conds: list[Any] = []
    if start is not None:
        conds += [r.created_at >= start, r.created_at <= end]
    if route is not None:
        conds.append(r.route == route)
    return conds


def task_filter(start: float | None, end: float, route: str | None) -> list[Any]:
    """Tasks whose first request is in the window, with any request on ``route``; a task known
    only by an outcome (no request written) is in no window."""
    t = tasks_table.c
    conds: list[Any] = [t.created_at.is_not(None)]
    if start is not None:
        conds += [t.created_at >= start, t.created_at <= end]
    if route is not None:
        routed = sa.select(requests_table.c.task_id).where(requests_table.c.route == route)
        conds.append(t.task_id.in_(routed))
    return conds


def tasks(
    conn: Connection, limit: int, start: float | None, end: float, route: str | None
) -> list[dict[str, Any]]:
    """Recent tasks, newest first, with their totals and the tiers they used.

    ``success``/``outcome_source``: reported, inferred, or both None when unknown (see
    ``router.ledger.outcomes``).
    """
    t = tasks_table.c
    a = attempts_table.c
    rows = (
        conn.execute(
            sa.select(tasks_table)
            .where(*task_filter(start, end, route))
            .order_by(t.created_at.desc(), t.task_id.desc())
            .limit(max(0, int(limit)))
        )
        .mappings()
        .all()
    )
    tiers: dict[str, list[str]] = {row["task_id"]: [] for row in rows}
    if tiers:
        for task_id, tier in conn.execute(
            sa.select(a.task_id, a.tier)
            .where(a.task_id.in_(list(tiers)))
            .order_by(a.started_at, a.request_id, a.attempt_no)
        ):
            if tier not in tiers[task_id]:
                tiers[task_id].append(tier)
    return [
        {
            "task_id": row["task_id"],
            "created_at": row["created_at"],
            "requests": int(row["requests"]),
            "cost_usd": float(row["cost_usd"]),
            "success": None if row["success"] is None else bool(row["success"]),
            "outcome_source": row["outcome_source"],
            "tiers": tiers[row["task_id"]],
            "fallbacks": int(row["fallbacks"]),
            "route": row["route"],
        }
        for row in rows
    ]


def task(conn: Connection, task_id: str) -> dict[str, Any] | None:
    """One task with its requests (oldest first), each with its attempts; None when no request
    of it was written (an unknown id)."""
    r = requests_table.c
    a = attempts_table.c
    head = (
        conn.execute(sa.select(tasks_table).where(tasks_table.c.task_id == task_id))
        .mappings()
        .first()
    )
    reqs = (
        conn.execute(
            sa.select(requests_table)
            .where(r.task_id == task_id)
            .order_by(r.created_at, r.request_id)
        )
        .mappings()
        .all()
    )
    if not reqs and (head is None or head["created_at"] is None):
        return None
    attempts: dict[str, list[dict[str, Any]]] = {row["request_id"]: [] for row in reqs}
    for att in conn.execute(
        sa.select(attempts_table).where(a.task_id == task_id).order_by(a.request_id, a.attempt_no)
    ).mappings():
        attempts.setdefault(att["request_id"], []).append(attempt_dict(att))
    return {
        "task_id": task_id,
        "created_at": None if head is None else head["created_at"],
        "success": None if head is None or head["success"] is None else bool(head["success"]),
        "outcome_source": None if head is None else head["outcome_source"],
        "score": None if head is None else head["score"],
        "requests": [
            {**request_dict(row), "attempts": attempts[row["request_id"]]} for row in reqs
        ],
    }


def calibration_rows(
    conn: Connection, route: str | None, tier: str, start: float | None, end: float
) -> list[CalibrationRow]:
    """(signals, confidence, task success, kind) for accepted attempts on ``tier`` whose task has a
    reported outcome: the labelled data cascade thresholds are calibrated on."""
    a = attempts_table.c
    t = tasks_table.c
    r = requests_table.c
    query = (
        sa.select(a.signals, a.confidence, t.success, r.expects_tools, r.expects_json)
        .select_from(
            attempts_table.join(tasks_table, a.task_id == t.task_id).join(
                requests_table, a.request_id == r.request_id
            )
        )
        .where(
            a.tier == tier,
            a.outcome == "accepted",
            t.outcome_source == REPORTED,
            t.success.is_not(None),
            *request_filter(start, end, route),
        )
        .order_by(r.created_at, a.request_id, a.attempt_no)
    )
    return [
        (
            {str(k): float(v) for k, v in (signals or {}).items()},
            None if confidence is None else float(confidence),
            bool(success),
            "tools" if tools else "json" if json_ else "text",
        )
        for signals, confidence, success, tools, json_ in conn.execute(query)
    ]
