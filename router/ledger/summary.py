"""The ``slmgate.stats`` object (``GET /v1/stats``): aggregates computed in the database, the
arithmetic in ``router.stats`` so it is tested on literals."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from router import stats as st
from router.ledger.queries import request_filter, task_filter
from router.ledger.schema import api_keys_table, attempts_table, requests_table, tasks_table

Percentiles = dict[str, float | None]


def _count_true(col: Any) -> Any:
    return sa.func.coalesce(sa.func.sum(sa.case((col.is_(True), 1), else_=0)), 0)


def _floor(dialect: str, expr: Any) -> Any:
    """floor() for non-negative values: SQLite's CAST truncates, Postgres' CAST rounds."""
    if dialect == "postgresql":
        return sa.func.floor(expr)
    return sa.cast(expr, sa.Integer)


def percentiles(
    conn: Connection, dialect: str, rconds: list[Any]
) -> tuple[Percentiles, Percentiles]:
    """p50/p95 of latency and TTFT: ``percentile_cont`` in PostgreSQL (the same linear
    interpolation as ``stats.percentile``), one fetched column pair on SQLite."""
    r = requests_table.c
    if dialect == "postgresql":
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


def _by_tier(conn: Connection, rconds: list[Any]) -> tuple[dict[str, dict[str, Any]], list[int]]:
    """Attempts, answers, tokens and cost per tier, and speculation totals (drafted, accepted,
    steps), over every attempt of the window's requests."""
    a, r = attempts_table.c, requests_table.c
    by_tier: dict[str, dict[str, Any]] = {}
    spec = [0, 0, 0]
    rows = conn.execute(
        sa.select(
            a.tier,
            sa.func.count(),
            _count_true(a.outcome == "accepted"),
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
    for row in rows:
        by_tier[row[0]] = {
            "attempts": int(row[1]),
            "answered": int(row[2]),
            "prompt_tokens": int(row[3]),
            "completion_tokens": int(row[4]),
            "cost_usd": float(row[5]),
        }
        for i in range(3):
            spec[i] += int(row[6 + i])
    return by_tier, spec


def _hints(conn: Connection, rconds: list[Any]) -> list[int]:
    """Verified escalation totals over the window's attempts: (verified, regenerated, hint
    tokens drafted, reused, output tokens of the verified attempts)."""
    a, r = attempts_table.c, requests_table.c
    row = conn.execute(
        sa.select(
            _count_true(a.hint_mode == "verified"),
            _count_true(a.hint_mode == "regenerated"),
            sa.func.coalesce(sa.func.sum(a.hint_drafted), 0),
            sa.func.coalesce(sa.func.sum(a.hint_reused), 0),
            sa.func.coalesce(
                sa.func.sum(sa.case((a.hint_mode == "verified", a.completion_tokens), else_=0)), 0
            ),
        )
        .select_from(
            attempts_table.join(requests_table, a.request_id == r.request_id)
            if rconds
            else attempts_table
        )
        .where(*rconds, a.hint_mode.is_not(None))
    ).one()
    return [int(v) for v in row]


def _outcome_groups(conn: Connection, tconds: list[Any]) -> dict[str | None, st.Group]:
    """(tasks, successes, cost) of the window's tasks per ``outcome_source``."""
    t = tasks_table.c
    rows = conn.execute(
        sa.select(
            t.outcome_source,
            sa.func.count(),
            _count_true(t.success),
            sa.func.coalesce(sa.func.sum(t.cost_usd), 0.0),
        )
        .where(*tconds)
        .group_by(t.outcome_source)
    )
    return {source: (int(n), int(ok), float(cost)) for source, n, ok, cost in rows}


def _by_key(conn: Connection, rconds: list[Any]) -> list[dict[str, Any]]:
    """Requests, tokens and spend per API key record in the window, most spent first (requests
    with no key record — an open gateway or a static config key — are not listed)."""
    r, k = requests_table.c, api_keys_table.c
    rows = conn.execute(
        sa.select(
            r.key_id, sa.func.max(k.name), sa.func.count(), _count_true(r.status != 200),
            sa.func.coalesce(sa.func.sum(r.prompt_tokens + r.completion_tokens), 0),
            sa.func.coalesce(sa.func.sum(r.cost_usd), 0.0),
        )
        .select_from(requests_table.outerjoin(api_keys_table, k.key_id == r.key_id))
        .where(*rconds, r.key_id.is_not(None))
        .group_by(r.key_id)
    ).all()  # fmt: skip
    out = [
        {"key_id": row[0], "name": row[1], "requests": int(row[2]), "errors": int(row[3]),
         "tokens": int(row[4]), "cost_usd": float(row[5])}
        for row in rows
    ]  # fmt: skip
    return sorted(out, key=lambda e: (-e["cost_usd"], e["key_id"]))


def stats(
    conn: Connection,
    dialect: str,
    start: float | None,
    end: float,
    window_s: float | None,
    route: str | None,
    buckets: int,
) -> dict[str, Any]:
    """See ``Ledger.stats``."""
    r = requests_table.c
    t = tasks_table.c
    rconds = request_filter(start, end, route)
    tconds = task_filter(start, end, route)

    req = conn.execute(
        sa.select(
            sa.func.count(),
            _count_true(r.status != 200),
            sa.func.coalesce(sa.func.sum(r.counterfactual_cost_usd), 0.0),
            sa.func.count(r.schema_valid),
            _count_true(r.schema_valid),
            sa.func.count(r.executable),
            _count_true(r.executable),
            _count_true(r.fallback),
            sa.func.min(r.created_at),
            sa.func.max(r.created_at),
            sa.func.coalesce(sa.func.sum(r.energy_j), 0.0),
            sa.func.count(r.energy_j),
            _count_true(r.energy_measured),
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

    latency, ttft = percentiles(conn, dialect, rconds)
    by_tier, spec = _by_tier(conn, rconds)
    hints = _hints(conn, rconds)
    cost = sum(tier["cost_usd"] for tier in by_tier.values())
    joules, energy_requests, measured = float(req[10]), int(req[11]), int(req[12])

    groups = _outcome_groups(conn, tconds)
    outcomes = st.outcomes(groups)
    basis = st.cps_basis(outcomes["reported"]["tasks"])
    headline = outcomes[basis]

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
        rb = _floor(dialect, (r.created_at - lo) / width).label("b")
        tb = _floor(dialect, (t.created_at - lo) / width).label("b")
        req_buckets = conn.execute(
            sa.select(rb, sa.func.count()).where(*rconds).group_by("b")
        ).all()
        task_buckets = conn.execute(
            sa.select(
                tb,
                sa.func.count(),
                _count_true(t.success),
                sa.func.coalesce(sa.func.sum(t.cost_usd), 0.0),
            )
            .where(*tconds, t.outcome_source == basis)
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
        "tasks": sum(g[0] for g in groups.values()),
        "tasks_with_outcome": outcomes["reported"]["tasks"],
        "cps_basis": basis,
        "successful_tasks": headline["successful_tasks"],
        "success_rate": headline["success_rate"],
        "cps_usd": headline["cps_usd"],
        "outcomes": outcomes,
        "cost_usd": cost,
        "counterfactual_cost_usd": counterfactual,
        "savings_usd": st.savings(counterfactual, cost),
        "schema_validity_rate": st.rate(int(req[4]), int(req[3])),
        "executable_call_rate": st.rate(int(req[6]), int(req[5])),
        "fallback_rate": st.rate(n_fallback, n_requests),
        "fallback_reasons": reasons,
        "latency_s": latency,
        "ttft_s": ttft,
        "by_tier": by_tier,
        "by_key": _by_key(conn, rconds),
        "speculation": st.speculation(spec[0], spec[1], spec[2]),
        "verified_escalation": st.verified_escalation(*hints),
        "energy": {
            "joules": joules,
            "joules_per_request": st.rate(joules, energy_requests),
            "measured": st.energy_measured(measured, energy_requests),
        },
        "series": series,
    }
