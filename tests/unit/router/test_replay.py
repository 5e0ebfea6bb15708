"""slmgate replay: log parsing, agreement on wire bodies, the keep rule, the summary, and one
run against a mocked gateway."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from benchmarks.replay_run import load_log, main, replay_one
from router.deferral import DeferralRule, LogisticModel
from router.replay import (
    LoggedCall,
    ReplayRow,
    kind_of_body,
    parse_log_line,
    summarize,
    wire_agreement,
    would_keep,
)
from router.route import Route

TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
BODY = {"model": "auto", "messages": [{"role": "user", "content": "x"}], "tools": TOOLS}


def reply(calls: list[tuple[str, dict[str, Any]]] | None = None, content: str | None = None,
          **facts: Any) -> dict[str, Any]:  # fmt: skip
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = [
            {"id": f"c{i}", "type": "function",
             "function": {"name": n, "arguments": json.dumps(a)}}
            for i, (n, a) in enumerate(calls)
        ]  # fmt: skip
    return {"choices": [{"index": 0, "message": message}], "slmgate": facts}


def test_parse_log_line() -> None:
    assert parse_log_line(json.dumps(BODY), 1) == LoggedCall(BODY)
    line = json.dumps({"request": BODY, "response": reply(), "cost_usd": 0.5})
    assert parse_log_line(line, 2).cost_usd == 0.5
    with pytest.raises(ValueError, match="line 3: not JSON"):
        parse_log_line("{", 3)
    with pytest.raises(ValueError, match="line 4: the request needs"):
        parse_log_line('{"model": "x"}', 4)


def test_kinds() -> None:
    assert kind_of_body(BODY) == "tools"
    assert kind_of_body({**BODY, "tool_choice": "none"}) == "text"
    assert kind_of_body({"response_format": {"type": "json_object"}}) == "json"


@pytest.mark.parametrize(
    ("kind", "recorded", "replayed", "expected"),
    [
        ("tools", reply([("f", {"a": 1, "b": 2})]), reply([("f", {"b": 2, "a": 1})]), True),
        ("tools", reply([("f", {"a": 1}), ("f", {"a": 2})]),
         reply([("f", {"a": 2}), ("f", {"a": 1})]), True),
        ("tools", reply([("f", {"a": 1})]), reply([("f", {"a": 3})]), False),
        ("tools", reply([("f", {"a": 1})]), reply(content="no"), False),
        ("tools", reply(content="hi"), reply(content="hello"), None),
        ("json", reply(content='{"a": 1}'), reply(content='{ "a": 1 }'), True),
        ("json", reply(content='{"a": 1}'), reply(content="oops"), False),
        ("text", reply(content="a"), reply(content="a"), None),
        ("tools", None, reply([("f", {})]), None),  # logged without its answer
    ],
)  # fmt: skip
def test_wire_agreement(kind: Any, recorded: Any, replayed: Any, expected: bool | None) -> None:
    assert wire_agreement(kind, recorded, replayed) is expected


def test_would_keep_follows_the_route() -> None:
    plain = Route("auto", ("slm", "llm"), policy="cascade", signal="mean_prob", threshold=0.5)
    assert would_keep(plain, "tools", {"valid": False}) == (False, "invalid")
    assert would_keep(plain, "tools", {"valid": True, "executable": False}) == (
        False, "not_executable")  # fmt: skip
    assert would_keep(plain, "tools", {"valid": True, "signals": {"mean_prob": 0.4}}) == (
        False, "low_confidence")  # fmt: skip
    assert would_keep(plain, "tools", {"valid": True, "signals": {"mean_prob": 0.6}}) == (
        True, None)  # fmt: skip
    model = LogisticModel(("provenance",), (0.5,), (0.25,), (4.0,), 0.0, (0.0,), (1.0,), 0.5)
    ruled = Route("auto", ("slm", "llm"), policy="cascade", deferral=DeferralRule({"tools": model}))
    assert would_keep(ruled, "tools", {"signals": {"provenance": 1.0}}) == (True, None)
    assert would_keep(ruled, "tools", {"signals": {"provenance": 0.0}})[0] is False
    assert would_keep(ruled, "tools", {"signals": {}})[0] is False  # undefined: not confident


def test_summary_counts_abstentions_as_coverage_and_prices_escalations() -> None:
    rows = [
        ReplayRow(1, "tools", True, None, True, 0.1, 1.0),
        ReplayRow(2, "tools", True, None, False, 0.1, 1.0),
        ReplayRow(3, "text", True, None, None, 0.1, 1.0),
        ReplayRow(4, "tools", False, "low_confidence", None, 0.1, 1.0),
    ]
    s = summarize(rows)
    assert (s["kept"], s["keep_rate"], s["coverage"]) == (3, 0.75, pytest.approx(2 / 3))
    assert s["agreement"] == 0.5
    assert s["cost_usd"] == pytest.approx(0.4 + 1.0)  # every SLM answer + the escalated one
    assert s["successes_inferred"] == 2  # one agreeing kept answer + the escalated one
    assert s["cps_usd"] == pytest.approx(0.7)
    assert s["recorded_cps_usd"] == pytest.approx(1.0)


def test_replay_against_a_mocked_gateway(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> (
    None
):  # fmt: skip
    sent: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        sent.append(body)
        good = body["messages"][0]["content"] == "good"
        facts = {"valid": True, "cost_usd": 0.01, "signals": {"mean_prob": 0.9 if good else 0.1}}
        return httpx.Response(200, json=reply([("f", {"a": 1})], **facts))

    route = Route("auto", ("slm", "llm"), policy="cascade", signal="mean_prob", threshold=0.5)
    with httpx.Client(transport=httpx.MockTransport(handler), base_url="http://gw") as client:
        good = LoggedCall({**BODY, "messages": [{"role": "user", "content": "good"}]},
                          reply([("f", {"a": 1})]), 1.0)  # fmt: skip
        bad = LoggedCall({**BODY, "messages": [{"role": "user", "content": "bad"}]},
                         reply([("f", {"a": 1})]), 1.0)  # fmt: skip
        rows = [replay_one(client, route, 1, good), replay_one(client, route, 2, bad)]
    assert [s["model"] for s in sent] == ["slm", "slm"]  # the route's first tier
    assert [(r.kept, r.agreed) for r in rows] == [(True, True), (False, None)]
    log = tmp_path / "log.jsonl"
    log.write_text(json.dumps({"request": BODY}) + "\n\n" + json.dumps(BODY) + "\n")
    assert [n for n, _ in load_log(log)] == [1, 3]
    config = tmp_path / "c.yaml"
    config.write_text("models: []\nroutes: []\n")
    assert main([str(log), "--config", str(config), "--route", "auto", "--base-url", "x"]) == 2
    assert "no route 'auto'" in capsys.readouterr().err
