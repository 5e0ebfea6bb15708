"""Ledger at scale: fill N synthetic requests through ``Ledger.record`` and time the reads.

Reports insert throughput (records/s through the real writer thread), outcome upserts/s, and the
median/p95 latency of ``stats()`` (all data, a 1 h window, one route) and ``tasks()`` over several
calls, plus the machine. PostgreSQL URLs get a private schema that is dropped afterwards.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa

from benchmarks.host import host_info
from router.ledger import Ledger
from router.records import AttemptRecord, RequestRecord
from router.stats import percentile

SPAN_S = 86400.0  # synthetic traffic covers the last day


def machine() -> dict[str, Any]:
    """CPU model and core counts (what the numbers were measured on)."""
    return host_info() | {"sqlalchemy": sa.__version__}


def synthetic_requests(rows: int, now: float, seed: int = 0) -> Iterator[RequestRecord]:
    """``rows`` requests over the last day: tasks of ~3 requests, 1–2 attempts each."""
    rng = random.Random(seed)
    step = SPAN_S / max(rows, 1)
    task_id: str | None = None
    left_in_task = 0
    for i in range(rows):
        if left_in_task == 0:
            task_id = f"task-{i}" if rng.random() < 0.9 else None  # some requests stand alone
            left_in_task = rng.randint(2, 4)
        left_in_task -= 1
        rid = f"req-{i}"
        created = now - SPAN_S + i * step
        route = "auto" if rng.random() < 0.8 else "slm"
        escalate = route == "auto" and rng.random() < 0.3
        pt, ct = rng.randint(50, 800), rng.randint(5, 200)
        valid = rng.random() < 0.93
        attempts = [
            AttemptRecord(
                rid,
                0,
                route,
                "slm",
                "embedded-slm",
                "smollm2",
                created,
                0.2,
                ttft_s=0.02,
                prompt_tokens=pt,
                completion_tokens=ct,
                cost_usd=(pt * 0.05 + ct * 0.1) / 1e6,
                confidence=rng.random(),
                signals={"mean_entropy": rng.random(), "min_top1_prob": rng.random()},
                schema_valid=valid,
                outcome="escalated" if escalate else "accepted",
                fallback_reason="low_confidence" if escalate else None,
                spec_drafted=20,
                spec_accepted=rng.randint(0, 20),
                spec_steps=8,
                energy_j=rng.random() * 5,
                task_id=task_id,
            )
        ]
        if escalate:
            attempts.append(
                AttemptRecord(
                    rid,
                    1,
                    route,
                    "llm",
                    "embedded-llm",
                    "qwen",
                    created + 0.2,
                    0.6,
                    ttft_s=0.05,
                    prompt_tokens=pt,
                    completion_tokens=ct,
                    cost_usd=(pt * 1.0 + ct * 3.0) / 1e6,
                    confidence=rng.random(),
                    schema_valid=True,
                    energy_j=rng.random() * 20,
                    task_id=task_id,
                )
            )
        yield RequestRecord(
            rid, route, created, sum(a.latency_s for a in attempts), task_id=task_id,
            status=200 if rng.random() < 0.98 else 500, tier=attempts[-1].tier,
            backend=attempts[-1].backend, ttft_s=attempts[0].ttft_s, prompt_tokens=pt,
            completion_tokens=ct, cost_usd=sum(a.cost_usd for a in attempts),
            counterfactual_cost_usd=(pt * 1.0 + ct * 3.0) / 1e6,
            schema_valid=attempts[-1].schema_valid, fallback=escalate,
            fallback_reason="low_confidence" if escalate else None, expects_json=True,
            attempts=attempts,
        )  # fmt: skip


@contextmanager
def isolated_url(url: str | None, keep: bool) -> Iterator[str]:
    """A temp SQLite file by default; a fresh schema for PostgreSQL (dropped unless ``keep``)."""
    if url is None:
        with tempfile.TemporaryDirectory() as tmp:
            yield f"sqlite:///{tmp}/ledger-bench.db"
        return
    parsed = sa.make_url(url)
    if parsed.get_backend_name() != "postgresql":
        yield url
        return
    schema = f"ledger_bench_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(parsed)
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield parsed.update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(
            hide_password=False
        )
    finally:
        if not keep:
            with admin.begin() as conn:
                conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def timed(fn: Callable[[], object], repeats: int) -> dict[str, float]:
    """Median and p95 wall time of ``fn`` in milliseconds (one warm-up call first)."""
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1e3)
    return {"p50_ms": percentile(times, 50) or 0.0, "p95_ms": percentile(times, 95) or 0.0}


def run(url: str, rows: int, repeats: int, seed: int) -> dict[str, Any]:
    now = time.time()
    ledger = Ledger(url, queue_size=rows + 1)
    ledger.start()
    try:
        records = list(synthetic_requests(rows, now, seed))
        task_ids = sorted({r.task_id for r in records if r.task_id is not None})
        attempts = sum(len(r.attempts) for r in records)
        started = time.perf_counter()
        for rec in records:
            ledger.record(rec)
        enqueue_s = time.perf_counter() - started
        if not ledger.flush(timeout=3600):
            raise RuntimeError("ledger did not flush")
        insert_s = time.perf_counter() - started
        health = ledger.health()
        if health["written"] != rows:
            raise RuntimeError(f"wrote {health['written']} of {rows}: {health}")

        reported = task_ids[::2]  # outcomes for half the tasks
        rng = random.Random(seed + 1)
        started = time.perf_counter()
        for task_id in reported:
            ledger.set_outcome(task_id, rng.random() < 0.85)
        outcome_s = time.perf_counter() - started

        reads = {
            "stats_all": timed(lambda: ledger.stats(None, None, now=now), repeats),
            "stats_1h": timed(lambda: ledger.stats(3600, None, now=now), repeats),
            "stats_24h_route": timed(lambda: ledger.stats(86400, "slm", now=now), repeats),
            "tasks_50": timed(lambda: ledger.tasks(50), repeats),
            "task_one": timed(lambda: ledger.task(task_ids[len(task_ids) // 2]), repeats),
        }
        summary = ledger.stats(None, None, now=now)
    finally:
        ledger.close()
    return {
        "backend": sa.make_url(url).get_backend_name(),
        "rows": rows,
        "attempts": attempts,
        "tasks": summary["tasks"],
        "outcomes": len(reported),
        "enqueue_per_s": rows / enqueue_s,
        "enqueue_us_per_record": enqueue_s / rows * 1e6,
        "insert_s": insert_s,
        "insert_rows_per_s": rows / insert_s,
        "outcome_upserts_per_s": len(reported) / outcome_s if outcome_s else None,
        "reads": reads,
        "repeats": repeats,
        "check": {
            "requests": summary["requests"],
            "success_rate": summary["success_rate"],
            "cps_usd": summary["cps_usd"],
        },
    }


def report(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        f"machine: {m['cpu']}, {m['cores']} cores ({m['cores_available']} available)",
        f"{result['backend']}: {result['rows']} requests, {result['attempts']} attempts, "
        f"{result['tasks']} tasks, {result['outcomes']} reported outcomes",
        f"insert: {result['insert_rows_per_s']:.0f} requests/s through the writer "
        f"({result['insert_s']:.1f} s; record() {result['enqueue_us_per_record']:.1f} µs each)",
        f"set_outcome: {result['outcome_upserts_per_s']:.0f}/s",
    ]
    for name, t in result["reads"].items():
        lines.append(f"{name:16s} p50 {t['p50_ms']:8.1f} ms   p95 {t['p95_ms']:8.1f} ms")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="slmgate bench ledger", description=__doc__)
    p.add_argument("--rows", type=int, default=100_000, help="synthetic requests to write")
    p.add_argument("--url", default=None, help="database URL (default: a temp SQLite file)")
    p.add_argument("--repeats", type=int, default=9, help="timed calls per read")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", action="store_true", help="keep the PostgreSQL bench schema")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)
    if args.rows < 1 or args.repeats < 1:
        p.error("--rows and --repeats must be >= 1")
    with isolated_url(args.url, args.keep) as url:
        result = run(url, args.rows, args.repeats, args.seed)
    result["machine"] = machine()
    print(json.dumps(result, indent=2) if args.json else report(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
