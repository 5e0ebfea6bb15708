"""The ledger against SQLite (a temp file) and the local PostgreSQL (a fresh schema per test).

Covers round trips, task outcomes (reported before or after the requests, inferred), every stats
field on a hand-built dataset with known answers, listings, calibration rows, and failure paths:
the database down at start, down mid-run (a TCP proxy in front of PostgreSQL is cut), a table
dropped under the writer, a full queue, duplicate ids. None of them may raise on ``record``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest.mock import patch

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError

from router.ledger import Ledger, LedgerUnavailable, batch_rows, records_from_task
from router.records import AttemptRecord, RequestRecord
from tests import postgres
from tests.postgres import pg_schema

STATS_KEYS = {
    "object", "window", "route", "requests", "errors", "tasks", "tasks_with_outcome",
    "cps_basis", "outcomes", "successful_tasks", "success_rate", "cost_usd", "cps_usd",
    "counterfactual_cost_usd",
    "savings_usd", "schema_validity_rate", "executable_call_rate", "fallback_rate",
    "fallback_reasons", "latency_s", "ttft_s", "by_tier", "speculation", "energy", "series",
    "verified_escalation", "by_key",
}  # fmt: skip
SERIES_KEYS = {"start", "end", "requests", "tasks", "successful_tasks", "cost_usd", "cps_usd",
               "success_rate"}  # fmt: skip


def _pg_reachable() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.db'}"
        return
    if not _pg_reachable():
        postgres.service_missing("PostgreSQL is not reachable at 127.0.0.1:5432")
    with pg_schema(prefix="ledger_test") as url:
        yield url


@pytest.fixture
def ledger(db_url: str) -> Iterator[Ledger]:
    led = Ledger(db_url)
    led.start()
    yield led
    led.close()


# ---- builders ---------------------------------------------------------------------------------


def att(request_id: str, no: int, tier: str, outcome: str = "accepted", **kw: Any) -> AttemptRecord:
    kw.setdefault("route", "auto")
    kw.setdefault("started_at", 0.0)
    return AttemptRecord(request_id=request_id, attempt_no=no, tier=tier,
                         backend=f"be-{tier}", model=f"model-{tier}", latency_s=0.1,
                         outcome=outcome, **kw)  # type: ignore[arg-type]  # fmt: skip


def req(
    request_id: str, created_at: float, attempts: list[AttemptRecord], **kw: Any
) -> RequestRecord:
    kw.setdefault("route", "auto")
    kw.setdefault("latency_s", 1.0)
    for a in attempts:
        a.route = kw["route"]
        a.started_at = a.started_at or created_at + 0.01 * a.attempt_no
    return RequestRecord(request_id=request_id, created_at=created_at, attempts=attempts,
                         cost_usd=sum(a.cost_usd for a in attempts), **kw)  # fmt: skip


def dataset() -> list[RequestRecord]:
    """The literal dataset of the stats tests; expected values are worked out in the tests."""
    return [
        req("a1", 910.0, [att("a1", 0, "slm", prompt_tokens=100, completion_tokens=10,
                              cost_usd=0.001, compute_s=0.25, spec_drafted=10,
                              spec_accepted=6, spec_steps=4,
                              energy_j=2.0, energy_measured=True,
                              signals={"mean_entropy": 0.2}, confidence=0.9)],
            task_id="A", latency_s=1.0, ttft_s=0.1, schema_valid=True, tier="slm",
            counterfactual_cost_usd=0.01),
        req("a2", 920.0, [att("a2", 0, "slm", "escalated", prompt_tokens=100,
                              completion_tokens=20, cost_usd=0.001, fallback_reason="invalid",
                              energy_j=1.0, energy_measured=True, confidence=0.3),
                          att("a2", 1, "llm", prompt_tokens=100, completion_tokens=20,
                              cost_usd=0.02, confidence=0.8, hint_mode="verified",
                              hint_drafted=16, hint_reused=12)],
            task_id="A", latency_s=3.0, ttft_s=0.3, schema_valid=True, fallback=True,
            fallback_reason="invalid", tier="llm", counterfactual_cost_usd=0.02),
        req("b1", 930.0, [att("b1", 0, "slm", prompt_tokens=50, completion_tokens=5,
                              cost_usd=0.0005, energy_j=1.5, energy_measured=False,
                              signals={"mean_entropy": 0.4}, confidence=0.7)],
            task_id="B", route="tools", latency_s=2.0, executable=True, tier="slm",
            counterfactual_cost_usd=0.005),
        req("b2", 940.0, [att("b2", 0, "slm", "error", error="upstream 500")],
            task_id="B", latency_s=5.0, ttft_s=0.5, status=500, error_type="server_error"),
        req("c1", 950.0, [att("c1", 0, "slm", "escalated", prompt_tokens=80, completion_tokens=8,
                              cost_usd=0.0008, fallback_reason="low_confidence", confidence=0.1),
                          att("c1", 1, "llm", prompt_tokens=80, completion_tokens=8,
                              cost_usd=0.016, spec_drafted=20, spec_accepted=15, spec_steps=5,
                              hint_mode="regenerated", signals={"mean_entropy": 0.1},
                              confidence=0.95)],
            latency_s=4.0, ttft_s=0.2, schema_valid=True, executable=False, fallback=True,
            fallback_reason="low_confidence", tier="llm", counterfactual_cost_usd=0.016),
        req("d1", 850.0, [att("d1", 0, "slm", prompt_tokens=10, completion_tokens=1,
                              cost_usd=0.003)],
            task_id="D", latency_s=10.0, tier="slm", counterfactual_cost_usd=0.006),
        req("d2", 960.0, [att("d2", 0, "slm", prompt_tokens=30, completion_tokens=3,
                              cost_usd=0.002)],
            task_id="D", latency_s=0.5, ttft_s=0.05, schema_valid=False, tier="slm",
            counterfactual_cost_usd=0.004),
    ]  # fmt: skip


def load(ledger: Ledger, records: list[RequestRecord]) -> None:
    for r in records:
        ledger.record(r)
    assert ledger.flush(30)
    assert ledger.health()["written"] >= len(records)


def load_dataset(ledger: Ledger) -> None:
    load(ledger, dataset())
    assert ledger.set_outcome("A", False) is True  # overrides an inferred success
    # overrides an inferred failure (executable False)
    assert ledger.set_outcome("c1", True, score=0.9) is True
    assert ledger.set_outcome("E", True) is False  # a task with no requests: unknown, not stored


def assert_close(actual: Any, expected: Any, path: str = "") -> None:
    """Deep equality with float tolerance (sums of costs)."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict), path
        assert set(actual) == set(expected), f"{path}: {sorted(actual)} != {sorted(expected)}"
        for key in expected:
            assert_close(actual[key], expected[key], f"{path}.{key}")
    elif isinstance(expected, list):
        assert isinstance(actual, list), path
        assert len(actual) == len(expected), path
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_close(a, e, f"{path}[{i}]")
    elif isinstance(expected, float) and not isinstance(expected, bool):
        assert isinstance(actual, float), f"{path}: {actual!r} is not a float"
        assert math.isclose(actual, expected, rel_tol=1e-9, abs_tol=1e-12), (
            f"{path}: {actual} != {expected}"
        )
    else:
        assert type(actual) is type(expected), f"{path}: {actual!r} vs {expected!r}"
        assert actual == expected, f"{path}: {actual!r} != {expected!r}"


