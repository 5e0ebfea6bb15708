"""The request ledger: every request, attempt and task outcome, in SQLite or PostgreSQL.

Writes come from the response path, so ``record`` only enqueues: a background thread batches the
rows into the database, retries a failed batch briefly, then drops and counts it. An outage is
logged and counted (``health()``, ``on_failure``), never raised to the caller. Reads (stats,
tasks, calibration rows) and ``set_outcome`` are synchronous and raise ``LedgerUnavailable``.

A task's running totals (requests, failed requests, fallbacks, cost, first request time) are kept
on its ``tasks`` row by an upsert per batch, so task-level stats and CPS read one small table
instead of grouping the requests table on every dashboard refresh.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from router import stats as st
from router.records import AttemptRecord, RequestRecord

log = logging.getLogger("slmgate.ledger")

metadata = sa.MetaData()

requests_table = sa.Table(
    "requests",
    metadata,
    sa.Column("request_id", sa.String, primary_key=True),
    sa.Column("task_id", sa.String, nullable=False),  # the request's own id when it has none
    sa.Column("route", sa.String, nullable=False),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("latency_s", sa.Double, nullable=False),
    sa.Column("status", sa.Integer, nullable=False),
    sa.Column("error_type", sa.String),
    sa.Column("tier", sa.String),
    sa.Column("backend", sa.String),
    sa.Column("ttft_s", sa.Double),
    sa.Column("prompt_tokens", sa.Integer, nullable=False),
    sa.Column("completion_tokens", sa.Integer, nullable=False),
    sa.Column("cost_usd", sa.Double, nullable=False),
    sa.Column("counterfactual_cost_usd", sa.Double, nullable=False),
    sa.Column("schema_valid", sa.Boolean),
    sa.Column("executable", sa.Boolean),
    sa.Column("fallback", sa.Boolean, nullable=False),
    sa.Column("fallback_reason", sa.String),
    sa.Column("stream", sa.Boolean, nullable=False),
    sa.Column("expects_json", sa.Boolean, nullable=False),
    sa.Column("expects_tools", sa.Boolean, nullable=False),
    sa.Column("energy_j", sa.Double),  # sum over attempts; NULL when none reported energy
    sa.Column("energy_measured", sa.Boolean),  # every figure measured (vs estimated); NULL: none
    sa.Index("ix_requests_created_at", "created_at"),
    sa.Index("ix_requests_route_created_at", "route", "created_at"),
    sa.Index("ix_requests_task_id", "task_id"),
)

attempts_table = sa.Table(
    "attempts",
    metadata,
    sa.Column(
        "request_id",
        sa.String,
        sa.ForeignKey("requests.request_id", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("attempt_no", sa.Integer, primary_key=True),
    sa.Column("task_id", sa.String, nullable=False),  # the request's task
    sa.Column("route", sa.String, nullable=False),
    sa.Column("tier", sa.String, nullable=False),
    sa.Column("backend", sa.String, nullable=False),
    sa.Column("model", sa.String, nullable=False),
    sa.Column("started_at", sa.Double, nullable=False),
    sa.Column("latency_s", sa.Double, nullable=False),
    sa.Column("ttft_s", sa.Double),
    sa.Column("prompt_tokens", sa.Integer, nullable=False),
    sa.Column("completion_tokens", sa.Integer, nullable=False),
    sa.Column("cost_usd", sa.Double, nullable=False),
    sa.Column("confidence", sa.Double),
    sa.Column("signals", sa.JSON, nullable=False),
    sa.Column("schema_valid", sa.Boolean),
    sa.Column("executable", sa.Boolean),
    sa.Column("outcome", sa.String, nullable=False),
    sa.Column("fallback_reason", sa.String),
    sa.Column("error", sa.String),
    sa.Column("spec_drafted", sa.Integer),
    sa.Column("spec_accepted", sa.Integer),
    sa.Column("spec_steps", sa.Integer),
    sa.Column("energy_j", sa.Double),
    sa.Column("energy_measured", sa.Boolean, nullable=False),
    sa.Index("ix_attempts_task_id", "task_id"),
    sa.Index("ix_attempts_tier_outcome", "tier", "outcome"),
)

tasks_table = sa.Table(
    "tasks",
    metadata,
    sa.Column("task_id", sa.String, primary_key=True),
    sa.Column("created_at", sa.Double),  # first request; NULL while only an outcome is known
    sa.Column("route", sa.String),  # route of the first request
    sa.Column("success", sa.Boolean),  # reported outcome, else inferred from the requests
    sa.Column("outcome_source", sa.String),  # 'reported' | 'inferred' | NULL
    sa.Column("outcome_at", sa.Double),
    sa.Column("score", sa.Double),
    sa.Column("requests", sa.Integer, nullable=False, server_default="0"),
    sa.Column("failed_requests", sa.Integer, nullable=False, server_default="0"),
    sa.Column("fallbacks", sa.Integer, nullable=False, server_default="0"),
    sa.Column("cost_usd", sa.Double, nullable=False, server_default="0"),  # all attempts
    sa.Index("ix_tasks_created_at", "created_at"),
)

_REQUEST_FIELDS = [c.name for c in requests_table.columns]
_ATTEMPT_FIELDS = [c.name for c in attempts_table.columns]
_RECORD_FIELDS = {f.name for f in dataclasses.fields(RequestRecord)} - {"attempts"}


class LedgerUnavailable(Exception):
    """The ledger database cannot be reached or used right now (the gateway answers 503)."""


def _make_engine(url: str) -> Engine:
    """An engine tuned per backend: WAL + busy timeout on SQLite, a connect timeout on Postgres."""
    parsed = sa.make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        if parsed.database in (None, "", ":memory:"):
            raise ValueError("the ledger needs an SQLite file (sqlite:///path), not :memory:")
        engine = sa.create_engine(parsed, pool_pre_ping=True, connect_args={"timeout": 30})

        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")  # readers never block the writer thread
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    if backend == "postgresql":
        connect_args: dict[str, Any] = {}
        if "connect_timeout" not in parsed.query:
            connect_args["connect_timeout"] = 5
        return sa.create_engine(parsed, pool_pre_ping=True, connect_args=connect_args)
    raise ValueError(f"unsupported ledger database {backend!r}: use sqlite:/// or postgresql://")


def _request_row(req: RequestRecord, task_id: str) -> dict[str, Any]:
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
    }


def _attempt_row(att: AttemptRecord, request_id: str, task_id: str) -> dict[str, Any]:
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
        "energy_j": att.energy_j,
        "energy_measured": att.energy_measured,
    }


def batch_rows(
    batch: Sequence[RequestRecord],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """Request, attempt and per-task delta rows for one batch (tasks pre-aggregated, so one
    upsert statement never touches the same task twice)."""
    requests: list[dict[str, Any]] = []
    attempts: list[dict[str, Any]] = []
    tasks: dict[str, dict[str, Any]] = {}
    for req in batch:
        task_id = req.task_id or req.request_id
        requests.append(_request_row(req, task_id))
        cost = 0.0
        for att in req.attempts:
            attempts.append(_attempt_row(att, req.request_id, task_id))
            cost += att.cost_usd
        delta = tasks.get(task_id)
        if delta is None:
            delta = tasks[task_id] = {
                "task_id": task_id,
                "created_at": req.created_at,
                "route": req.route,
                "success": None,
                "outcome_source": "inferred",
                "requests": 0,
                "failed_requests": 0,
                "fallbacks": 0,
                "cost_usd": 0.0,
            }
        elif req.created_at < delta["created_at"]:
            delta["created_at"], delta["route"] = req.created_at, req.route
        delta["requests"] += 1
        delta["failed_requests"] += 0 if req.succeeded else 1
        delta["fallbacks"] += 1 if req.fallback else 0
        delta["cost_usd"] += cost
    for delta in tasks.values():
        delta["success"] = delta["failed_requests"] == 0
    # one lock order for every writer, so concurrent replicas' upserts cannot deadlock
    return requests, attempts, [tasks[k] for k in sorted(tasks)]


class Ledger:
    """Request/attempt/task store with a non-blocking, batching writer thread."""

    def __init__(
        self,
        url: str,
        *,
        queue_size: int = 10000,
        on_failure: Callable[[BaseException], None] | None = None,
        batch_size: int = 500,
        retries: int = 2,
        backoff_s: float = 0.05,
    ) -> None:
        self.url = url
        self._engine = _make_engine(url)
        self._dialect = self._engine.dialect.name
        self._queue: queue.Queue[RequestRecord] = queue.Queue(maxsize=queue_size)
        self._on_failure = on_failure
        self._batch_size = max(1, batch_size)
        self._retries = max(0, retries)
        self._backoff_s = backoff_s
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._pending = 0  # enqueued and not yet written or dropped
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._schema_ready = False
        self._failing = False
        self.written = 0
        self.dropped = 0
        self.dropped_queue_full = 0
        self.dropped_write_failed = 0
        self.write_failures = 0
        self.last_error: str | None = None
        self.last_error_at: float | None = None

    # ---- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Create the tables (if the database is up) and start the writer thread.

        A database that is down now is logged, not raised: the writer creates the tables once
        it can reach it.
        """
        try:
            self._ensure_schema()
        except SQLAlchemyError as exc:
            self._note_failure(exc, "creating the ledger tables")
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="slmgate-ledger", daemon=True)
            self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued (up to ``timeout`` seconds), stop the writer, release the pool.

        Records still unwritten after the timeout are counted as dropped.
        """
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + timeout
        if self._thread is not None:
            self._stop.set()
            self._thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            lost = self._pending
            if lost:
                self._count_dropped(lost, write_failed=True)
                self._pending = 0
                self._idle.notify_all()
        if lost:
            log.warning("ledger closed with %d unwritten records (dropped)", lost)
        self._engine.dispose()

    def __enter__(self) -> Ledger:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- writes ------------------------------------------------------------------------------

    def record(self, req: RequestRecord) -> None:
        """Queue a request (with its attempts) for writing. Never blocks, never raises."""
        try:
            with self._lock:
                if self._closed:
                    self._count_dropped(1, write_failed=False)
                    return
                self._pending += 1
            try:
                self._queue.put_nowait(req)
            except queue.Full:
                with self._lock:
                    self._pending -= 1
                    self._count_dropped(1, write_failed=False)
                    self._idle.notify_all()
        except Exception:  # pragma: no cover - defensive: the response path must never fail
            log.exception("ledger.record failed")

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every queued record is written or dropped; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._pending > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def set_outcome(self, task_id: str, success: bool, score: float | None = None) -> None:
        """Record a task's reported outcome (upsert; works before its requests are written)."""
        if not task_id:
            raise ValueError("task_id must not be empty")
        values = {
            "task_id": task_id,
            "success": bool(success),
            "outcome_source": "reported",
            "outcome_at": time.time(),
            "score": None if score is None else float(score),
            "requests": 0,
            "failed_requests": 0,
            "fallbacks": 0,
            "cost_usd": 0.0,
        }
        stmt = self._insert(tasks_table).values(**values)
        stmt = stmt.on_conflict_do_update(
            index_elements=["task_id"],
            set_={
                k: stmt.excluded[k] for k in ("success", "outcome_source", "outcome_at", "score")
            },
        )
        try:
            self._ensure_schema()
            with self._engine.begin() as conn:
                conn.execute(stmt)
        except SQLAlchemyError as exc:
            raise LedgerUnavailable(f"ledger database unavailable: {exc}") from exc

    def health(self) -> dict[str, Any]:
        """Counters for /metrics and the health endpoint.

        ``dropped`` = ``dropped_queue_full`` (refused by ``record``: queue full, or the ledger
        closed) + ``dropped_write_failed`` (given up after retries, duplicates, or unwritten at
        close). ``write_failures`` counts failed database operations (each retry counts).
        """
        with self._lock:
            return {
                "ok": not self._failing,
                "queued": self._pending,
                "written": self.written,
                "dropped": self.dropped,
                "dropped_queue_full": self.dropped_queue_full,
                "dropped_write_failed": self.dropped_write_failed,
                "write_failures": self.write_failures,
                "last_error": self.last_error,
                "last_error_at": self.last_error_at,
            }

    # ---- writer thread -----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                first = self._queue.get(timeout=0.05)
            except queue.Empty:
                if self._stop.is_set():
                    return
                continue
            batch = [first]
            while len(batch) < self._batch_size:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                self._write_with_retry(batch)
            except Exception as exc:  # pragma: no cover - a bug must not kill the writer
                log.exception("ledger writer bug; batch dropped")
                self._note_failure(exc, "writing")
                with self._lock:
                    self._count_dropped(len(batch), write_failed=True)
            with self._lock:
                self._pending -= len(batch)
                self._idle.notify_all()

    def _write_with_retry(self, batch: list[RequestRecord]) -> None:
        unique: dict[str, RequestRecord] = {}
        for req in batch:
            unique.setdefault(req.request_id, req)
        if len(unique) < len(batch):
            with self._lock:
                self._count_dropped(len(batch) - len(unique), write_failed=True)
            log.warning("ledger: %d duplicate request ids dropped", len(batch) - len(unique))
        records = list(unique.values())
        for attempt in range(self._retries + 1):
            try:
                self._write(records)
            except IntegrityError as exc:  # a request id already stored: write the rest singly
                self._note_failure(exc, "writing")
                self._write_singly(records)
                return
            except SQLAlchemyError as exc:
                self._note_failure(exc, "writing")
                self._schema_ready = False  # tables may be gone: recreate on the next try
                if attempt < self._retries:
                    time.sleep(self._backoff_s * 4**attempt)
                continue
            self._note_success(len(records))
            return
        with self._lock:
            self._count_dropped(len(records), write_failed=True)
        tries = self._retries + 1
        log.warning("ledger: dropped a batch of %d records after %d tries", len(records), tries)

    def _write_singly(self, records: list[RequestRecord]) -> None:
        for req in records:
            try:
                self._write([req])
            except SQLAlchemyError as exc:
                self._note_failure(exc, "writing")
                with self._lock:
                    self._count_dropped(1, write_failed=True)
            else:
                self._note_success(1)

    def _write(self, records: list[RequestRecord]) -> None:
        request_rows, attempt_rows, task_rows = batch_rows(records)
        with self._engine.begin() as conn:
            if not self._schema_ready:
                metadata.create_all(conn)
            conn.execute(sa.insert(requests_table), request_rows)
            if attempt_rows:
                conn.execute(sa.insert(attempts_table), attempt_rows)
            conn.execute(self._task_upsert(), task_rows)
        self._schema_ready = True

    def _insert(self, table: sa.Table) -> Any:
        """The dialect's INSERT that supports ON CONFLICT DO UPDATE (SQLite and PostgreSQL)."""
        if self._dialect == "postgresql":
            return pg.insert(table)
        return sqlite_dialect.insert(table)

    def _task_upsert(self) -> Any:
        """Add a batch's per-task deltas to the running totals; keep a reported outcome."""
        t = tasks_table.c
        stmt = self._insert(tasks_table)
        new = stmt.excluded
        earlier = sa.or_(t.created_at.is_(None), new.created_at < t.created_at)
        reported = t.outcome_source == "reported"
        failed = t.failed_requests + new.failed_requests
        return stmt.on_conflict_do_update(
            index_elements=["task_id"],
            set_={
                "created_at": sa.case((earlier, new.created_at), else_=t.created_at),
                "route": sa.case((earlier, new.route), else_=t.route),
                "requests": t.requests + new.requests,
                "failed_requests": failed,
                "fallbacks": t.fallbacks + new.fallbacks,
                "cost_usd": t.cost_usd + new.cost_usd,
                "success": sa.case((reported, t.success), else_=failed == 0),
                "outcome_source": sa.case((reported, t.outcome_source), else_=new.outcome_source),
            },
        )

    def _ensure_schema(self) -> None:
        if not self._schema_ready:
            metadata.create_all(self._engine)
            self._schema_ready = True

    def _count_dropped(self, n: int, *, write_failed: bool) -> None:
        """Caller holds ``self._lock``."""
        self.dropped += n
        if write_failed:
            self.dropped_write_failed += n
        else:
            self.dropped_queue_full += n

    def _note_failure(self, exc: BaseException, doing: str) -> None:
        with self._lock:
            self.write_failures += 1
            self.last_error = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
            self.last_error_at = time.time()
            first = not self._failing
            self._failing = True
        if first:
            log.warning("ledger database error while %s: %s", doing, self.last_error)
        else:
            log.debug("ledger database still failing: %s", self.last_error)
        if self._on_failure is not None:
            try:
                self._on_failure(exc)
            except Exception:
                log.exception("ledger on_failure callback raised")

    def _note_success(self, n: int) -> None:
        with self._lock:
            self.written += n
            recovered = self._failing
            self._failing = False
        if recovered:
            log.warning("ledger database writes recovered")

    # ---- reads -------------------------------------------------------------------------------

    def _read(self, fn: Callable[[Connection], Any]) -> Any:
        try:
            self._ensure_schema()
            with self._engine.connect() as conn:
                return fn(conn)
        except SQLAlchemyError as exc:
            raise LedgerUnavailable(f"ledger database unavailable: {exc}") from exc

    def _floor(self, expr: Any) -> Any:
        """floor() for non-negative values: SQLite's CAST truncates, Postgres' CAST rounds."""
        if self._dialect == "postgresql":
            return sa.func.floor(expr)
        return sa.cast(expr, sa.Integer)

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

        ``cost_usd`` is every attempt of the window's requests; ``cps_usd`` divides the cost of
        the window's tasks (all their requests) by their successes, and each series row's
        ``cost_usd`` is the cost of the tasks that started in it, so ``cps_usd`` checks row by
        row. Mean accepted length = accepted draft tokens per verification step.
        """
        if buckets < 1:
            raise ValueError(f"buckets must be >= 1, got {buckets}")
        end = time.time() if now is None else float(now)
        start = None if window_s is None else end - float(window_s)
        result: dict[str, Any] = self._read(
            lambda conn: self._stats(conn, start, end, window_s, route, buckets)
        )
        return result

    def _request_filter(self, start: float | None, end: float, route: str | None) -> list[Any]:
        r = requests_table.c
        conds: list[Any] = []
        if start is not None:
            conds += [r.created_at >= start, r.created_at <= end]
        if route is not None:
            conds.append(r.route == route)
        return conds

    def _task_filter(self, start: float | None, end: float, route: str | None) -> list[Any]:
        t = tasks_table.c
        conds: list[Any] = [t.created_at.is_not(None)]
        if start is not None:
            conds += [t.created_at >= start, t.created_at <= end]
        if route is not None:
            routed = sa.select(requests_table.c.task_id).where(requests_table.c.route == route)
            conds.append(t.task_id.in_(routed))
        return conds

    def _percentiles(
        self, conn: Connection, rconds: list[Any]
    ) -> tuple[dict[str, float | None], dict[str, float | None]]:
        """p50/p95 of latency and TTFT: ``percentile_cont`` in PostgreSQL (the same linear
        interpolation as ``stats.percentile``), one fetched column pair on SQLite."""
        r = requests_table.c
        if self._dialect == "postgresql":
            row = conn.execute(
                sa.select(
                    *(
                        sa.func.percentile_cont(q).within_group(col)
                        for col in (r.latency_s, r.ttft_s)
                        for q in (0.5, 0.95)
                    )
                ).where(*rconds)
            ).one()
            values = [None if v is None else float(v) for v in row]
            return {"p50": values[0], "p95": values[1]}, {"p50": values[2], "p95": values[3]}
        latencies: list[float] = []
        ttfts: list[float] = []
        for latency, ttft in conn.execute(sa.select(r.latency_s, r.ttft_s).where(*rconds)):
            latencies.append(latency)
            if ttft is not None:
                ttfts.append(ttft)
        return st.p50_p95(latencies), st.p50_p95(ttfts)

    def _stats(
        self,
        conn: Connection,
        start: float | None,
        end: float,
        window_s: float | None,
        route: str | None,
        buckets: int,
    ) -> dict[str, Any]:
        r = requests_table.c
        a = attempts_table.c
        t = tasks_table.c
        rconds = self._request_filter(start, end, route)
        tconds = self._task_filter(start, end, route)

        def count_true(col: Any) -> Any:
            return sa.func.coalesce(sa.func.sum(sa.case((col.is_(True), 1), else_=0)), 0)

        req = conn.execute(
            sa.select(
                sa.func.count(),
                count_true(r.status != 200),
                sa.func.coalesce(sa.func.sum(r.counterfactual_cost_usd), 0.0),
                sa.func.count(r.schema_valid),
                count_true(r.schema_valid),
                sa.func.count(r.executable),
                count_true(r.executable),
                count_true(r.fallback),
                sa.func.min(r.created_at),
                sa.func.max(r.created_at),
                sa.func.coalesce(sa.func.sum(r.energy_j), 0.0),
                sa.func.count(r.energy_j),
                count_true(r.energy_measured),
            ).where(*rconds)
        ).one()
        n_requests, n_errors = int(req[0]), int(req[1])
        counterfactual = float(req[2])
        n_fallback = int(req[7])

        reasons: dict[str, int] = {}
        if n_fallback:
            for reason, count in conn.execute(
                sa.select(r.fallback_reason, sa.func.count())
                .where(*rconds, r.fallback.is_(True))
                .group_by(r.fallback_reason)
            ):
                key = reason if reason is not None else "unknown"
                reasons[key] = reasons.get(key, 0) + int(count)

        latency, ttft = self._percentiles(conn, rconds)

        by_tier: dict[str, dict[str, Any]] = {}
        spec = [0, 0, 0]
        tier_rows = conn.execute(
            sa.select(
                a.tier,
                sa.func.count(),
                count_true(a.outcome == "accepted"),
                sa.func.coalesce(sa.func.sum(a.prompt_tokens), 0),
                sa.func.coalesce(sa.func.sum(a.completion_tokens), 0),
                sa.func.coalesce(sa.func.sum(a.cost_usd), 0.0),
                sa.func.coalesce(sa.func.sum(a.spec_drafted), 0),
                sa.func.coalesce(sa.func.sum(a.spec_accepted), 0),
                sa.func.coalesce(sa.func.sum(a.spec_steps), 0),
            )
            .select_from(
                attempts_table.join(requests_table, a.request_id == r.request_id)
                if rconds
                else attempts_table  # all data: no need to look at the requests
            )
            .where(*rconds)
            .group_by(a.tier)
            .order_by(a.tier)
        )
        for row in tier_rows:
            by_tier[row[0]] = {
                "attempts": int(row[1]),
                "answered": int(row[2]),
                "prompt_tokens": int(row[3]),
                "completion_tokens": int(row[4]),
                "cost_usd": float(row[5]),
            }
            spec[0] += int(row[6])
            spec[1] += int(row[7])
            spec[2] += int(row[8])
        cost = sum(tier["cost_usd"] for tier in by_tier.values())

        joules, energy_requests, measured = float(req[10]), int(req[11]), int(req[12])

        task_row = conn.execute(
            sa.select(
                sa.func.count(),
                count_true(t.outcome_source == "reported"),
                count_true(t.success),
                sa.func.coalesce(sa.func.sum(t.cost_usd), 0.0),
            ).where(*tconds)
        ).one()
        n_tasks, n_reported, n_success = int(task_row[0]), int(task_row[1]), int(task_row[2])
        task_cost = float(task_row[3])

        if start is not None:
            span: tuple[float, float] | None = (start, end)
        elif n_requests:
            span = (float(req[8]), float(req[9]))
        else:
            span = None
        series: list[dict[str, Any]] = []
        if span is not None:
            lo, hi = span
            width = st.bucket_width(lo, hi, buckets)
            rb = self._floor((r.created_at - lo) / width).label("b")
            tb = self._floor((t.created_at - lo) / width).label("b")
            req_buckets = conn.execute(
                sa.select(rb, sa.func.count()).where(*rconds).group_by("b")
            ).all()
            task_buckets = conn.execute(
                sa.select(
                    tb,
                    sa.func.count(),
                    count_true(t.success),
                    sa.func.coalesce(sa.func.sum(t.cost_usd), 0.0),
                )
                .where(*tconds)
                .group_by("b")
            ).all()
            series = st.series(
                st.bucket_edges(lo, hi, buckets),
                [(row[0], row[1]) for row in req_buckets],
                [(row[0], row[1], row[2], row[3]) for row in task_buckets],
            )

        return {
            "object": "slmgate.stats",
            "window": {
                "start": start,
                "end": end,
                "seconds": None if window_s is None else float(window_s),
            },
            "route": route,
            "requests": n_requests,
            "errors": n_errors,
            "tasks": n_tasks,
            "tasks_with_outcome": n_reported,
            "successful_tasks": n_success,
            "success_rate": st.rate(n_success, n_tasks),
            "cost_usd": cost,
            "cps_usd": st.cps(task_cost, n_success),
            "counterfactual_cost_usd": counterfactual,
            "savings_usd": counterfactual - cost,
            "schema_validity_rate": st.rate(int(req[4]), int(req[3])),
            "executable_call_rate": st.rate(int(req[6]), int(req[5])),
            "fallback_rate": st.rate(n_fallback, n_requests),
            "fallback_reasons": reasons,
            "latency_s": latency,
            "ttft_s": ttft,
            "by_tier": by_tier,
            "speculation": st.speculation(spec[0], spec[1], spec[2]),
            "energy": {
                "joules": joules,
                "joules_per_request": st.rate(joules, energy_requests),
                "measured": st.energy_measured(measured, energy_requests),
            },
            "series": series,
        }

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
        t = tasks_table.c
        a = attempts_table.c

        def run(conn: Connection) -> list[dict[str, Any]]:
            rows = (
                conn.execute(
                    sa.select(tasks_table)
                    .where(*self._task_filter(start, end, route))
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
                    "outcome_source": "reported"
                    if row["outcome_source"] == "reported"
                    else "inferred",
                    "tiers": tiers[row["task_id"]],
                    "fallbacks": int(row["fallbacks"]),
                    "route": row["route"],
                }
                for row in rows
            ]

        return list(self._read(run))

    def task(self, task_id: str) -> dict[str, Any] | None:
        """One task with its requests (oldest first), each with its attempts; None if unknown."""
        r = requests_table.c
        a = attempts_table.c

        def run(conn: Connection) -> dict[str, Any] | None:
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
            if head is None and not reqs:
                return None
            attempts: dict[str, list[dict[str, Any]]] = {row["request_id"]: [] for row in reqs}
            for att in conn.execute(
                sa.select(attempts_table)
                .where(a.task_id == task_id)
                .order_by(a.request_id, a.attempt_no)
            ).mappings():
                attempts.setdefault(att["request_id"], []).append(_attempt_dict(att))
            return {
                "task_id": task_id,
                "created_at": None if head is None else head["created_at"],
                "success": None
                if head is None or head["success"] is None
                else bool(head["success"]),
                "outcome_source": None if head is None else head["outcome_source"],
                "score": None if head is None else head["score"],
                "requests": [
                    {**_request_dict(row), "attempts": attempts[row["request_id"]]} for row in reqs
                ],
            }

        result: dict[str, Any] | None = self._read(run)
        return result

    def calibration_rows(
        self,
        route: str | None,
        tier: str,
        window_s: float | None = None,
        now: float | None = None,
    ) -> list[tuple[dict[str, float], float | None, bool]]:
        """(signals, confidence, task success) for accepted attempts on ``tier`` whose task has a
        reported outcome: the labelled data cascade thresholds are calibrated on."""
        end = time.time() if now is None else float(now)
        start = None if window_s is None else end - float(window_s)
        a = attempts_table.c
        t = tasks_table.c
        r = requests_table.c
        conds: list[Any] = [
            a.tier == tier,
            a.outcome == "accepted",
            t.outcome_source == "reported",
            t.success.is_not(None),
            *self._request_filter(start, end, route),
        ]
        query = (
            sa.select(a.signals, a.confidence, t.success)
            .select_from(
                attempts_table.join(tasks_table, a.task_id == t.task_id).join(
                    requests_table, a.request_id == r.request_id
                )
            )
            .where(*conds)
            .order_by(r.created_at, a.request_id, a.attempt_no)
        )

        def run(conn: Connection) -> list[tuple[dict[str, float], float | None, bool]]:
            return [
                (
                    {str(k): float(v) for k, v in (signals or {}).items()},
                    None if confidence is None else float(confidence),
                    bool(success),
                )
                for signals, confidence, success in conn.execute(query)
            ]

        return list(self._read(run))


def _request_dict(row: Any) -> dict[str, Any]:
    out = {name: row[name] for name in _REQUEST_FIELDS}
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


def _attempt_dict(row: Any) -> dict[str, Any]:
    out = {name: row[name] for name in _ATTEMPT_FIELDS}
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


__all__ = [
    "Ledger",
    "LedgerUnavailable",
    "attempts_table",
    "batch_rows",
    "metadata",
    "records_from_task",
    "requests_table",
    "tasks_table",
]
