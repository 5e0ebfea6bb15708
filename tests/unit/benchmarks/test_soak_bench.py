"""`slmgate bench soak`'s parts without a gateway or a model: the mix, the fake upstream and its
faults, one client against it, the ledger reconciliation and the verdict."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest

from benchmarks import soak_plan as sp
from benchmarks.soak_bench import gateway_config, rss_mb
from benchmarks.soak_client import ClientResult, run_one
from benchmarks.soak_ledger import ISSUES, normalise, read_ledger, reconcile
from benchmarks.soak_report import summarize, table, unhandled_5xx
from benchmarks.soak_upstream import FakeUpstream
from router.ledger import Ledger
from router.records import AttemptRecord, RequestRecord

# ---- the mix ----------------------------------------------------------------------------------


def test_the_mix_is_reproducible_from_its_seed_and_ids_are_unique() -> None:
    a, b = sp.plan_mix(200, 7, "t"), sp.plan_mix(200, 7, "t")
    assert a == b
    assert a != sp.plan_mix(200, 8, "t")
    assert len({p.task_id for p in a}) == 200
    assert a[0].task_id == "soak-t-00000"
    assert a[199].task_id == "soak-t-00199"
    assert {p.route for p in a} == set(sp.ROUTES)
    assert {p.kind for p in a} == {"text", "json", "tool"}
    assert {p.behaviour for p in a} == {"normal", "disconnect", "timeout"}
    assert any(p.stream for p in a)
    assert not all(p.stream for p in a)


def test_only_hanging_up_clients_have_a_cut_within_their_range() -> None:
    w = sp.MixWeights()
    for p in sp.plan_mix(300, 1, "x", w):
        if p.behaviour == "normal":
            assert p.cut_after_s is None
        elif p.behaviour == "disconnect":
            assert p.cut_after_s is not None
            assert w.disconnect_s[0] <= p.cut_after_s <= w.disconnect_s[1]
        else:
            assert p.cut_after_s is not None
            assert w.timeout_s[0] <= p.cut_after_s <= w.timeout_s[1]
        if p.kind == "text":
            assert w.text_tokens[0] <= p.max_tokens <= w.text_tokens[1]


def test_shares_of_zero_leave_that_behaviour_out() -> None:
    w = sp.MixWeights(stream=0.0, disconnect=0.0, timeout=1.0, routes=(("slm", 1.0),))
    plan = sp.plan_mix(50, 3, "z", w)
    assert {p.behaviour for p in plan} == {"timeout"}
    assert {p.route for p in plan} == {"slm"}
    assert not any(p.stream for p in plan)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"stream": 1.5},
        {"disconnect": 0.6, "timeout": 0.6},
        {"routes": (("nowhere", 1.0),)},
        {"kinds": (("text", 0.0),)},
    ],
)
def test_bad_weights_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - several messages
        sp.MixWeights(**kwargs)


def _planned(kind: sp.Kind, stream: bool = False, route: str = "cascade") -> sp.PlannedRequest:
    return sp.PlannedRequest(0, "soak-t-00000", route, kind, stream, "normal", None, 32, "hi")


def test_request_bodies_per_kind() -> None:
    text = sp.request_body(_planned("text"))
    assert text == {"model": "cascade", "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 32, "temperature": 0}  # fmt: skip
    json_body = sp.request_body(_planned("json", stream=True))
    assert json_body["response_format"]["json_schema"]["schema"] == sp.PERSON_SCHEMA
    assert json_body["stream"] is True
    assert json_body["stream_options"] == {"include_usage": True}
    tool = sp.request_body(_planned("tool"))
    assert tool["tools"] == [sp.WEATHER_TOOL]
    assert tool["tool_choice"] == "required"
    assert "stream" not in tool


# ---- the fake upstream's answers and faults ---------------------------------------------------


def test_fake_answers_validate_against_what_was_asked() -> None:
    json_answer = sp.fake_completion(sp.request_body(_planned("json")), "c1", 5)
    content = json_answer["choices"][0]["message"]["content"]
    jsonschema.validate(json.loads(content), sp.PERSON_SCHEMA)
    tool_answer = sp.fake_completion(sp.request_body(_planned("tool")), "c2", 5)
    call = tool_answer["choices"][0]["message"]["tool_calls"][0]
    assert call["function"]["name"] == "get_weather"
    params = sp.WEATHER_TOOL["function"]["parameters"]
    jsonschema.validate(json.loads(call["function"]["arguments"]), params)
    assert tool_answer["choices"][0]["finish_reason"] == "tool_calls"
    text = sp.fake_completion(sp.request_body(_planned("text")), "c3", 5)
    assert text["choices"][0]["message"]["content"] == sp.FAKE_TEXT
    assert text["usage"] == {"prompt_tokens": 1, "completion_tokens": len(sp.FAKE_TEXT) // 4,
                             "total_tokens": 1 + len(sp.FAKE_TEXT) // 4}  # fmt: skip


def test_fake_chunks_carry_the_whole_answer_then_usage() -> None:
    body = sp.request_body(_planned("text", stream=True))
    chunks = sp.fake_chunks(body, "c1", 5)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[:-1])
    assert text == sp.FAKE_TEXT
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == len(sp.FAKE_TEXT) // 4
    tool = sp.fake_chunks(sp.request_body(_planned("tool", stream=True)), "c2", 5)
    assert tool[1]["choices"][0]["delta"]["tool_calls"][0]["function"]["name"] == "get_weather"


def test_fault_schedule_follows_the_share_of_the_load_started() -> None:
    mixed = sp.FaultWindow(start=0.3, end=0.6, mode="mixed")
    phases = [sp.fault_at(mixed, p) for p in (0.0, 0.29, 0.3, 0.39, 0.4, 0.49, 0.5, 0.59, 0.6, 1.0)]
    assert phases == [None, None, "500", "500", "close", "close", "refuse", "refuse", None, None]
    only = sp.FaultWindow(start=0.0, end=0.5, mode="close")
    assert [sp.fault_at(only, p) for p in (0.0, 0.25, 0.5)] == ["close", "close", None]
    assert sp.fault_at(sp.FaultWindow(start=0.5, end=0.5), 0.5) is None
    with pytest.raises(ValueError, match="fault window"):
        sp.FaultWindow(start=0.7, end=0.6)


class Progress:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def _until(check: Any) -> None:
    for _ in range(200):  # the refusal watcher ticks every 20 ms
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("state never changed")


async def test_fake_upstream_serves_fails_and_recovers() -> None:
    progress = Progress()
    up = FakeUpstream(sp.FaultWindow(start=0.1, end=0.4, mode="mixed"), 0.0, progress)
    port = await up.start()
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    body = sp.request_body(_planned("json"))
    try:
        async with httpx.AsyncClient(timeout=5) as client:
            ok = await client.post(url, json=body)
            assert ok.status_code == 200
            assert json.loads(ok.json()["choices"][0]["message"]["content"]) == sp.PERSON
            progress.now = 0.15
            failed = await client.post(url, json=body)
            assert failed.status_code == 500
            progress.now = 0.25
            with pytest.raises(httpx.RemoteProtocolError):
                await client.post(url, json=body)
            progress.now = 0.35
            await _until(lambda: up._server is None)
            with pytest.raises(httpx.ConnectError):
                await client.post(url, json=body)
            progress.now = 0.4
            await _until(lambda: up._server is not None)
            streamed = await client.post(url, json={**body, "stream": True})
            assert streamed.status_code == 200
            assert streamed.text.rstrip().endswith("data: [DONE]")
    finally:
        await up.close()
    assert up.counts == {"served": 2, "http_500": 1, "closed": 1, "refuse_windows": 1}


# ---- one client ---------------------------------------------------------------------------------


async def test_client_reports_answers_streams_and_its_own_hang_ups() -> None:
    up = FakeUpstream(sp.FaultWindow(start=1.0, end=1.0), latency_s=0.0)
    port = await up.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            whole = await run_one(client, _planned("tool"))
            assert (whole.status, whole.saw_content, whole.cut) == (200, True, False)
            assert whole.completion_tokens == 12
            stream = await run_one(client, _planned("text", stream=True))
            assert stream.status == 200
            assert stream.saw_content
            assert stream.content_chunks == len(sp.FAKE_TEXT.split(" "))
            assert stream.completion_tokens == len(sp.FAKE_TEXT) // 4
            up.latency_s = 30.0
            hang_up = sp.PlannedRequest(1, "soak-t-1", "slm", "text", False, "disconnect", 0.05,
                                        8, "hi")  # fmt: skip
            cut = await run_one(client, hang_up)
            assert (cut.cut, cut.status, cut.saw_content) == (True, None, False)
    finally:
        await up.close()


# ---- the ledger -------------------------------------------------------------------------------


def _result(task: str, status: int | None = 200, **kw: Any) -> ClientResult:
    base: dict[str, Any] = {"index": 0, "task_id": task, "route": "cascade", "kind": "text",
                            "stream": False, "behaviour": "normal", "latency_s": 0.1,
                            "status": status}  # fmt: skip
    return ClientResult(**(base | kw))


def _req(task: str, status: int = 200, cost: float = 3e-6, completion: int = 5) -> dict[str, Any]:
    return {"request_id": "r-" + task, "task_id": task, "route": "cascade", "status": status,
            "prompt_tokens": 4, "completion_tokens": completion, "cost_usd": cost,
            "stream": False}  # fmt: skip


def _att(task: str, no: int, outcome: str, cost: float = 3e-6, completion: int = 5,
         tier: str = "slm") -> dict[str, Any]:  # fmt: skip
    return {"request_id": "r-" + task, "attempt_no": no, "tier": tier, "outcome": outcome,
            "prompt_tokens": 4, "completion_tokens": completion, "cost_usd": cost,
            "error": None}  # fmt: skip


def test_reconcile_counts_lost_rows_apart_from_refusals_at_the_door() -> None:
    results = [
        _result("a"),
        _result("b", cut=True, behaviour="disconnect", status=None),
        _result("c", status=429),
        _result("d", status=503, retry_after="5"),
        _result("e", status=502),
    ]
    out = reconcile(results, [_req("a")], [_att("a", 0, "accepted")])
    assert out["sent"] == 5
    assert out["found"] == 1
    assert out["lost"] == 2
    assert out["lost_examples"] == ["b", "e"]
    assert out["lost_by_client"] == {"cut:disconnect": 1, "502": 1}
    assert out["refused_unrecorded"] == 2
    assert out["error_attempts"] == {}
    assert out["issues"] == dict.fromkeys(ISSUES, 0)
    assert out["attempt_tokens"] == {"prompt": 4, "completion": 5}
    assert out["ledger_status"] == {"200": 1}


def test_reconcile_finds_each_accounting_issue() -> None:
    results = [
        _result("cost"),
        _result("empty"),
        _result("cut", cut=True, behaviour="timeout", status=None, saw_content=True),
        _result("bare", cut=True, behaviour="disconnect", status=None),
        _result("seen", completion_tokens=9),
        _result("mismatch", status=502),
        _result("over"),
        _result("ok", route="failover"),
    ]
    requests = [
        _req("cost", cost=5e-6), _req("empty", completion=0), _req("cut", status=499, completion=0),
        _req("bare", status=499, completion=0, cost=0.0), _req("seen"), _req("mismatch"),
        _req("over", completion=7), _req("ok", cost=4e-6),
    ]  # fmt: skip
    attempts = [
        _att("cost", 0, "accepted"),
        _att("empty", 0, "escalated", completion=0),
        _att("cut", 0, "error", completion=0),
        _att("seen", 0, "accepted"),
        _att("mismatch", 0, "accepted"),
        _att("over", 0, "accepted"),
        _att("ok", 1, "accepted", cost=3e-6, tier="slm"),
        _att("ok", 0, "error", cost=1e-6, completion=0, tier="llm"),
    ]
    out = reconcile(results, requests, attempts)
    assert out["lost"] == 0
    assert out["issues"] == {
        "cost_mismatch": 1, "completed_without_tokens": 1,
        "completed_without_accepted_attempt": 1, "tokens_exceed_attempts": 1,
        "cut_without_attempts": 1, "cut_outcome_not_cancelled": 1, "tokens_lost": 2,
        "status_mismatch": 1,
    }  # fmt: skip
    assert out["issue_examples"]["tokens_lost"] == ["cut", "seen"]
    assert out["issue_examples"]["cost_mismatch"] == ["cost"]
    assert out["cut_recorded_as"] == {"499": 2}
    assert out["failover_answers"] == 1
    assert out["error_attempts"] == {"llm": 1, "slm": 1}


def test_a_cancelled_attempt_with_its_tokens_is_clean() -> None:
    results = [_result("c", cut=True, behaviour="disconnect", status=None, saw_content=True)]
    out = reconcile(results, [_req("c", status=499, completion=3)],
                    [_att("c", 0, "cancelled", completion=3)])  # fmt: skip
    assert out["issues"] == dict.fromkeys(ISSUES, 0)


def test_columns_are_read_through_aliases() -> None:
    row = {"id": "r1", "task_id": "t", "status_code": 200, "cost": 1.0, "extra": 1}
    out = normalise(row, {"request_id": ("request_id", "id"), "status": ("status", "status_code"),
                          "cost_usd": ("cost_usd", "cost"), "route": ("route",)})  # fmt: skip
    assert out == {"request_id": "r1", "status": 200, "cost_usd": 1.0, "route": None}


def test_read_ledger_reflects_the_tables_the_gateway_writes(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    attempt = AttemptRecord("req-1", 0, "cascade", "slm", "small", "smollm2", 1.0, 0.1,
                            prompt_tokens=4, completion_tokens=6, cost_usd=2e-6)  # fmt: skip
    mine = RequestRecord("req-1", "cascade", 1.0, 0.1, task_id="soak-ab-00000",
                         completion_tokens=6, cost_usd=2e-6, attempts=[attempt])  # fmt: skip
    other = RequestRecord("req-2", "cascade", 1.0, 0.1, task_id="another-task")
    with Ledger(url) as ledger:
        ledger.record(mine)
        ledger.record(other)
        assert ledger.flush()
    requests, attempts = read_ledger(url, "soak-ab-")
    assert [(r["request_id"], r["task_id"], r["status"], r["completion_tokens"])
            for r in requests] == [("req-1", "soak-ab-00000", 200, 6)]  # fmt: skip
    assert [(a["request_id"], a["attempt_no"], a["outcome"], a["cost_usd"])
            for a in attempts] == [("req-1", 0, "accepted", 2e-6)]  # fmt: skip


# ---- the verdict ------------------------------------------------------------------------------


def test_which_5xx_count_against_the_gateway() -> None:
    assert unhandled_5xx(_result("a", status=502))
    assert unhandled_5xx(_result("a", status=500))
    assert unhandled_5xx(_result("a", status=503))  # no Retry-After
    assert not unhandled_5xx(_result("a", status=503, retry_after="5"))
    assert unhandled_5xx(_result("a", status=200, stream_error_status=503, retry_after="5"))
    assert not unhandled_5xx(_result("a", status=504))
    assert not unhandled_5xx(_result("a", status=None, cut=True))
    assert not unhandled_5xx(_result("a", status=429))


def _summary(results: list[ClientResult], ledger: dict[str, Any]) -> dict[str, Any]:
    return summarize(results, ledger, wall_s=12.345, not_sent=1,
                     rss_mb={"start": 500.0, "peak": 620.5, "end": 600.0},
                     upstream={"served": 3, "http_500": 2, "closed": 1})  # fmt: skip


def test_summary_passes_only_with_no_lost_rows_and_no_fault_5xx() -> None:
    ok = [_result("a", latency_s=0.1), _result("b", latency_s=0.3, route="slm"),
          _result("c", status=503, retry_after="1", route="remote"),
          _result("d", status=504, route="failover"),
          _result("e", status=None, cut=True, behaviour="timeout")]  # fmt: skip
    ledger = reconcile(ok, [_req(t) for t in "abde"], [_att(t, 0, "accepted") for t in "abde"])
    summary = _summary(ok, ledger)
    assert summary["passed"]
    assert summary["failures"] == []
    assert summary["warnings"] == []
    assert summary["requests"]["ok_200"] == 2
    assert summary["requests"]["cut_timeout"] == 1
    assert summary["requests"]["client_status"] == {"200": 2, "503": 1, "504": 1}
    assert summary["faults"]["shed_503_retry_after"] == 1
    assert summary["faults"]["http_504"] == 1
    assert summary["latency"]["all"] == {"p50_ms": 200.0, "p95_ms": 290.0}
    assert summary["latency"]["slm"] == {"p50_ms": 300.0, "p95_ms": 300.0, "n": 1}
    assert "| verdict | PASS |" in table(summary)

    bad = [_result("a", status=502, route="cascade"), _result("b", status=500, route="slm"),
           _result("c"), _result("d", status=502, route="remote")]  # fmt: skip
    failed = _summary(bad, reconcile(bad, [_req("a"), _req("b"), _req("d")], []))
    assert not failed["passed"]
    assert failed["failures"] == [
        "1 ledger rows lost",
        "1 5xx answers on routes that could fall back to another tier",
        "1 unexpected 5xx answers on SLM-only routes",
    ]
    assert failed["faults"]["fault_5xx_examples"] == ["a cascade 502"]
    # The upstream-only route has no other tier: its 502 is reported, not judged.
    assert failed["faults"]["single_tier_upstream_5xx"] == 1
    assert failed["faults"]["single_tier_upstream_statuses"] == {"502": 1}
    assert "| verdict | FAIL: 1 ledger rows lost; " in table(failed)


def test_a_run_whose_faults_met_no_request_says_so() -> None:
    results = [_result("a")]
    ledger = reconcile(results, [_req("a")], [_att("a", 0, "accepted")])
    summary = summarize(results, ledger, wall_s=1.0, not_sent=0, rss_mb={},
                        upstream={"served": 4, "refuse_windows": 1})  # fmt: skip
    assert summary["passed"]
    assert summary["warnings"] == [
        "no request met an upstream fault: widen --fault-from/--fault-to"
    ]
    assert "| warning | no request met an upstream fault" in table(summary)


# ---- the gateway it starts --------------------------------------------------------------------


def test_the_config_loads_in_the_gateway() -> None:
    from gateway.config import from_mapping

    data = gateway_config("builtin:smollm2-135m-instruct", 4321, "sqlite:////tmp/x.sqlite3",
                          30.0, 8, frozenset({"request_timeout_s"}))  # fmt: skip
    assert "max_concurrent_per_key" not in data["limits"]
    config = from_mapping(data)
    assert [r.name for r in config.routes] == ["cascade", "failover", "slm", "remote"]
    assert config.routes[1].tiers == ("upstream", "small")
    remote = config.models[1]
    assert (remote.kind, remote.base_url) == ("openai", "http://127.0.0.1:4321/v1")
    assert (remote.price_in_per_mtok, remote.price_out_per_mtok) == (0.5, 1.5)
    assert config.limits.request_timeout_s == 30.0
    wide = gateway_config("builtin:smollm2-135m-instruct", 1, "sqlite:////tmp/x.sqlite3", 30.0,
                          40, frozenset({"max_concurrent_per_key"}))  # fmt: skip
    assert wide["limits"]["max_concurrent_per_key"] == 44


def test_rss_of_a_live_and_a_gone_process() -> None:
    if not Path("/proc/self/status").exists():
        pytest.skip("no /proc on this system")
    mine = rss_mb(os.getpid())
    assert mine is not None
    assert mine > 0
    assert rss_mb(2**22 + 12345) is None