# ---- round trip and tasks ---------------------------------------------------------------------


def test_rows_round_trip(ledger: Ledger) -> None:
    records = dataset()
    load(ledger, records)
    for task_id, ids in {
        "A": ["a1", "a2"],
        "B": ["b1", "b2"],
        "c1": ["c1"],
        "D": ["d1", "d2"],
    }.items():
        task = ledger.task(task_id)
        assert task is not None
        assert [r["request_id"] for r in task["requests"]] == sorted(
            ids, key=lambda i: next(r.created_at for r in records if r.request_id == i)
        )
        for got in records_from_task(task):
            original = next(r for r in records if r.request_id == got.request_id)
            expected = dataclasses.replace(original, task_id=task_id, attempts=[
                dataclasses.replace(a, task_id=task_id) for a in original.attempts
            ])  # fmt: skip
            assert got == expected
        for r in task["requests"]:
            assert all(a["request_id"] == r["request_id"] for a in r["attempts"])
            assert [a["attempt_no"] for a in r["attempts"]] == list(range(len(r["attempts"])))
            assert (
                r["succeeded"]
                is next(x for x in records if x.request_id == r["request_id"]).succeeded
            )
    c1 = ledger.task("c1")
    assert c1 is not None
    assert c1["requests"][0]["attempts"][1]["signals"] == {"mean_entropy": 0.1}
    assert ledger.task("nope") is None


def test_request_without_task_id_is_its_own_task(ledger: Ledger) -> None:
    load(ledger, [req("solo", 1.0, [att("solo", 0, "slm", cost_usd=0.5)], expects_json=True,
                      schema_valid=True)])  # fmt: skip
    task = ledger.task("solo")
    assert task is not None
    assert task["created_at"] == 1.0
    assert task["success"] is True
    assert task["outcome_source"] == "inferred"
    assert task["requests"][0]["task_id"] == "solo"


@pytest.mark.parametrize(
    ("kwargs", "success"),
    [
        ({}, True),
        ({"status": 500}, False),
        ({"status": 429}, False),
        ({"schema_valid": False}, False),
        ({"executable": False}, False),
        ({"schema_valid": True, "executable": True}, True),
    ],
)
def test_inferred_success_needs_every_request_to_succeed(
    ledger: Ledger, kwargs: dict[str, Any], success: bool
) -> None:
    """A task with a checked request (here a JSON one) is inferred from all its requests."""
    load(ledger, [req("ok", 1.0, [att("ok", 0, "slm")], task_id="T", expects_json=True,
                      schema_valid=True),
                  req("x", 2.0, [att("x", 0, "slm")], task_id="T", **kwargs)])  # fmt: skip
    task = ledger.task("T")
    assert task is not None
    assert (task["success"], task["outcome_source"]) == (success, "inferred")
    listed = ledger.tasks()
    assert [(t["task_id"], t["success"], t["outcome_source"]) for t in listed] == [
        ("T", success, "inferred")
    ]


@pytest.mark.parametrize(
    "kwargs", [{}, {"status": 500}, {"status": 504, "error_type": "timeout"}, {"stream": True}]
)
def test_free_text_tasks_are_unknown_until_reported(ledger: Ledger, kwargs: dict[str, Any]) -> None:
    """No schema, no tools: a 200 is not a success (nor an error a failure) by inference."""
    load(ledger, [req("f1", 1.0, [att("f1", 0, "slm", cost_usd=0.25)], task_id="T"),
                  req("f2", 2.0, [att("f2", 0, "slm", cost_usd=0.5)], task_id="T",
                      **kwargs)])  # fmt: skip
    task = ledger.task("T")
    assert task is not None
    assert (task["success"], task["outcome_source"]) == (None, None)
    (listed,) = ledger.tasks()
    assert (listed["success"], listed["outcome_source"], listed["cost_usd"]) == (None, None, 0.75)
    stats = ledger.stats(None, None, now=10.0)
    assert (stats["tasks"], stats["successful_tasks"], stats["cps_basis"]) == (1, 0, "inferred")
    assert stats["outcomes"]["unknown"] == {"tasks": 1, "cost_usd": 0.75}
    assert stats["outcomes"]["inferred"]["tasks"] == 0
    assert ledger.set_outcome("T", True) is True
    stats = ledger.stats(None, None, now=10.0)
    assert (stats["cps_basis"], stats["cps_usd"], stats["success_rate"]) == ("reported", 0.75, 1.0)
    assert stats["outcomes"]["unknown"] == {"tasks": 0, "cost_usd": 0.0}


def test_a_checked_request_makes_a_free_text_task_inferable(ledger: Ledger) -> None:
    load(ledger, [req("f1", 1.0, [att("f1", 0, "slm")], task_id="T")])
    assert ledger.tasks()[0]["outcome_source"] is None
    load(ledger, [req("t1", 2.0, [att("t1", 0, "slm")], task_id="T", expects_tools=True,
                      executable=True)])  # fmt: skip
    assert (ledger.tasks()[0]["success"], ledger.tasks()[0]["outcome_source"]) == (
        True, "inferred")  # fmt: skip


def test_outcome_for_an_unknown_task_is_refused(ledger: Ledger) -> None:
    assert ledger.set_outcome("never-seen", False, score=0.25) is False
    assert ledger.task("never-seen") is None  # nothing stored
    assert ledger.tasks() == []
    assert ledger.stats(None, None, now=100.0)["tasks"] == 0
    load(ledger, [req("r1", 5.0, [att("r1", 0, "slm", cost_usd=0.1)], task_id="T")])
    assert ledger.set_outcome("r1", True) is False  # a request id is not a task id here
    assert ledger.set_outcome("T", False, score=0.25) is True


