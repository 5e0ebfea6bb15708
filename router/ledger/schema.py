"""The ledger's tables, its engine per backend, and the one in-place upgrade older files need.

``requests`` and ``attempts`` are append-only facts; ``tasks`` keeps each task's running totals
and outcome (see ``router.ledger.outcomes``) so dashboard reads never group the requests table.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import Connection, Engine

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
    sa.Column("key_id", sa.String),  # the API key record it came in with; NULL: none or static
    sa.Index("ix_requests_created_at", "created_at"),
    sa.Index("ix_requests_key_id_created_at", "key_id", "created_at"),
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
    sa.Column("compute_s", sa.Double),  # worker seconds; NULL: not measured (remote backends)
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
    sa.Column("hint_mode", sa.String),  # verified | regenerated | NULL (no hint handed over)
    sa.Column("hint_drafted", sa.Integer),
    sa.Column("hint_reused", sa.Integer),
    sa.Column("energy_j", sa.Double),
    sa.Column("energy_measured", sa.Boolean, nullable=False),
    sa.Column("grammar_engine", sa.String),  # NULL: no grammar (or an older ledger)
    sa.Index("ix_attempts_task_id", "task_id"),
    sa.Index("ix_attempts_tier_outcome", "tier", "outcome"),
)

tasks_table = sa.Table(
    "tasks",
    metadata,
    sa.Column("task_id", sa.String, primary_key=True),
    sa.Column("created_at", sa.Double),  # first request; NULL while only an outcome is known
    sa.Column("route", sa.String),  # route of the first request
    sa.Column("success", sa.Boolean),  # reported, else inferred; NULL: unknown
    sa.Column("outcome_source", sa.String),  # 'reported' | 'inferred' | NULL (unknown)
    sa.Column("outcome_at", sa.Double),
    sa.Column("score", sa.Double),
    sa.Column("requests", sa.Integer, nullable=False, server_default="0"),
    sa.Column("failed_requests", sa.Integer, nullable=False, server_default="0"),
    # requests whose output could be checked (a schema or tools): inference needs one
    sa.Column("checked_requests", sa.Integer, nullable=False, server_default="0"),
    sa.Column("fallbacks", sa.Integer, nullable=False, server_default="0"),
    sa.Column("cost_usd", sa.Double, nullable=False, server_default="0"),  # all attempts
    sa.Index("ix_tasks_created_at", "created_at"),
)

# Escalation memory (router.memory): verified answers shown to a route's small model later.
memory_table = sa.Table(
    "memory_examples",
    metadata,
    sa.Column("id", sa.String, primary_key=True),
    sa.Column("route", sa.String, nullable=False),
    sa.Column("tools", sa.String, nullable=False),  # JSON list of tool names
    sa.Column("prompt", sa.Text, nullable=False),
    sa.Column("answer", sa.Text, nullable=False),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Index("ix_memory_route_created_at", "route", "created_at"),
)

# API keys as records (gateway.keys): only a hash of the secret is stored.
api_keys_table = sa.Table(
    "api_keys",
    metadata,
    sa.Column("key_id", sa.String, primary_key=True),  # public id, shown in lists and stats
    sa.Column("name", sa.String, nullable=False),
    sa.Column("key_hash", sa.String, nullable=False, unique=True),  # sha256 of the secret, hex
    sa.Column("key_prefix", sa.String, nullable=False),  # first characters, to recognise a key
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("revoked_at", sa.Double),  # NULL: active
    sa.Column("budget_daily_usd", sa.Double),  # NULL: no limit
    sa.Column("budget_monthly_usd", sa.Double),
    sa.Column("rpm", sa.Integer),  # requests per minute
    sa.Column("tpm", sa.Integer),  # tokens (prompt + completion) per minute
    sa.Column("models", sa.Text, nullable=False, server_default="[]"),  # JSON; []: every route
    sa.Column("admin", sa.Boolean, nullable=False, server_default=sa.false()),  # stats, tasks
)

REQUEST_FIELDS = [c.name for c in requests_table.columns]
ATTEMPT_FIELDS = [c.name for c in attempts_table.columns]


def make_engine(url: str) -> Engine:
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


def upsert(dialect: str, table: sa.Table) -> Any:
    """The dialect's INSERT that supports ON CONFLICT DO UPDATE (SQLite and PostgreSQL)."""
    if dialect == "postgresql":
        return pg.insert(table)
    return sqlite_dialect.insert(table)


def create_schema(conn: Connection) -> None:
    """Create missing tables, then bring older ``tasks`` and ``attempts`` tables up to date."""
    metadata.create_all(conn)
    columns = {c["name"] for c in sa.inspect(conn).get_columns("tasks")}
    if "checked_requests" not in columns:
        _add_checked_requests(conn)
    request_columns = {c["name"] for c in sa.inspect(conn).get_columns("requests")}
    if "key_id" not in request_columns:  # ledgers from before API key records
        conn.execute(sa.text("ALTER TABLE requests ADD COLUMN key_id VARCHAR"))
        conn.execute(sa.text(
            "CREATE INDEX IF NOT EXISTS ix_requests_key_id_created_at "
            "ON requests (key_id, created_at)"))  # fmt: skip
    attempt_columns = {c["name"] for c in sa.inspect(conn).get_columns("attempts")}
    # Ledgers written before attempts recorded these: their rows stay NULL (unknown). A
    # concurrent upgrade's loser fails here and its caller retries, as above.
    for name, sql_type in (
        ("compute_s", "DOUBLE PRECISION"), ("grammar_engine", "VARCHAR"), ("hint_mode", "VARCHAR"),
        ("hint_drafted", "INTEGER"), ("hint_reused", "INTEGER"),
    ):  # fmt: skip
        if name not in attempt_columns:
            conn.execute(sa.text(f"ALTER TABLE attempts ADD COLUMN {name} {sql_type}"))


def _add_checked_requests(conn: Connection) -> None:
    """Ledgers written before tasks counted checkable requests: add the column, fill it from the
    requests, and re-infer outcomes under today's rule (reported outcomes are kept)."""
    from router.ledger.outcomes import checked_condition, inferred_outcome

    # Two replicas upgrading at once: the loser's ALTER fails, its transaction rolls back and
    # the caller's retry finds the column in place.
    conn.execute(sa.text(
        "ALTER TABLE tasks ADD COLUMN checked_requests INTEGER NOT NULL DEFAULT 0"))  # fmt: skip
    r, t = requests_table.c, tasks_table.c
    checked = (
        sa.select(sa.func.count())
        .where(r.task_id == t.task_id, checked_condition(requests_table))
        .scalar_subquery()
    )
    conn.execute(sa.update(tasks_table).values(checked_requests=checked))
    success, source = inferred_outcome(t.failed_requests, t.checked_requests)
    conn.execute(
        sa.update(tasks_table)
        .where(sa.or_(t.outcome_source.is_(None), t.outcome_source != "reported"))
        .values(success=success, outcome_source=source)
    )
