"""How a task's outcome is decided: reported by the caller, else inferred from its requests.

The rule (one place, used by the writer's upsert, the schema upgrade and the row builders):

- A reported outcome (``Ledger.set_outcome``, i.e. ``POST /v1/tasks/{id}/outcome``) wins and
  sticks: later requests of the task change its totals, never its outcome.
- Otherwise the outcome is *inferred*, and only for a task with at least one *checked* request:
  one whose output the gateway could judge (a ``json_object``/``json_schema`` response format or
  tools, or a schema/executable verdict on record). Such a task failed if any of its requests
  failed (non-200 status, invalid JSON, non-executable tool call), else it succeeded.
- A task whose requests were all free text has no inferred outcome (``success`` and
  ``outcome_source`` NULL: *unknown*). A 200 only says the model answered, not that the answer
  was right, so these tasks count in cost but in neither successes nor failures.
"""

from __future__ import annotations

import functools
from typing import Any

import sqlalchemy as sa

from router.ledger.schema import tasks_table, upsert
from router.records import RequestRecord

REPORTED = "reported"
INFERRED = "inferred"


def request_checked(req: RequestRecord) -> bool:
    """Whether the request's output could be checked (so its status says something)."""
    return (
        req.expects_json
        or req.expects_tools
        or req.schema_valid is not None
        or req.executable is not None
    )


def inferred(failed_requests: int, checked_requests: int) -> tuple[bool | None, str | None]:
    """(success, outcome_source) inferred from a task's totals; (None, None) when unknown."""
    if checked_requests <= 0:
        return None, None
    return failed_requests == 0, INFERRED


def checked_condition(requests: sa.Table) -> Any:
    """SQL twin of ``request_checked`` over the requests table."""
    r = requests.c
    return sa.or_(
        r.expects_json.is_(True),
        r.expects_tools.is_(True),
        r.schema_valid.is_not(None),
        r.executable.is_not(None),
    )


def inferred_outcome(failed: Any, checked: Any) -> tuple[Any, Any]:
    """SQL twin of ``inferred``: (success, outcome_source) expressions."""
    success = sa.case((checked > 0, failed == 0), else_=sa.null())
    source = sa.case((checked > 0, sa.literal(INFERRED)), else_=sa.null())
    return success, source


@functools.cache  # built once per dialect, not per batch
def task_upsert(dialect: str) -> Any:
    """Add a batch's per-task deltas to the running totals and re-infer the outcome, unless
    one was reported."""
    t = tasks_table.c
    stmt = upsert(dialect, tasks_table)
    new = stmt.excluded
    earlier = sa.or_(t.created_at.is_(None), new.created_at < t.created_at)
    reported = t.outcome_source == REPORTED
    failed = t.failed_requests + new.failed_requests
    checked = t.checked_requests + new.checked_requests
    success, source = inferred_outcome(failed, checked)
    return stmt.on_conflict_do_update(
        index_elements=["task_id"],
        set_={
            "created_at": sa.case((earlier, new.created_at), else_=t.created_at),
            "route": sa.case((earlier, new.route), else_=t.route),
            "requests": t.requests + new.requests,
            "failed_requests": failed,
            "checked_requests": checked,
            "fallbacks": t.fallbacks + new.fallbacks,
            "cost_usd": t.cost_usd + new.cost_usd,
            "success": sa.case((reported, t.success), else_=success),
            "outcome_source": sa.case((reported, t.outcome_source), else_=source),
        },
    )


def _reported(success: bool, score: float | None, now: float) -> dict[str, Any]:
    return {
        "success": bool(success),
        "outcome_source": REPORTED,
        "outcome_at": now,
        "score": None if score is None else float(score),
    }


def outcome_update(task_id: str, success: bool, score: float | None, now: float) -> Any:
    """Set the reported outcome of a task that has a written request (rowcount 0: none)."""
    t = tasks_table.c
    return (
        sa.update(tasks_table)
        .where(t.task_id == task_id, t.created_at.is_not(None))
        .values(**_reported(success, score, now))
    )


def outcome_upsert(
    dialect: str, task_id: str, success: bool, score: float | None, now: float
) -> Any:
    """Store the reported outcome ahead of the task's first batch (its requests are still
    queued); the batch's upsert then adds the totals and keeps the outcome."""
    values = _reported(success, score, now)
    stmt = upsert(dialect, tasks_table).values(
        task_id=task_id, requests=0, failed_requests=0, checked_requests=0, fallbacks=0,
        cost_usd=0.0, **values)  # fmt: skip
    return stmt.on_conflict_do_update(
        index_elements=["task_id"], set_={k: stmt.excluded[k] for k in values}
    )