def test_outcome_for_a_task_still_in_the_queue_is_kept(db_url: str) -> None:
    """Posted right after the request, before the writer ran: stored ahead, kept on landing."""
    led = Ledger(db_url)
    try:
        led.record(req("r1", 5.0, [att("r1", 0, "slm", cost_usd=0.1)], task_id="T",
                       expects_json=True, schema_valid=True))  # fmt: skip
        assert led.health()["queued"] == 1  # the writer has not started
        assert led.set_outcome("T", False, score=0.25) is True
        assert led.tasks() == []  # no request written yet: not listed, not counted
        assert led.task("T") is None
        led.start()
        assert led.flush(30)
        task = led.task("T")
        assert task is not None
        assert (task["success"], task["outcome_source"], task["score"]) == (
            False, "reported", 0.25)  # fmt: skip
        assert task["created_at"] == 5.0
        listed = led.tasks()
        assert (listed[0]["success"], listed[0]["outcome_source"]) == (False, "reported")
        stats = led.stats(None, None, now=100.0)
        assert (stats["tasks"], stats["tasks_with_outcome"], stats["successful_tasks"]) == (
            1, 1, 0)  # fmt: skip
    finally:
        led.close()


def test_outcome_after_requests_overrides_inference_and_sticks(ledger: Ledger) -> None:
    load(ledger, [req("r1", 5.0, [att("r1", 0, "slm")], task_id="T", status=500,
                      expects_json=True)])  # fmt: skip
    assert ledger.tasks()[0]["success"] is False
    ledger.set_outcome("T", True)
    assert ledger.tasks()[0]["success"] is True
    # a later failing request does not overturn a reported outcome …
    load(ledger, [req("r2", 6.0, [att("r2", 0, "slm")], task_id="T", status=500)])
    task = ledger.task("T")
    assert task is not None
    assert (task["success"], task["outcome_source"]) == (True, "reported")
    # … but a new report does
    ledger.set_outcome("T", False)
    assert ledger.tasks()[0]["success"] is False


def test_task_totals_accumulate_across_batches(ledger: Ledger) -> None:
    load(ledger, [req("late", 20.0, [att("late", 0, "slm", cost_usd=0.2)], task_id="T",
                      route="second")])  # fmt: skip
    load(ledger, [req("early", 10.0, [att("early", 0, "slm", cost_usd=0.1),
                                      att("early", 1, "llm", cost_usd=0.4)],
                      task_id="T", route="first", fallback=True),
                  req("mid", 15.0, [att("mid", 0, "slm", cost_usd=0.05)], task_id="T",
                      route="first")])  # fmt: skip
    (listed,) = ledger.tasks()
    assert_close(listed, {
        "task_id": "T", "created_at": 10.0, "requests": 3, "cost_usd": 0.75, "success": None,
        "outcome_source": None, "tiers": ["slm", "llm"], "fallbacks": 1, "route": "first",
    })  # fmt: skip


def test_tasks_listing_newest_first_with_filters(ledger: Ledger) -> None:
    load_dataset(ledger)
    listed = ledger.tasks(now=1000.0)
    assert [t["task_id"] for t in listed] == ["c1", "B", "A", "D"]
    assert_close(listed[0], {
        "task_id": "c1", "created_at": 950.0, "requests": 1, "cost_usd": 0.0168,
        "success": True, "outcome_source": "reported", "tiers": ["slm", "llm"],
        "fallbacks": 1, "route": "auto",
    })  # fmt: skip
    assert_close(listed[1], {
        "task_id": "B", "created_at": 930.0, "requests": 2, "cost_usd": 0.0005,
        "success": False, "outcome_source": "inferred", "tiers": ["slm"], "fallbacks": 0,
        "route": "tools",
    })  # fmt: skip
    assert [t["task_id"] for t in ledger.tasks(limit=2)] == ["c1", "B"]
    assert [t["task_id"] for t in ledger.tasks(route="tools")] == ["B"]
    assert [t["task_id"] for t in ledger.tasks(route="auto")] == ["c1", "B", "A", "D"]
    assert [t["task_id"] for t in ledger.tasks(window_s=100, now=1000.0)] == ["c1", "B", "A"]
    assert [t["task_id"] for t in ledger.tasks(window_s=60, now=1000.0)] == ["c1"]


def test_batch_rows_pre_aggregate_each_task_once() -> None:
    rows = batch_rows([
        req("r2", 20.0, [att("r2", 0, "slm", cost_usd=0.2)], task_id="T", route="late"),
        req("r1", 10.0, [att("r1", 0, "slm", cost_usd=0.1), att("r1", 1, "llm", cost_usd=1.0)],
            task_id="T", route="early", fallback=True, expects_json=True, schema_valid=True),
        req("r3", 30.0, [], status=500),
        req("r4", 40.0, [], status=500, expects_tools=True),
    ])  # fmt: skip
    requests, attempts, tasks = rows
    assert [r["task_id"] for r in requests] == ["T", "T", "r3", "r4"]
    assert [(a["request_id"], a["attempt_no"], a["task_id"]) for a in attempts] == [
        ("r2", 0, "T"), ("r1", 0, "T"), ("r1", 1, "T")
    ]  # fmt: skip
    assert [t["task_id"] for t in tasks] == ["T", "r3", "r4"]  # sorted: one lock order
    t, r3, r4 = tasks
    assert (t["created_at"], t["route"], t["requests"], t["fallbacks"]) == (10.0, "early", 2, 1)
    assert t["cost_usd"] == pytest.approx(1.3)
    assert (t["failed_requests"], t["checked_requests"]) == (0, 1)
    assert (t["success"], t["outcome_source"]) == (True, "inferred")
    # free text: a failed request proves nothing either way
    assert (r3["failed_requests"], r3["checked_requests"], r3["cost_usd"]) == (1, 0, 0.0)
    assert (r3["success"], r3["outcome_source"]) == (None, None)
    assert (r4["success"], r4["outcome_source"]) == (False, "inferred")


