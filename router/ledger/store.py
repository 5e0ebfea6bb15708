"""``Ledger``: the request ledger's one entry point, over SQLite or PostgreSQL.

Writes go through the background ``Writer`` (never raising on the response path); reads and
``set_outcome`` are synchronous and raise ``LedgerUnavailable`` when the database cannot be used.
``health()`` reads memory only, so it answers during an outage.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from router.ledger import queries, summary
from router.ledger.key_store import SqlKeyStore
from router.ledger.memory_store import SqlMemoryStore
from router.ledger.outcomes import outcome_update, outcome_upsert, task_upsert
from router.ledger.rows import batch_rows
from router.ledger.schema import attempts_table, create_schema, make_engine, requests_table
from router.ledger.writer import OnDrop, OnFailure, Writer
from router.records import RequestRecord

T = TypeVar("T")


class LedgerUnavailable(Exception):
    """The ledger database cannot be reached or used right now (the gateway answers 503)."""


class Ledger:
    """Request/attempt/task store with a non-blocking, batching writer thread.

    ``on_failure(exc)`` is called for every failed database operation of the writer,
    ``on_drop(n, reason)`` for every ``n`` records given up (``reason``: ``queue_full`` or
    ``write_failed``); both feed metrics and must not block.
    """

    def __init__(
        self,
        url: str,
        *,
        queue_size: int = 10000,
        on_failure: OnFailure | None = None,
        on_drop: OnDrop | None = None,
        batch_size: int = 500,
        retries: int = 2,
        backoff_s: float = 0.05,
    ) -> None:
        self.url = url
        self._engine = make_engine(url)
        self._dialect = self._engine.dialect.name
        self._schema_ready = False
        self._writer = Writer(
            self._write, queue_size=queue_size, batch_size=batch_size, retries=retries,
            backoff_s=backoff_s, on_failure=on_failure, on_drop=on_drop)  # fmt: skip
        self._closed = False

    # ---- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Create the tables (if the database is up) and start the writer thread.

        A database that is down now is logged, not raised: the writer creates the tables once
        it can reach it.
        """
        try:
            self._ensure_schema()
        except SQLAlchemyError as exc:
            self._writer.note_failure(exc, "creating the ledger tables")
        self._writer.start()

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued (up to ``timeout`` seconds), stop the writer, release the pool.

        Records still unwritten after the timeout are counted as dropped.
        """
        if self._closed:
            return
        self._closed = True
        self._writer.close(timeout)
        self._engine.dispose()

    def __enter__(self) -> Ledger:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- writes ------------------------------------------------------------------------------

    def record(self, req: RequestRecord) -> None:
        """Queue a request (with its attempts) for writing. Never blocks, never raises."""
        self._writer.record(req)

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every queued record is written or dropped; False on timeout."""
        return self._writer.flush(timeout)

    def set_outcome(self, task_id: str, success: bool, score: float | None = None) -> bool:
        """Record a task's reported outcome; False (nothing stored) for a task the ledger does
        not know.

        A task is known once one of its requests was recorded: written, or still queued for
        the writer — then the outcome is stored ahead of it and kept when the request lands,
        so an outcome posted right after its request is never refused.
        """
        if not task_id:
            raise ValueError("task_id must not be empty")
        now = time.time()
        try:
            self._ensure_schema()
            with self._engine.begin() as conn:
                if self._writer.is_pending(task_id):
                    conn.execute(outcome_upsert(self._dialect, task_id, success, score, now))
                    return True
                return conn.execute(outcome_update(task_id, success, score, now)).rowcount > 0
        except SQLAlchemyError as exc:
            raise LedgerUnavailable(f"ledger database unavailable: {exc}") from exc

    def health(self) -> dict[str, Any]:
        """Writer counters for /metrics and /v1/stats, from memory (never the database).

        ``dropped`` = ``dropped_queue_full`` (refused by ``record``: queue full, or the ledger
        closed) + ``dropped_write_failed`` (given up after retries, duplicates, or unwritten at
        close). ``write_failures`` counts failed database operations (each retry counts).
        """
        return self._writer.health()

    def _write(self, records: list[RequestRecord]) -> None:
        """One batch in one transaction (the writer's sink); a failure other than a duplicate
        id may mean the tables are gone, so the next try recreates them."""
        request_rows, attempt_rows, task_rows = batch_rows(records)
        try:
            with self._engine.begin() as conn:
                if not self._schema_ready:
                    create_schema(conn)
                conn.execute(sa.insert(requests_table), request_rows)
                if attempt_rows:
                    conn.execute(sa.insert(attempts_table), attempt_rows)
                conn.execute(task_upsert(self._dialect), task_rows)
        except IntegrityError:
            raise
        except SQLAlchemyError:
            self._schema_ready = False
            raise
        self._schema_ready = True

    def _ensure_schema(self) -> None:
        if not self._schema_ready:
            with self._engine.begin() as conn:
                create_schema(conn)
            self._schema_ready = True

    def memory_store(self) -> SqlMemoryStore:
        """Escalation memory kept in this ledger's database."""
        return SqlMemoryStore(self._engine, self._ensure_schema)

    def key_store(self) -> SqlKeyStore:
        """API key records kept in this ledger's database."""
        return SqlKeyStore(self._engine, self._ensure_schema)

    # ---- reads -------------------------------------------------------------------------------

    def key_spend(self, key_id: str, since: float) -> float:
        """USD spent by ``key_id``'s requests since ``since`` (written rows; what budgets start
        from after a restart)."""
        r = requests_table.c
        query = sa.select(sa.func.coalesce(sa.func.sum(r.cost_usd), 0.0)).where(
            r.key_id == key_id, r.created_at >= since
        )
        return float(self._read(lambda conn: conn.execute(query).scalar_one()))

    def _read(self, fn: Callable[[Connection], T]) -> T:
        try:
            self._ensure_schema()
            with self._engine.connect() as conn:
                return fn(conn)
        except SQLAlchemyError as exc:
            raise LedgerUnavailable(f"ledger database unavailable: {exc}") from exc

    def stats(
        self,
        window_s: float | None = None,
        route: str | None = None,
        buckets: int = 12,
        now: float | None = None,
    ) -> dict[str, Any]:
        """The ``slmgate.stats`` object served as ``GET /v1/stats``.

        A task is in the window when its first request is; ``route`` keeps the requests on that
        route and the tasks with any request on it. ``now`` defaults to the current time; with
        no window every row counts and the series spans the data.

        Outcomes (see ``router.ledger.outcomes``): ``outcomes`` holds task count, successes,
        cost, success rate and CPS over tasks with a *reported* outcome, over tasks with an
        *inferred* one, and ``combined`` (both), plus the *unknown* tasks (free text, nothing
        reported: counted in cost, never as success or failure). The headline
        ``cps_usd``/``success_rate``/``successful_tasks`` and the series are on ``cps_basis``:
        ``reported`` when any task in the window has a reported outcome, else ``inferred``.
        ``tasks`` counts every task, ``tasks_with_outcome`` the reported ones.

        ``cost_usd`` is every attempt of the window's requests; a basis' ``cps_usd`` divides
        the cost of its tasks (all their requests) by their successes, and each series row's
        ``cost_usd`` is the cost of the basis' tasks that started in it, so ``cps_usd`` checks
        row by row. ``savings_usd`` is null when the top tier is unpriced (counterfactual 0).
        Mean accepted length = accepted draft tokens per verification step.
        """
        if buckets < 1:
            raise ValueError(f"buckets must be >= 1, got {buckets}")
        end = time.time() if now is None else float(now)
        start = None if window_s is None else end - float(window_s)
        return self._read(
            lambda conn: summary.stats(conn, self._dialect, start, end, window_s, route, buckets)
        )

    def tasks(
        self,
        limit: int = 50,
        route: str | None = None,
        window_s: float | None = None,
        now: float | None = None,
    ) -> list[dict[str, Any]]:
        """Recent tasks, newest first, with their totals and the tiers they used."""
        end = time.time() if now is None else float(now)
        start = None if window_s is None else end - float(window_s)
        return self._read(lambda conn: queries.tasks(conn, limit, start, end, route))

    def task(self, task_id: str, wait_s: float = 5.0) -> dict[str, Any] | None:
        """One task with its requests (oldest first), each with its attempts; None if unknown.

        Reads its own writes: while a request of the task is still queued for the writer, the
        queue is flushed first (at most ``wait_s``), so a task answered a moment ago is found."""
        if self._writer.is_pending(task_id):
            self.flush(timeout=wait_s)
        return self._read(lambda conn: queries.task(conn, task_id))

    def calibration_rows(
        self,
        route: str | None,
        tier: str,
        window_s: float | None = None,
        now: float | None = None,
    ) -> list[queries.CalibrationRow]:
        """(signals, confidence, task success, kind) for accepted attempts on ``tier`` whose task
        has a reported outcome: the labelled data cascade thresholds are calibrated on."""
        end = time.time() if now is None else float(now)
        start = None if window_s is None else end - float(window_s)
        return self._read(lambda conn: queries.calibration_rows(conn, route, tier, start, end))
