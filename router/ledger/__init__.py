"""The request ledger: every request, attempt and task outcome, in SQLite or PostgreSQL.

Writes come from the response path, so ``record`` only enqueues: a background thread batches the
rows into the database, retries a failed batch briefly, then drops and counts it. An outage is
logged and counted (``health()``, ``on_failure``, ``on_drop``), never raised to the caller.
Reads (stats, tasks, calibration rows) and ``set_outcome`` are synchronous and raise
``LedgerUnavailable``.

A task's running totals (requests, failed and checked requests, fallbacks, cost, first request
time) are kept on its ``tasks`` row by an upsert per batch, so task-level stats and CPS read one
small table instead of grouping the requests table on every dashboard refresh.

Modules: ``schema`` (tables, engine), ``rows`` (records to rows and back), ``outcomes`` (the
reported/inferred/unknown rule), ``writer`` (queue and batch thread), ``queries`` (tasks, one
task, calibration), ``summary`` (the stats object), ``store`` (the ``Ledger`` facade).
"""

from __future__ import annotations

from router.ledger.rows import batch_rows, records_from_task
from router.ledger.schema import attempts_table, metadata, requests_table, tasks_table
from router.ledger.store import Ledger, LedgerUnavailable
from router.ledger.writer import QUEUE_FULL, WRITE_FAILED

__all__ = [
    "QUEUE_FULL",
    "WRITE_FAILED",
    "Ledger",
    "LedgerUnavailable",
    "attempts_table",
    "batch_rows",
    "metadata",
    "records_from_task",
    "requests_table",
    "tasks_table",
]