def test_concurrent_writers_and_outcomes_keep_totals(ledger: Ledger) -> None:
    def produce(worker: int) -> None:
        for i in range(100):
            rid = f"w{worker}-{i}"
            ledger.record(req(rid, float(i), [att(rid, 0, "slm", cost_usd=0.01)],
                              task_id=f"T{i % 10}"))  # fmt: skip
            if i % 25 == 0:
                ledger.set_outcome(f"T{i % 10}", True)

    threads = [threading.Thread(target=produce, args=(w,)) for w in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert ledger.flush(60)
    assert ledger.health()["written"] == 400
    listed = {t["task_id"]: t for t in ledger.tasks(limit=100)}
    assert sorted(listed) == [f"T{k}" for k in range(10)]
    assert all(t["requests"] == 40 for t in listed.values())
    assert sum(t["cost_usd"] for t in listed.values()) == pytest.approx(4.0)
    assert {k for k, t in listed.items() if t["outcome_source"] == "reported"} == {"T0", "T5"}
    assert ledger.stats(None, None, now=1000.0)["requests"] == 400


# ---- stats ------------------------------------------------------------------------------------


def test_stats_window_every_field(ledger: Ledger) -> None:
    load_dataset(ledger)
    stats = ledger.stats(window_s=100, route=None, buckets=4, now=1000.0)
    assert set(stats) == STATS_KEYS
    expected = {
        "object": "slmgate.stats",
        "window": {"start": 900.0, "end": 1000.0, "seconds": 100.0},
        "route": None,
        "requests": 6,  # a1 a2 b1 b2 c1 d2 (d1 is before the window)
        "errors": 1,  # b2
        "tasks": 3,  # A B c1 (D started before the window; E has no requests)
        "tasks_with_outcome": 2,  # A (reported False), c1 (reported True)
        "cps_basis": "reported",  # the window has reported outcomes: they are the headline
        "successful_tasks": 1,  # c1
        "success_rate": 0.5,  # c1 of A and c1
        "cps_usd": 0.0388,  # (A 0.022 + c1 0.0168) / 1
        "outcomes": {
            "reported": {"tasks": 2, "successful_tasks": 1, "cost_usd": 0.0388,
                         "success_rate": 0.5, "cps_usd": 0.0388},
            # B: b1's tool call checked and executable, b2 a 500: inferred failure
            "inferred": {"tasks": 1, "successful_tasks": 0, "cost_usd": 0.0005,
                         "success_rate": 0.0, "cps_usd": None},
            "combined": {"tasks": 3, "successful_tasks": 1, "cost_usd": 0.0393,
                         "success_rate": 1 / 3, "cps_usd": 0.0393},
            "unknown": {"tasks": 0, "cost_usd": 0.0},
        },
        "cost_usd": 0.0413,  # every attempt of the 6 requests
        "counterfactual_cost_usd": 0.055,
        "savings_usd": 0.055 - 0.0413,
        "schema_validity_rate": 0.75,  # a1 a2 c1 valid, d2 not
        "executable_call_rate": 0.5,  # b1 yes, c1 no
        "fallback_rate": 2 / 6,
        "fallback_reasons": {"invalid": 1, "low_confidence": 1},
        "latency_s": {"p50": 2.5, "p95": 4.75},  # [0.5 1 2 3 4 5]
        "ttft_s": {"p50": 0.2, "p95": 0.46},  # [0.05 0.1 0.2 0.3 0.5]
        "by_tier": {
            "slm": {"attempts": 6, "answered": 3, "prompt_tokens": 360,
                    "completion_tokens": 46, "cost_usd": 0.0053},
            "llm": {"attempts": 2, "answered": 2, "prompt_tokens": 180,
                    "completion_tokens": 28, "cost_usd": 0.036},
        },
        "by_key": [],  # no request came in with a key record
        "speculation": {"drafted": 30, "accepted": 21, "steps": 9, "acceptance_rate": 0.7,
                        "mean_accepted_length": 21 / 9},
        # a2's LLM verified the SLM's answer (12 of its 20 tokens reused); c1's regenerated
        "verified_escalation": {"verified": 1, "regenerated": 1, "drafted_tokens": 16,
                                "reused_tokens": 12, "reused_share": 0.6},
        "energy": {"joules": 4.5, "joules_per_request": 1.5, "measured": False},
        "series": [  # tasks on the headline basis (reported): B is not in it
            {"start": 900.0, "end": 925.0, "requests": 2, "tasks": 1, "successful_tasks": 0,
             "cost_usd": 0.022, "cps_usd": None, "success_rate": 0.0},
            {"start": 925.0, "end": 950.0, "requests": 2, "tasks": 0, "successful_tasks": 0,
             "cost_usd": 0.0, "cps_usd": None, "success_rate": None},
            {"start": 950.0, "end": 975.0, "requests": 2, "tasks": 1, "successful_tasks": 1,
             "cost_usd": 0.0168, "cps_usd": 0.0168, "success_rate": 1.0},
            {"start": 975.0, "end": 1000.0, "requests": 0, "tasks": 0, "successful_tasks": 0,
             "cost_usd": 0.0, "cps_usd": None, "success_rate": None},
        ],
    }  # fmt: skip
    assert_close(stats, expected)
    assert all(set(row) == SERIES_KEYS for row in stats["series"])


def test_stats_route_filter(ledger: Ledger) -> None:
    load_dataset(ledger)
    auto = ledger.stats(window_s=100, route="auto", buckets=4, now=1000.0)
    assert auto["route"] == "auto"
    assert (auto["requests"], auto["errors"]) == (5, 1)  # b1 is on "tools"; b2 on "auto"
    # B counts for "auto" through b2, its whole cost included
    assert (auto["tasks"], auto["successful_tasks"], auto["cps_basis"]) == (3, 1, "reported")
    assert auto["cps_usd"] == pytest.approx(0.0388)
    assert auto["outcomes"]["inferred"]["tasks"] == 1  # B
    assert auto["cost_usd"] == pytest.approx(0.0408)  # 0.0413 without b1's 0.0005
    assert auto["executable_call_rate"] == 0.0  # only c1 (False) is on "auto"
    assert auto["by_tier"]["slm"]["attempts"] == 5
    assert auto["energy"] == {"joules": 3.0, "joules_per_request": 1.5, "measured": True}

    tools = ledger.stats(window_s=100, route="tools", buckets=4, now=1000.0)
    assert tools["cps_basis"] == "inferred"  # B alone: nothing reported on this route
    assert_close({k: tools[k] for k in ("requests", "errors", "tasks", "successful_tasks",
                                        "cost_usd", "cps_usd", "success_rate", "fallback_rate",
                                        "schema_validity_rate", "executable_call_rate")},
                 {"requests": 1, "errors": 0, "tasks": 1, "successful_tasks": 0,
                  "cost_usd": 0.0005, "cps_usd": None, "success_rate": 0.0,
                  "fallback_rate": 0.0, "schema_validity_rate": None,
                  "executable_call_rate": 1.0})  # fmt: skip
    assert tools["latency_s"] == {"p50": 2.0, "p95": 2.0}
    assert tools["ttft_s"] == {"p50": None, "p95": None}
    assert [row["requests"] for row in tools["series"]] == [0, 1, 0, 0]
    assert [row["tasks"] for row in tools["series"]] == [0, 1, 0, 0]

    none = ledger.stats(window_s=100, route="nope", buckets=2, now=1000.0)
    assert (none["requests"], none["tasks"], none["cost_usd"]) == (0, 0, 0.0)
    assert none["success_rate"] is None
    assert none["cps_usd"] is None
    assert none["by_tier"] == {}
    assert none["fallback_reasons"] == {}
    assert none["energy"] == {"joules": 0.0, "joules_per_request": None, "measured": None}
    assert [row["requests"] for row in none["series"]] == [0, 0]


def test_stats_all_data_series_over_the_data_span(ledger: Ledger) -> None:
    load_dataset(ledger)
    stats = ledger.stats(window_s=None, route=None, buckets=2, now=1000.0)
    assert stats["window"] == {"start": None, "end": 1000.0, "seconds": None}
    assert (stats["requests"], stats["tasks"], stats["successful_tasks"]) == (7, 4, 1)
    assert stats["cps_usd"] == pytest.approx(0.0388)  # reported: A and c1
    # D (inferred failure: d2's JSON invalid) adds its cost to the inferred figures only
    assert stats["outcomes"]["inferred"]["cost_usd"] == pytest.approx(0.0005 + 0.005)
    assert stats["outcomes"]["combined"]["cps_usd"] == pytest.approx(0.0393 + 0.005)
    assert stats["latency_s"]["p50"] == 3.0  # [0.5 1 2 3 4 5 10]
    assert stats["cost_usd"] == pytest.approx(0.0443)  # + d1's 0.003
    slm = {"attempts": 7, "answered": 4, "prompt_tokens": 370, "completion_tokens": 47,
           "cost_usd": 0.0083}  # fmt: skip
    assert_close(stats["by_tier"]["slm"], slm)
    assert stats["by_tier"]["llm"]["attempts"] == 2
    series = stats["series"]
    assert [(row["start"], row["end"]) for row in series] == [(850.0, 905.0), (905.0, 960.0)]
    assert [row["requests"] for row in series] == [1, 6]
    assert [row["tasks"] for row in series] == [0, 2]  # reported tasks A and c1
    assert series[0]["cost_usd"] == 0.0
    assert series[1]["cps_usd"] == pytest.approx(0.0388)


def test_stats_empty_ledger(ledger: Ledger) -> None:
    stats = ledger.stats(None, None, now=10.0)
    assert set(stats) == STATS_KEYS
    assert stats["series"] == []
    assert (stats["requests"], stats["tasks"], stats["cost_usd"]) == (0, 0, 0.0)
    assert (stats["cps_basis"], stats["cps_usd"], stats["savings_usd"]) == ("inferred", None, None)
    assert stats["latency_s"] == {"p50": None, "p95": None}
    assert stats["speculation"]["acceptance_rate"] is None
    assert stats["verified_escalation"]["reused_share"] is None
    windowed = ledger.stats(60, None, buckets=3, now=10.0)
    assert [(r["start"], r["end"], r["requests"]) for r in windowed["series"]] == [
        (-50.0, -30.0, 0), (-30.0, -10.0, 0), (-10.0, 10.0, 0)
    ]  # fmt: skip


def test_stats_single_instant_goes_to_one_bucket(ledger: Ledger) -> None:
    load(ledger, [req("x", 5.0, [att("x", 0, "slm")], expects_json=True),
                  req("y", 5.0, [att("y", 0, "slm")], expects_json=True)])  # fmt: skip
    series = ledger.stats(None, None, buckets=3, now=10.0)["series"]
    assert [row["requests"] for row in series] == [2, 0, 0]
    assert [row["tasks"] for row in series] == [2, 0, 0]


def test_calibration_rows(ledger: Ledger) -> None:
    load_dataset(ledger)

    def rows(route: str | None, tier: str, **kw: Any) -> list[tuple[Any, ...]]:
        found = ledger.calibration_rows(route, tier, **kw)
        assert all(kind in ("text", "json", "tools") for *_, kind in found)
        return [row[:3] for row in found]

    # accepted slm attempts: a1 (task A reported False), b1 (B inferred: excluded), d1/d2 (D
    # inferred: excluded); c1's slm attempt escalated (excluded)
    assert rows(None, "slm") == [({"mean_entropy": 0.2}, 0.9, False)]
    assert rows(None, "llm") == [
        ({}, 0.8, False),  # a2 → A reported False
        ({"mean_entropy": 0.1}, 0.95, True),  # c1 reported True
    ]
    assert rows("tools", "slm") == []
    assert rows("auto", "llm", window_s=60, now=1000.0) == [({"mean_entropy": 0.1}, 0.95, True)]
    kinds = {kind for *_, kind in ledger.calibration_rows(None, "llm")}
    assert kinds <= {"tools", "json", "text"}
    assert kinds


# ---- failure paths ----------------------------------------------------------------------------


class TcpProxy:
    """A TCP forwarder that can be cut (listener closed, live connections reset) and restored:
    a real network outage between the ledger and PostgreSQL."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []

    def up(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen()
        listener.settimeout(0.05)
        self._listener = listener
        self._spawn(self._accept, listener)

    def down(self) -> None:
        listener, self._listener = self._listener, None
        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        for t in self._threads:
            t.join(5)
        self._threads = []
        if listener is not None:
            listener.close()

    def _spawn(self, fn: Any, *args: Any) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True)
        self._threads.append(t)
        t.start()

    def _accept(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._socks += [client, upstream]
            self._spawn(self._pump, client, upstream)
            self._spawn(self._pump, upstream, client)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_RDWR)


class Outage:
    """Switches a database off and on: a missing directory for SQLite, a cut proxy for PG."""

    def __init__(self, backend: str, tmp_path: Path, stack: contextlib.ExitStack) -> None:
        self.backend = backend
        if backend == "sqlite":
            self._dir = tmp_path / "later"
            self.url = f"sqlite:///{self._dir / 'ledger.db'}"
        else:
            if not _pg_reachable():
                postgres.service_missing("PostgreSQL is not reachable at 127.0.0.1:5432")
            schema_url = sa.make_url(stack.enter_context(pg_schema(prefix="ledger_test")))
            self.proxy = TcpProxy(("127.0.0.1", 5432))
            stack.callback(self.proxy.down)
            self.url = schema_url.set(port=self.proxy.port).render_as_string(hide_password=False)

    def up(self) -> None:
        if self.backend == "sqlite":
            self._dir.mkdir(exist_ok=True)
        else:
            self.proxy.up()

    def down(self) -> None:
        self.proxy.down()


@pytest.fixture(params=["sqlite", "postgresql"])
def outage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Outage]:
    with contextlib.ExitStack() as stack:
        yield Outage(request.param, tmp_path, stack)


def one(rid: str, t: float = 1.0) -> RequestRecord:
    return req(rid, t, [att(rid, 0, "slm", cost_usd=0.01)], task_id="T")


def test_database_down_at_start_then_back(outage: Outage) -> None:
    failures: list[BaseException] = []
    drops: list[tuple[int, str]] = []
    led = Ledger(outage.url, on_failure=failures.append, retries=1, backoff_s=0.0,
                 on_drop=lambda n, reason: drops.append((n, reason)))  # fmt: skip
    try:
        led.start()  # must not raise
        led.record(one("r1"))  # returns, never raises
        assert led.flush(30)
        health = led.health()
        assert health["ok"] is False
        assert health["written"] == 0
        assert (health["dropped"], health["dropped_write_failed"]) == (1, 1)
        assert drops == [(1, "write_failed")]
        assert health["write_failures"] >= 2  # start's create_all + both write tries
        assert health["last_error"]
        assert failures
        assert all(isinstance(e, SQLAlchemyError) for e in failures)
        with pytest.raises(LedgerUnavailable):
            led.set_outcome("T", True)
        with pytest.raises(LedgerUnavailable):
            led.stats(None, None)
        with pytest.raises(LedgerUnavailable):
            led.tasks()

        outage.up()
        led.record(one("r2"))
        assert led.flush(30)
        health = led.health()
        assert (health["ok"], health["written"], health["dropped"]) == (True, 1, 1)
        led.set_outcome("T", True)
        task = led.task("T")
        assert task is not None
        assert [r["request_id"] for r in task["requests"]] == ["r2"]
        assert (task["success"], task["outcome_source"]) == (True, "reported")
    finally:
        led.close()


def test_postgres_outage_mid_run_and_recovery(tmp_path: Path) -> None:
    """PostgreSQL only: an open SQLite file cannot be taken away (see the down-at-start test)."""
    with contextlib.ExitStack() as stack:
        outage = Outage("postgresql", tmp_path, stack)
        outage.up()
        _outage_mid_run(outage)


def _health_without_the_database(led: Ledger) -> dict[str, Any]:
    """``health()`` with every way to the database cut: it must answer from memory."""
    engine = led._engine  # the ledger's one pool
    with (
        patch.object(engine, "connect", side_effect=AssertionError("health() used the db")),
        patch.object(engine, "begin", side_effect=AssertionError("health() used the db")),
    ):
        return led.health()


def _outage_mid_run(outage: Outage) -> None:
    failures: list[BaseException] = []
    drops: list[tuple[int, str]] = []
    led = Ledger(outage.url, on_failure=failures.append, retries=2, backoff_s=0.01,
                 on_drop=lambda n, reason: drops.append((n, reason)))  # fmt: skip
    try:
        led.start()
        led.record(one("r1"))
        assert led.flush(30)
        assert led.health()["written"] == 1

        outage.down()
        for i in range(3):
            led.record(one(f"lost{i}", 2.0))  # returns, never raises
        assert led.flush(60)
        health = _health_without_the_database(led)
        assert health["ok"] is False
        assert health["written"] == 1
        assert (health["dropped"], health["dropped_write_failed"]) == (3, 3)
        # one call per given-up batch: how the three were batched is the writer's business
        assert sum(n for n, _ in drops) == 3
        assert {reason for _, reason in drops} == {"write_failed"}
        assert health["write_failures"] >= 3  # the batch and its two retries
        assert len(failures) == health["write_failures"]
        with pytest.raises(LedgerUnavailable):
            led.set_outcome("T", False)
        with pytest.raises(LedgerUnavailable):
            led.stats(None, None)

        outage.up()
        led.record(one("r2", 3.0))
        assert led.flush(30)
        assert led.health()["ok"] is True
        assert led.health()["written"] == 2
        task = led.task("T")
        assert task is not None
        assert [r["request_id"] for r in task["requests"]] == ["r1", "r2"]
        assert led.stats(None, None, now=10.0)["requests"] == 2
    finally:
        led.close()


def test_writer_recreates_a_dropped_table(db_url: str) -> None:
    led = Ledger(db_url, retries=2, backoff_s=0.0)
    led.start()
    try:
        load(led, [one("r1")])
        engine = sa.create_engine(db_url)
        with engine.begin() as conn:
            conn.execute(sa.text("DROP TABLE attempts"))
        engine.dispose()
        led.record(one("r2", 2.0))
        assert led.flush(30)
        health = led.health()
        assert health["write_failures"] == 1
        assert (health["written"], health["dropped"], health["ok"]) == (2, 0, True)
        task = led.task("T")
        assert task is not None
        assert [len(r["attempts"]) for r in task["requests"]] == [0, 1]  # r1's went with it
    finally:
        led.close()


def test_queue_full_drops_and_counts(db_url: str) -> None:
    drops: list[tuple[int, str]] = []
    led = Ledger(db_url, queue_size=3, on_drop=lambda n, reason: drops.append((n, reason)))
    try:
        for i in range(5):  # writer not started yet: the queue fills
            led.record(one(f"r{i}", float(i)))  # returns, never raises
        health = led.health()
        assert (health["dropped"], health["dropped_queue_full"], health["queued"]) == (2, 2, 3)
        assert drops == [(1, "queue_full"), (1, "queue_full")]
        led.start()
        assert led.flush(30)
        assert led.health()["written"] == 3
        task = led.task("T")
        assert task is not None
        assert [r["request_id"] for r in task["requests"]] == ["r0", "r1", "r2"]
    finally:
        led.close()


def test_duplicate_request_id_is_dropped_alone(db_url: str) -> None:
    led = Ledger(db_url)
    led.start()
    try:
        load(led, [one("r1")])
        led.record(one("r1", 5.0))  # already stored
        led.record(one("r2", 6.0))
        led.record(one("r2", 7.0))  # duplicate within the batch
        assert led.flush(30)
        health = led.health()
        assert (health["written"], health["dropped"]) == (2, 2)
        task = led.task("T")
        assert task is not None
        assert [(r["request_id"], r["created_at"]) for r in task["requests"]] == [
            ("r1", 1.0), ("r2", 6.0)
        ]  # fmt: skip
        assert led.tasks()[0]["requests"] == 2  # totals not double counted
    finally:
        led.close()


def test_close_flushes_and_later_records_are_dropped(db_url: str) -> None:
    led = Ledger(db_url)
    led.start()
    for i in range(20):
        led.record(one(f"r{i}", float(i)))
    led.close()
    assert led.health()["written"] == 20
    led.record(one("after"))  # returns, never raises
    assert led.health()["dropped"] == 1
    again = Ledger(db_url)
    again.start()
    try:
        assert again.stats(None, None, now=100.0)["requests"] == 20
    finally:
        again.close()


def test_on_failure_callback_errors_are_swallowed(tmp_path: Path) -> None:
    def boom(exc: BaseException) -> None:
        raise RuntimeError("metrics down too")

    led = Ledger(f"sqlite:///{tmp_path / 'missing' / 'x.db'}", on_failure=boom, retries=0)
    led.start()
    led.record(one("r1"))
    assert led.flush(30)
    assert led.health()["dropped"] == 1
    led.close()


def test_rejects_in_memory_sqlite_and_unknown_backends() -> None:
    with pytest.raises(ValueError, match="SQLite file"):
        Ledger("sqlite://")
    with pytest.raises(ValueError, match="unsupported"):
        Ledger("mysql+pymysql://u@localhost/db")


def test_set_outcome_rejects_empty_task_id(ledger: Ledger) -> None:
    with pytest.raises(ValueError, match="task_id"):
        ledger.set_outcome("", True)


def test_close_counts_unwritten_records_as_dropped(db_url: str) -> None:
    drops: list[tuple[int, str]] = []
    led = Ledger(db_url, on_drop=lambda n, reason: drops.append((n, reason)))
    for i in range(4):  # never started: nothing drains the queue
        led.record(one(f"r{i}", float(i)))
    led.close(timeout=0.0)
    assert (led.health()["dropped_write_failed"], led.health()["queued"]) == (4, 0)
    led.record(one("after"))
    assert drops == [(4, "write_failed"), (1, "queue_full")]


# ---- cost per success: reported, inferred and unknown kept apart ------------------------------


def split_dataset() -> list[RequestRecord]:
    """Two tasks of each kind: reported (R), inferred (I), unknown (U: free text)."""

    def one_task(task: str, t: float, cost: float, **kw: Any) -> RequestRecord:
        return req(task.lower(), t, [att(task.lower(), 0, "slm", cost_usd=cost)], task_id=task,
                   counterfactual_cost_usd=2 * cost, **kw)  # fmt: skip

    return [
        one_task("R1", 10.0, 0.01),  # free text, reported success below
        one_task("R2", 20.0, 0.02, expects_json=True, schema_valid=True),  # reported failure
        one_task("I1", 100.0, 0.003, expects_json=True, schema_valid=True),
        one_task("I2", 110.0, 0.004, expects_json=True, schema_valid=False),
        one_task("U1", 120.0, 0.005),
        one_task("U2", 130.0, 0.001, status=500),
    ]


def test_stats_keep_reported_inferred_and_unknown_apart(ledger: Ledger) -> None:
    load(ledger, split_dataset())
    assert ledger.set_outcome("R1", True) is True
    assert ledger.set_outcome("R2", False) is True
    stats = ledger.stats(None, None, buckets=1, now=200.0)
    assert_close({k: stats[k] for k in ("tasks", "tasks_with_outcome", "cps_basis",
                                        "successful_tasks", "success_rate", "cps_usd",
                                        "outcomes", "cost_usd")}, {
        "tasks": 6, "tasks_with_outcome": 2, "cps_basis": "reported",
        "successful_tasks": 1, "success_rate": 0.5, "cps_usd": 0.03,
        "outcomes": {
            "reported": {"tasks": 2, "successful_tasks": 1, "cost_usd": 0.03,
                         "success_rate": 0.5, "cps_usd": 0.03},
            "inferred": {"tasks": 2, "successful_tasks": 1, "cost_usd": 0.007,
                         "success_rate": 0.5, "cps_usd": 0.007},
            "combined": {"tasks": 4, "successful_tasks": 2, "cost_usd": 0.037,
                         "success_rate": 0.5, "cps_usd": 0.0185},
            "unknown": {"tasks": 2, "cost_usd": 0.006},
        },
        "cost_usd": 0.043,  # every task's cost, the unknown ones included
    })  # fmt: skip
    (row,) = stats["series"]  # the headline's basis: the reported tasks
    assert (row["tasks"], row["successful_tasks"]) == (2, 1)
    assert row["cps_usd"] == pytest.approx(0.03)

    # no reported outcome in the window: the inferred figures are the headline
    recent = ledger.stats(100, None, buckets=1, now=200.0)
    assert (recent["tasks"], recent["tasks_with_outcome"], recent["cps_basis"]) == (
        4, 0, "inferred")  # fmt: skip
    assert (recent["successful_tasks"], recent["success_rate"]) == (1, 0.5)
    assert recent["cps_usd"] == pytest.approx(0.007)
    assert recent["outcomes"]["reported"]["cps_usd"] is None
    assert recent["outcomes"]["unknown"]["tasks"] == 2
    assert [(r["tasks"], r["successful_tasks"]) for r in recent["series"]] == [(2, 1)]


def test_savings_only_against_a_priced_top_tier(ledger: Ledger) -> None:
    unpriced = req("u", 5.0, [att("u", 0, "slm", cost_usd=0.02)], counterfactual_cost_usd=0.0)
    load(ledger, [unpriced])
    stats = ledger.stats(None, None, now=10.0)
    assert (stats["cost_usd"], stats["counterfactual_cost_usd"]) == (0.02, 0.0)
    assert stats["savings_usd"] is None  # not -inf %: the top tier has no price
    load(ledger, [req("p", 6.0, [att("p", 0, "slm", cost_usd=0.01)],
                      counterfactual_cost_usd=0.05)])  # fmt: skip
    assert ledger.stats(None, None, now=10.0)["savings_usd"] == pytest.approx(0.05 - 0.03)


OLD_TASKS = """CREATE TABLE tasks (task_id VARCHAR PRIMARY KEY, created_at FLOAT, route VARCHAR,
success BOOLEAN, outcome_source VARCHAR, outcome_at FLOAT, score FLOAT,
requests INTEGER NOT NULL DEFAULT 0, failed_requests INTEGER NOT NULL DEFAULT 0,
fallbacks INTEGER NOT NULL DEFAULT 0, cost_usd FLOAT NOT NULL DEFAULT 0)"""


def test_an_older_ledger_is_upgraded_in_place(db_url: str) -> None:
    """A ledger written before tasks counted checked requests: the column is added, inferred
    outcomes are re-inferred under today's rule, reported ones are kept."""
    from router.ledger import metadata, tasks_table

    engine = sa.create_engine(db_url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(OLD_TASKS))
            metadata.create_all(conn, tables=[t for t in metadata.sorted_tables
                                              if t is not tasks_table])  # fmt: skip
    finally:
        engine.dispose()
    old = Ledger(db_url)
    try:
        rows = [
            req("f", 1.0, [att("f", 0, "slm")], task_id="FREE"),
            req("j", 2.0, [att("j", 0, "slm")], task_id="JSON", expects_json=True,
                schema_valid=True),
            req("r", 3.0, [att("r", 0, "slm")], task_id="REP"),
        ]  # fmt: skip
        request_rows, attempt_rows, _ = batch_rows(rows)
        engine = sa.create_engine(db_url)
        with engine.begin() as conn:  # as the old writer left them: every 200 a success
            conn.execute(sa.insert(metadata.tables["requests"]), request_rows)
            conn.execute(sa.insert(metadata.tables["attempts"]), attempt_rows)
            for task_id, t, source in (("FREE", 1.0, "inferred"), ("JSON", 2.0, "inferred"),
                                       ("REP", 3.0, "reported")):  # fmt: skip
                conn.execute(sa.text(
                    "INSERT INTO tasks (task_id, created_at, route, success, outcome_source, "
                    "requests, failed_requests, fallbacks, cost_usd) "
                    "VALUES (:id, :t, 'auto', :ok, :source, 1, 0, 0, 0.0)"),
                    {"id": task_id, "t": t, "ok": task_id != "REP", "source": source})  # fmt: skip
        engine.dispose()
        old.start()
        listed = {t["task_id"]: (t["success"], t["outcome_source"]) for t in old.tasks()}
        assert listed == {"FREE": (None, None), "JSON": (True, "inferred"),
                          "REP": (False, "reported")}  # fmt: skip
        load(old, [req("j2", 4.0, [att("j2", 0, "slm")], task_id="JSON", status=500)])
        json_task = old.task("JSON")
        assert json_task is not None
        assert (json_task["success"], json_task["outcome_source"]) == (False, "inferred")
    finally:
        old.close()


@pytest.mark.parametrize("column", ["compute_s", "grammar_engine"])
def test_an_older_attempts_table_gets_the_newer_columns(db_url: str, column: str) -> None:
    """A ledger written before attempts recorded compute or their grammar engine: the column is
    added in place, old rows read NULL (unknown), new rows keep their value."""
    from router.ledger import metadata

    engine = sa.create_engine(db_url)
    try:
        with engine.begin() as conn:
            metadata.create_all(conn)
            conn.execute(sa.text(f"ALTER TABLE attempts DROP COLUMN {column}"))
            old_rows = batch_rows([req("o", 1.0, [att("o", 0, "slm", cost_usd=0.001)])])
            conn.execute(sa.insert(metadata.tables["requests"]), old_rows[0])
            conn.execute(sa.text(
                "INSERT INTO attempts (request_id, attempt_no, task_id, route, tier, backend, "
                "model, started_at, latency_s, prompt_tokens, completion_tokens, cost_usd, "
                "signals, outcome, energy_measured) VALUES ('o', 0, 'o', 'auto', 'slm', 'be', "
                "'m', 1.0, 0.1, 0, 0, 0.001, '{}', 'accepted', false)"))  # fmt: skip
    finally:
        engine.dispose()
    led = Ledger(db_url)
    led.start()
    try:
        value: Any = 1.5 if column == "compute_s" else "llguidance"
        load(led, [req("n", 2.0, [att("n", 0, "slm", cost_usd=0.002, **{column: value})])])
        old, new = led.task("o"), led.task("n")
        assert old is not None
        assert new is not None
        assert old["requests"][0]["attempts"][0][column] is None
        assert new["requests"][0]["attempts"][0][column] == value
    finally:
        led.close()


def test_an_older_requests_table_gets_key_ids(db_url: str) -> None:
    """A ledger from before API key records: ``requests.key_id`` and its index are added in
    place; old rows have no key, new rows keep theirs and show in ``by_key``."""
    from router.ledger import metadata

    engine = sa.create_engine(db_url)
    try:
        with engine.begin() as conn:
            metadata.create_all(conn)
            conn.execute(sa.text("DROP INDEX ix_requests_key_id_created_at"))
            conn.execute(sa.text("ALTER TABLE requests DROP COLUMN key_id"))
            rows = batch_rows([req("o", 1.0, [att("o", 0, "slm", cost_usd=0.001)])])[0]
            conn.execute(sa.insert(metadata.tables["requests"]),
                         [{k: v for k, v in r.items() if k != "key_id"} for r in rows])  # fmt: skip
    finally:
        engine.dispose()
    led = Ledger(db_url)
    led.start()
    try:
        new = req("n", 2.0, [att("n", 0, "slm", cost_usd=0.002)])
        new.key_id = "key-abc"
        load(led, [new])
        assert led.key_spend("key-abc", 0.0) == pytest.approx(0.002)
        (row,) = led.stats()["by_key"]
        assert (row["key_id"], row["name"], row["requests"]) == ("key-abc", None, 1)
        indexes = {i["name"] for i in sa.inspect(led._engine).get_indexes("requests")}
        assert "ix_requests_key_id_created_at" in indexes
    finally:
        led.close()


# ---- the benchmark's own bookkeeping ----------------------------------------------------------


def test_ledger_bench_small_run(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import ledger_bench

    assert ledger_bench.main(["--rows", "60", "--repeats", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    records = list(ledger_bench.synthetic_requests(60, 0.0))
    task_ids = {r.task_id or r.request_id for r in records}
    assert result["rows"] == result["check"]["requests"] == 60
    assert result["attempts"] == sum(len(r.attempts) for r in records)
    assert result["tasks"] == len(task_ids)
    explicit = sorted({r.task_id for r in records if r.task_id is not None})
    assert result["outcomes"] == len(explicit[::2])  # outcomes for half the tasks
    assert set(result["reads"]) == {"stats_all", "stats_1h", "stats_24h_route", "tasks_50",
                                    "task_one"}  # fmt: skip
    assert {"cpu", "cores"} <= set(result["machine"])
