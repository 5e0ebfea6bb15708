"""``slmgate eval bfcl`` without a model: BFCL's real entries, conversion and checker; the
metrics on literal records; the request loop against a scripted HTTP transport."""

from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from benchmarks import bfcl_data as bd
from benchmarks import bfcl_eval as be

HINT = " Note that the provided function is in Python 3 syntax."


def item(item_id: str) -> bd.BfclItem:
    category = item_id.rsplit("_", 1)[0]
    found = [it for it in bd.load_items(category) if it.id == item_id]
    assert len(found) == 1
    return found[0]


def tool_of(it: bd.BfclItem, index: int = 0) -> dict[str, Any]:
    tools, _ = bd.openai_tools(it.functions)
    fn: dict[str, Any] = tools[index]["function"]
    return fn


def verdict(item_id: str, *calls: tuple[str, dict[str, Any]]) -> bd.Verdict:
    it = item(item_id)
    _, names = bd.openai_tools(it.functions)
    return bd.score(it, [(n, json.dumps(a)) for n, a in calls], names)


# ---- loading and conversion ------------------------------------------------------------------


def test_categories_resolve_aliases_and_reject_unknown() -> None:
    assert bd.resolve_categories(["simple", "multiple", "simple_python"]) == [
        "simple_python",
        "multiple",
    ]
    with pytest.raises(ValueError, match="unknown BFCL category 'exec_simple'"):
        bd.resolve_categories(["exec_simple"])


def test_load_items_keeps_file_order_limit_and_ground_truth() -> None:
    items = bd.load_items("simple_python", 3)
    assert [it.id for it in items] == ["simple_python_0", "simple_python_1", "simple_python_2"]
    first = items[0]
    assert first.messages == [
        {
            "role": "user",
            "content": "Find the area of a triangle with a base of 10 units and height of 5 units.",
        }
    ]
    assert first.ground_truth == [
        {"calculate_triangle_area": {"base": [10], "height": [5], "unit": ["units", ""]}}
    ]
    # the sent docs carry BFCL's language hint, the checker's do not
    assert first.functions[0]["description"].endswith(HINT)
    assert not first.checker_functions[0]["description"].endswith(HINT)
    assert bd.load_items("irrelevance", 1)[0].ground_truth is None


def test_dotted_name_becomes_underscore_and_maps_back() -> None:
    it = item("simple_python_1")  # math.factorial
    tools, names = bd.openai_tools(it.functions)
    assert tools == [
        {
            "type": "function",
            "function": {
                "name": "math_factorial",
                "description": "Calculate the factorial of a given number." + HINT,
                "parameters": {
                    "type": "object",
                    "properties": {
                        "number": {
                            "type": "integer",
                            "description": "The number for which factorial needs to be calculated.",
                        }
                    },
                    "required": ["number"],
                },
            },
        }
    ]
    assert names == {"math_factorial": "math.factorial"}
    assert it.functions[0]["name"] == "math.factorial"  # the item itself is left alone


def test_float_maps_to_number_with_bfcl_float_note() -> None:
    alpha = tool_of(item("simple_python_122"))["parameters"]["properties"]["alpha"]
    assert alpha == {
        "type": "number",
        "format": "float",
        "description": "Significance level for the Chi-Squared test. Default is 0.05."
        " This is a float type value.",
    }


def test_nested_arrays_tuple_any_and_dicts_use_bfcl_mapping() -> None:
    table = tool_of(item("simple_python_122"))["parameters"]["properties"]["table"]
    assert table["items"] == {"type": "array", "items": {"type": "integer"}}
    coord = tool_of(item("simple_python_83"))["parameters"]["properties"]["coord1"]
    assert (coord["type"], coord["items"]) == ("array", {"type": "number"})  # tuple of float
    data = tool_of(item("simple_python_109"))["parameters"]["properties"]["data"]
    assert data["type"] == "string"  # any
    conditions = tool_of(item("simple_python_89"))["parameters"]["properties"]["conditions"]
    assert conditions["type"] == "object"  # dict with properties
    assert {k: v["type"] for k, v in conditions["properties"].items()} == {
        "department": "string",
        "school": "string",
    }
    rows = tool_of(item("simple_python_96"))["parameters"]["properties"]["conditions"]
    assert rows["items"]["type"] == "object"  # array of dict
    assert rows["items"]["properties"]["operation"]["enum"] == ["<", ">", "=", ">=", "<="]
    assert rows["items"]["required"] == ["field", "operation", "value"]


# ---- BFCL's checker, per category ------------------------------------------------------------


def test_simple_python_right_and_wrong_calls() -> None:
    assert verdict(
        "simple_python_0", ("calculate_triangle_area", {"base": 10, "height": 5})
    ).success
    assert verdict(
        "simple_python_0", ("calculate_triangle_area", {"base": 10, "height": 5, "unit": "units"})
    ).success
    wrong = verdict("simple_python_0", ("calculate_triangle_area", {"base": 11, "height": 5}))
    assert (wrong.success, wrong.error_type) == (False, "value_error:others")
    missing = verdict("simple_python_0", ("calculate_triangle_area", {"base": 10}))
    assert missing.error_type == "simple_function_checker:missing_required"
    twice = verdict(
        "simple_python_0",
        ("calculate_triangle_area", {"base": 10, "height": 5}),
        ("calculate_triangle_area", {"base": 10, "height": 5}),
    )
    assert twice.error_type == "simple_function_checker:wrong_count"


def test_simple_python_python_types_float_accepts_int_and_tuple_is_a_list() -> None:
    ok = {"coord1": [33.4484, -112.074], "coord2": [34.0522, -118.2437], "unit": "miles"}
    assert verdict("simple_python_83", ("calculate_distance", ok)).success
    as_text = {**ok, "coord1": "(33.4484, -112.074)"}
    assert verdict("simple_python_83", ("calculate_distance", as_text)).error_type == (
        "type_error:simple"
    )


def test_dotted_name_is_scored_under_its_bfcl_name() -> None:
    assert verdict("simple_python_1", ("math_factorial", {"number": 5})).success
    it = item("simple_python_1")
    unmapped = bd.score(it, [("math_factorial", '{"number": 5}')], names={})
    assert unmapped.error_type == "simple_function_checker:wrong_func_name"


def test_undecodable_or_missing_calls_fail_ast_categories() -> None:
    it = item("simple_python_0")
    _, names = bd.openai_tools(it.functions)
    bad = bd.score(it, [("calculate_triangle_area", '{"base": 10,')], names)
    assert (bad.success, bad.error_type) == (False, "ast_decoder:decoder_failed")
    none = bd.score(it, None, names)
    assert (none.success, none.error_type) == (False, "ast_decoder:decoder_failed")
    listed = bd.score(it, [("calculate_triangle_area", "[10, 5]")], names)
    assert listed.error_type == "ast_decoder:decoder_wrong_output_format"


def test_multiple_needs_the_right_function_among_several() -> None:
    args = {"side1": 5, "side2": 4, "side3": 3}
    assert verdict("multiple_0", ("triangle_properties_get", args)).success
    wrong = verdict("multiple_0", ("circle_properties_get", {"radius": 3}))
    assert wrong.success is False
    assert wrong.error_type is not None


def test_parallel_accepts_any_order_and_needs_every_call() -> None:
    taylor = ("spotify_play", {"artist": "Taylor Swift", "duration": 20})
    maroon = ("spotify_play", {"artist": "Maroon 5", "duration": 15})
    assert verdict("parallel_0", taylor, maroon).success
    assert verdict("parallel_0", maroon, taylor).success
    one = verdict("parallel_0", taylor)
    assert (one.success, one.error_type) == (
        False,
        "parallel_function_checker_no_order:wrong_count",
    )


def test_parallel_multiple_two_different_functions() -> None:
    multiples = ("math_toolkit_sum_of_multiples", {"lower_limit": 1, "upper_limit": 1000,
                                                   "multiples": [3, 5]})  # fmt: skip
    primes = ("math_toolkit_product_of_primes", {"count": 5})
    assert verdict("parallel_multiple_0", primes, multiples).success
    off = ("math_toolkit_product_of_primes", {"count": 6})
    assert not verdict("parallel_multiple_0", multiples, off).success


def test_irrelevance_is_right_only_without_a_call() -> None:
    it = item("irrelevance_0")
    _, names = bd.openai_tools(it.functions)
    assert bd.score(it, None, names) == bd.Verdict(True)
    assert bd.score(it, [], names) == bd.Verdict(True)
    called = bd.score(it, [("determine_body_mass_index", '{"weight": 70, "height": 1.8}')], names)
    assert (called.success, called.error_type) == (False, "irrelevance_error:decoder_success")
    # as in BFCL, a call whose arguments do not decode is not a function call
    assert bd.score(it, [("determine_body_mass_index", "{oops")], names).success


# ---- executable calls and reply parsing ------------------------------------------------------


def test_executable_checks_name_and_arguments_against_the_offered_tool() -> None:
    tools, _ = bd.openai_tools(item("simple_python_0").functions)
    name = "calculate_triangle_area"
    assert bd.executable(None, tools) is None
    assert bd.executable([], tools) is None
    assert bd.executable([(name, '{"base": 10, "height": 5}')], tools) is True
    assert bd.executable([(name, '{"base": 10}')], tools) is False  # missing required
    assert bd.executable([(name, '{"base": "10", "height": 5}')], tools) is False  # type
    assert bd.executable([(name, "{nope")], tools) is False
    assert bd.executable([(name, "[1]")], tools) is False
    ok = (name, '{"base": 1, "height": 2}')
    assert bd.executable([ok, ("math_factorial", '{"number": 5}')], tools) is False


def test_tool_calls_of_reads_openai_messages() -> None:
    assert bd.tool_calls_of({"content": "hi"}) is None
    assert bd.tool_calls_of({"content": "hi", "tool_calls": None}) is None
    message = {
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}},
            {"id": "c2", "type": "function", "function": {"name": "g", "arguments": {"b": 2}}},
        ]
    }
    assert bd.tool_calls_of(message) == [("f", '{"a":1}'), ("g", '{"b": 2}')]


# ---- request body, gateway facts, verdicts ----------------------------------------------------


def test_build_request_follows_the_contract() -> None:
    it = item("simple_python_0")
    tools, _ = bd.openai_tools(it.functions)
    body = be.build_request(it, tools, "auto", 128)
    assert body == {
        "model": "auto",
        "messages": [{"role": "system", "content": be.SYSTEM_PROMPT}, *it.messages],
        "tools": tools,
        "tool_choice": "auto",
        "parallel_tool_calls": True,
        "temperature": 0,
        "max_tokens": 128,
    }
    assert be.build_request(it, tools, "slm", 8, system_prompt="")["messages"] == it.messages
    own = bd.BfclItem("x", "simple_python", [{"role": "system", "content": "S"}], [], [], None)
    assert be.build_request(own, [], "slm", 8)["messages"] == [{"role": "system", "content": "S"}]


def reply(calls: list[tuple[str, str]] | None, facts: Any = None) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": None if calls else "No."}
    if calls:
        message["tool_calls"] = [
            {"id": f"c{i}", "type": "function", "function": {"name": n, "arguments": a}}
            for i, (n, a) in enumerate(calls)
        ]
    body: dict[str, Any] = {
        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 120, "completion_tokens": 9, "total_tokens": 129},
    }
    if facts is not None:
        body["slmgate"] = facts
    return body


FACTS = {
    "route": "auto",
    "tier": "llm",
    "model": "llm",
    "valid": True,
    "executable": True,
    "cost_usd": 2e-6,
    "counterfactual_cost_usd": 3e-6,
    "fallback_reason": "low_confidence",
    "confidence": 0.4,
    "signals": {"mean_prob": 0.4, "min_prob": 0.1, "bogus": "x"},
    "attempts": [{"tier": "slm", "outcome": "escalated"}, {"tier": "llm", "outcome": "ok"}],
}


def test_judge_fills_facts_and_verdict() -> None:
    it = item("simple_python_0")
    tools, names = bd.openai_tools(it.functions)
    record = be.ItemRecord(it.category, it.id, "auto", "t", success=False)
    call = ("calculate_triangle_area", '{"base": 10, "height": 5}')
    be.judge(record, it, reply([call], FACTS), tools, names)
    assert record.success is True
    assert (record.tier, record.route, record.valid, record.executable) == (
        "llm",
        "auto",
        True,
        True,
    )
    assert record.executable_local is True
    assert (record.cost_usd, record.counterfactual_cost_usd) == (2e-6, 3e-6)
    assert (record.fallback_reason, record.confidence) == ("low_confidence", 0.4)
    assert record.signals == {"mean_prob": 0.4, "min_prob": 0.1}  # non-numbers dropped
    assert len(record.attempts) == 2
    assert (record.prompt_tokens, record.completion_tokens, record.calls) == (120, 9, 1)


def test_judge_degrades_when_facts_are_missing_or_malformed() -> None:
    it = item("irrelevance_0")
    tools, names = bd.openai_tools(it.functions)
    for facts in (None, "nope", {"tier": 3, "valid": "yes", "cost_usd": True, "signals": []}):
        record = be.ItemRecord(it.category, it.id, "slm", "t", success=False)
        be.judge(record, it, reply(None, facts), tools, names)
        assert record.success is True
        assert record.tier is None
        assert record.valid is None
        assert record.cost_usd is None
        assert record.signals == {}
        assert record.attempts == []
        assert record.executable_local is None
    record = be.ItemRecord(it.category, it.id, "slm", "t", success=True)
    be.judge(record, it, {"choices": []}, tools, names)
    assert (record.success, record.request_error, record.error_type) == (
        False,
        True,
        "request:no_choices",
    )


# ---- metrics, table, labels -------------------------------------------------------------------


def rec(policy: str, success: bool, **kw: Any) -> be.ItemRecord:
    kw.setdefault("category", "simple_python")
    kw.setdefault("id", "x")
    return be.ItemRecord(policy=policy, task_id="t", success=success, **kw)


RECORDS = [
    rec("slm", True, tier="slm", valid=True, executable_local=True, cost_usd=1.0, latency_s=1.0,
        prompt_tokens=10, completion_tokens=2),
    rec("slm", False, tier="slm", valid=False, executable_local=False, cost_usd=1.0, latency_s=2.0,
        prompt_tokens=10, completion_tokens=3, error_type="value_error:others"),
    rec("slm", True, category="irrelevance", tier="slm", valid=True, cost_usd=2.0, latency_s=3.0,
        prompt_tokens=5, completion_tokens=1),
    rec("slm", False, request_error=True, error_type="http_500", latency_s=0.01),
    rec("auto", True, tier="llm", valid=True, executable_local=True, cost_usd=4.0, latency_s=5.0,
        fallback_reason="low_confidence"),
    rec("auto", False, tier="slm", valid=True, executable_local=False, cost_usd=1.0,
        latency_s=1.0, error_type="ast_decoder:decoder_failed"),
]  # fmt: skip


def test_summarize_rates_cps_and_percentiles() -> None:
    s = be.summarize(RECORDS, "slm")
    assert (s["items"], s["successes"], s["accuracy"]) == (4, 2, 0.5)
    assert s["total_cost_usd"] == 4.0
    assert s["cps_usd"] == 2.0  # 4 $ over 2 successes
    assert s["mean_cost_usd"] == pytest.approx(4.0 / 3)  # over the items with a known cost
    assert s["schema_validity_rate"] == pytest.approx(2 / 3)  # replies only
    assert s["executable_call_rate"] == 0.5  # replies that called a tool
    assert s["fallback_rate"] == 0.0
    assert s["p50_latency_s"] == 2.0  # the failed request's 0.01 s is not a latency
    assert s["p95_latency_s"] == pytest.approx(2.9)
    assert (s["prompt_tokens"], s["completion_tokens"]) == (25, 6)
    assert s["request_errors"] == 1
    assert s["tiers"] == {"slm": 3}
    per = {k: {f: v[f] for f in ("items", "successes", "accuracy")}
           for k, v in s["per_category"].items()}  # fmt: skip
    assert per == {
        "simple_python": {"items": 3, "successes": 1, "accuracy": pytest.approx(1 / 3)},
        "irrelevance": {"items": 1, "successes": 1, "accuracy": 1.0},
    }
    simple, irrelevance = s["per_category"]["simple_python"], s["per_category"]["irrelevance"]
    assert (simple["schema_validity_rate"], simple["executable_call_rate"]) == (0.5, 0.5)
    assert (irrelevance["schema_validity_rate"], irrelevance["executable_call_rate"]) == (1.0, None)
    assert irrelevance["call_rate"] == 0.0  # it abstained
    assert s["error_types"] == {"http_500": 1, "value_error:others": 1}
    a = be.summarize(RECORDS, "auto")
    assert (a["accuracy"], a["cps_usd"], a["fallback_rate"]) == (0.5, 5.0, 0.5)


def test_summarize_empty_and_all_failed() -> None:
    empty = be.summarize([], "llm")
    assert empty["accuracy"] is None
    assert empty["cps_usd"] is None
    assert empty["p50_latency_s"] is None
    failed = be.summarize([rec("llm", False, cost_usd=1.0, tier="llm")], "llm")
    assert failed["cps_usd"] is None  # unbounded, not zero
    assert failed["accuracy"] == 0.0


def test_render_table_rows_per_policy_and_category() -> None:
    summaries = [be.summarize(RECORDS, p) for p in ("slm", "auto")]
    table = be.render_table(summaries, ["simple_python", "irrelevance"])
    assert table.splitlines() == [
        "| policy | items | accuracy | CPS $ | validity | executable | fallback | p50 s | p95 s "
        "| mean cost $ | tokens in/out | req errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        "| slm | 4 | 50.0% | 2 | 66.7% | 50.0% | 0.0% | 2.00 | 2.90 | 1.33 | 25/6 | 1 |",
        "| auto | 2 | 50.0% | 5 | 100.0% | 50.0% | 50.0% | 3.00 | 4.80 | 2.5 | 0/0 | 0 |",
        "",
        "| policy | simple_python | irrelevance |",
        "|---|---|---|",
        "| slm | 33.3% (3) | 100.0% (1) |",
        "| auto | 50.0% (2) | - |",
        "",
        "Per category: validity / executable calls / replies with a call",
        "",
        "| policy | simple_python | irrelevance |",
        "|---|---|---|",
        "| slm | 50.0% / 50.0% / 0.0% | 100.0% / - / 0.0% |",
        "| auto | 100.0% / 50.0% / 0.0% | - |",
    ]


def test_label_rows_come_from_slm_replies_only() -> None:
    records = [
        rec("slm", True, signals={"mean_prob": 0.9}, confidence=0.9, id="a",
            features={"tools": 1.0}),
        rec("slm", False, request_error=True, id="b"),
        rec("llm", True, signals={"mean_prob": 0.8}, confidence=0.8, id="a"),
    ]
    assert be.label_rows(records) == [
        {"signals": {"mean_prob": 0.9}, "kind": "tools", "confidence": 0.9, "success": True,
         "category": "simple_python", "id": "a", "features": {"tools": 1.0}},
    ]  # fmt: skip


def test_round_robin_takes_turns_across_categories() -> None:
    a = be.bfcl_data.load_items("simple_python", 2)
    b = be.bfcl_data.load_items("irrelevance", 3)
    assert [i.id for i in be.round_robin([a, b])] == [
        a[0].id, b[0].id, a[1].id, b[1].id, b[2].id]  # fmt: skip


def test_request_features_match_the_pre_router() -> None:
    item = be.bfcl_data.load_items("simple_python", 1)[0]
    tools, _ = be.bfcl_data.openai_tools(item.functions)
    features = be.request_features(be.build_request(item, tools, "slm", 64))
    assert features["tools"] == 1.0
    assert features["wants_tools"] == 1.0
    assert features["tool_params"] == len(tools[0]["function"]["parameters"]["properties"])
    assert be.request_features({"model": "x"}) == {}  # no messages: not a request


def test_records_round_trip_through_json() -> None:
    original = RECORDS[0]
    from dataclasses import asdict

    assert be.record_from_dict(json.loads(json.dumps(asdict(original)))) == original


# ---- the request loop against a scripted gateway ---------------------------------------------


class FakeGateway:
    """Answers simple_python_0 and _1 correctly under ``llm``, text under ``slm``, a 500 for
    ``boom``, and 404 for outcomes; records every request it saw."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, dict[str, Any]]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else {}
        self.seen.append((request.url.path, request.headers.get("x-task-id", ""), body))
        if request.url.path.endswith("/outcome"):
            return httpx.Response(404, json={"error": {"message": "not found"}})
        if body["model"] == "boom":
            return httpx.Response(500, text="upstream exploded")
        if body["model"] == "garbage":
            return httpx.Response(200, text="not json")
        if body["model"] == "slm":
            return httpx.Response(200, json=reply(None, {"tier": "slm", "cost_usd": 1e-6}))
        name = body["tools"][0]["function"]["name"]
        args = {"calculate_triangle_area": '{"base": 10, "height": 5}',
                "math_factorial": '{"number": 5}'}[name]  # fmt: skip
        return httpx.Response(200, json=reply([(name, args)], {"tier": "llm", "cost_usd": 1e-5}))


def args_for(tmp_path: Path, *extra: str) -> Any:
    return be.parse_args(["--base-url", "http://gw", "--categories", "simple_python",
                          "--limit", "2", "--run-id", "r1", "--quiet", "--no-warmup",
                          "--json", str(tmp_path / "out.json"), *extra])  # fmt: skip


def test_evaluate_interleaves_policies_and_reports_outcomes(tmp_path: Path) -> None:
    gw = FakeGateway()
    args = args_for(tmp_path, "--policies", "slm,llm", "--warmup")
    report = be.evaluate(args, "http://gw", httpx.MockTransport(gw))
    chats = [(tid, body["model"]) for path, tid, body in gw.seen if path.endswith("completions")]
    assert chats == [
        ("", "slm"),  # one unscored, untagged warm-up per policy
        ("", "llm"),
        ("bfcl-simple_python-simple_python_0-slm-r1", "slm"),
        ("bfcl-simple_python-simple_python_0-llm-r1", "llm"),
        ("bfcl-simple_python-simple_python_1-slm-r1", "slm"),
        ("bfcl-simple_python-simple_python_1-llm-r1", "llm"),
    ]
    outcomes = [(p, b) for p, _, b in gw.seen if p.endswith("/outcome")]
    assert outcomes[:2] == [
        ("/v1/tasks/bfcl-simple_python-simple_python_0-slm-r1/outcome", {"success": False}),
        ("/v1/tasks/bfcl-simple_python-simple_python_0-llm-r1/outcome", {"success": True}),
    ]
    by_policy = {s["policy"]: s for s in report["summaries"]}
    assert by_policy["llm"]["accuracy"] == 1.0
    assert by_policy["slm"]["accuracy"] == 0.0
    assert by_policy["llm"]["cps_usd"] == pytest.approx(1e-5)
    assert all(r["latency_s"] > 0 for r in report["records"])


def test_concurrency_keeps_requests_in_flight_together(tmp_path: Path) -> None:
    gw = FakeGateway()
    together = threading.Barrier(2, timeout=10)  # breaks unless both requests are in flight

    def paired(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("completions"):
            together.wait()
        return gw(request)

    report = be.evaluate(args_for(tmp_path, "--policies", "llm", "--concurrency", "2"),
                         "http://gw", httpx.MockTransport(paired))  # fmt: skip
    assert report["concurrency"] == 2
    assert sorted((r["id"], r["success"]) for r in report["records"]) == [
        ("simple_python_0", True), ("simple_python_1", True),
    ]  # fmt: skip


def test_request_errors_are_recorded_not_raised(tmp_path: Path) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    gw = FakeGateway()
    report = be.evaluate(args_for(tmp_path, "--policies", "boom,garbage"), "http://gw",
                         httpx.MockTransport(gw))  # fmt: skip
    kinds = [(r["policy"], r["error_type"], r["request_error"]) for r in report["records"]]
    assert kinds == [("boom", "http_500", True), ("garbage", "request:JSONDecodeError", True)] * 2
    assert not any(p.endswith("/outcome") for p, _, _ in gw.seen)
    down = be.evaluate(args_for(tmp_path, "--policies", "llm"), "http://gw",
                       httpx.MockTransport(refuse))  # fmt: skip
    assert {r["error_type"] for r in down["records"]} == {"request:ConnectError"}
    assert down["summaries"][0]["accuracy"] == 0.0


def test_resume_sends_only_missing_or_failed_items(tmp_path: Path) -> None:
    args = args_for(tmp_path, "--policies", "llm,boom")
    first = be.evaluate(args, "http://gw", httpx.MockTransport(FakeGateway()))
    (tmp_path / "out.json").write_text(json.dumps(first))
    gw = FakeGateway()
    resumed = be.evaluate(args_for(tmp_path, "--policies", "llm,boom", "--resume"), "http://gw",
                          httpx.MockTransport(gw))  # fmt: skip
    sent = [b["model"] for p, _, b in gw.seen if p.endswith("completions")]
    assert sent == ["boom", "boom"]  # the llm records were kept, the failed requests retried
    assert len(resumed["records"]) == 4


def test_main_writes_json_labels_and_prints_tables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real_evaluate = be.evaluate

    def offline(args: Any, base_url: str, transport: Any = None) -> dict[str, Any]:
        return real_evaluate(args, base_url, httpx.MockTransport(FakeGateway()))

    monkeypatch.setattr(be, "evaluate", offline)
    labels = tmp_path / "labels.jsonl"
    argv = [
        "--base-url",
        "http://gw/",
        "--categories",
        "simple",
        "--limit",
        "1",
        "--quiet",
        "--policies",
        "slm,llm",
        "--json",
        str(tmp_path / "o.json"),
        "--labels",
        str(labels),
    ]
    assert be.main(argv) == 0
    out = capsys.readouterr().out
    assert "| slm | 1 | 0.0% |" in out
    assert "| llm | 1 | 100.0% |" in out
    report = json.loads((tmp_path / "o.json").read_text())
    assert report["partial"] is False
    assert report["base_url"] == "http://gw"
    assert [(r["policy"], r["success"]) for r in report["records"]] == [
        ("slm", False),
        ("llm", True),
    ]
    rows = [json.loads(line) for line in labels.read_text().splitlines()]
    features = rows[0].pop("features")
    assert rows == [{"signals": {}, "kind": "tools", "confidence": None, "success": False,
                     "category": "simple_python", "id": "simple_python_0"}]  # fmt: skip
    assert features["tools"] >= 1.0


def test_parse_args_rejects_bad_input() -> None:
    with pytest.raises(SystemExit):
        be.parse_args(["--categories", "nope"])
    with pytest.raises(SystemExit):
        be.parse_args(["--limit", "0"])
    with pytest.raises(SystemExit):
        be.parse_args(["--concurrency", "0"])
    with pytest.raises(SystemExit):
        be.parse_args(["--policies", "llm", "--labels", "x.jsonl"])


def test_interrupt_keeps_a_partial_report_to_resume_from(tmp_path: Path) -> None:
    gw = FakeGateway()
    calls = 0

    def flaky(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        if request.url.path.endswith("completions"):
            calls += 1
            if calls == 2:
                raise KeyboardInterrupt
        return gw(request)

    with pytest.raises(KeyboardInterrupt):
        be.evaluate(
            args_for(tmp_path, "--policies", "llm"), "http://gw", httpx.MockTransport(flaky)
        )
    saved = json.loads((tmp_path / "out.json").read_text())
    assert saved["partial"] is True
    assert [(r["id"], r["success"]) for r in saved["records"]] == [("simple_python_0", True)]


def test_simulate_cascade_from_single_tier_records() -> None:
    records = [
        rec("slm", True, id="a", cost_usd=1.0, valid=True, signals={"mean_prob": 0.9}),
        rec("llm", True, id="a", cost_usd=4.0, valid=True),
        rec("slm", False, id="b", cost_usd=1.0, valid=True, signals={"mean_prob": 0.3}),
        rec("llm", True, id="b", cost_usd=4.0, valid=True),
        rec("slm", False, id="c", cost_usd=1.0, valid=False, signals={"mean_prob": 0.95}),
        rec("llm", False, id="c", cost_usd=4.0, valid=True),
        rec("slm", True, id="d", cost_usd=1.0),  # no llm twin: left out
    ]
    sim = be.simulate_cascade(records, "mean_prob", 0.5)
    assert sim is not None
    assert sim["items"] == 3
    assert sim["fallback_rate"] == pytest.approx(2 / 3)  # b (low score), c (invalid)
    assert sim["accuracy"] == pytest.approx(2 / 3)  # a kept ok, b escalated ok, c escalated bad
    assert sim["total_cost_usd"] == pytest.approx(3 * 1.0 + 2 * 4.0)
    assert sim["cps_usd"] == pytest.approx(11.0 / 2)
    assert be.simulate_cascade(records[:1], "mean_prob", 0.5) is None


def test_tool_forms_classes_and_first_call_end() -> None:
    from benchmarks.tool_forms import after_class, end_of_first_call, first_class

    assert [first_class(t) for t in ("```", "{\n", '{"', "[\n", "<", "To", " The")] == [
        "fence", "bare", "bare", "array", "tag", "text", "text"]  # fmt: skip
    after = ('{"', "\n{", ",{", "```", "]", "<tool_call>", "Hi")
    assert [after_class(t, False) for t in after] == [
        "another_call",
        "another_call",
        "another_call",
        "stop",
        "stop",
        "another_call",
        "other",
    ]
    assert after_class("", True) == "stop"
    text = '```json\n{"name": "f", "arguments": {"s": "}{"}}\n{"name": "g"}'
    assert text[: end_of_first_call(text)].endswith('"}{"}}')
    assert end_of_first_call("no call") is None


def attempt_fact(tier: str, cost: float, prompt: int | None, completion: int | None) -> Any:
    return {"tier": tier, "cost_usd": cost, "prompt_tokens": prompt,
            "completion_tokens": completion}


def test_reprice_prices_one_tier_per_token_and_keeps_the_others_measured() -> None:
    records = [
        rec("auto", True, id="a", cost_usd=0.5,  # slm kept: its measured cost stays
            attempts=[attempt_fact("slm", 0.5, 1000, 10)]),
        rec("auto", True, id="b", cost_usd=2.5,  # escalated: slm measured + llm per token
            attempts=[attempt_fact("slm", 0.5, 1000, 10), attempt_fact("llm", 2.0, 1000, 100)]),
        rec("llm", False, id="c", request_error=True),  # no cost known: unchanged
    ]  # fmt: skip
    out = be.reprice(records, "llm", 2.0, 10.0)  # $ per 1M tokens in / out
    assert out is not None
    assert [r.cost_usd for r in out] == [0.5, pytest.approx(0.5 + (2000 + 1000) / 1e6), None]
    assert records[1].cost_usd == 2.5  # the input records are not changed
    old_run = [rec("llm", True, cost_usd=1.0, attempts=[{"tier": "llm", "cost_usd": 1.0}])]
    assert be.reprice(old_run, "llm", 2.0, 10.0) is None


def test_report_only_reprints_a_saved_run_with_a_hosted_price(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    saved = {
        "base_url": "http://gw", "run_id": "r9", "categories": ["simple_python"],
        "policies": ["llm"], "limit": 1, "max_tokens": 64, "bfcl_eval_version": None,
        "records": [dataclasses.asdict(rec("llm", True, tier="llm", cost_usd=0.25,
                                           attempts=[attempt_fact("llm", 0.25, 10**6, 0)]))],
    }  # fmt: skip
    path = tmp_path / "run.json"
    path.write_text(json.dumps(saved))
    assert be.main(["--report-only", "--json", str(path), "--reprice", "llm=gpt-4o"]) == 0
    out = capsys.readouterr().out
    assert "run r9" in out
    assert "| llm | 1 | 100.0% | 0.25 |" in out  # measured
    assert "Repriced: tier llm at gpt-4o ($2.5 in / $10 out per 1M)" in out
    assert "| llm | 1 | 100.0% | 2.5 |" in out  # 1M prompt tokens at $2.5
    assert json.loads(path.read_text()) == saved  # a report is never rewritten
    with pytest.raises(SystemExit):
        be.parse_args(["--report-only", "--json", str(tmp_path / "missing.json")])
    with pytest.raises(SystemExit):
        be.parse_args(["--report-only", "--json", str(path), "--reprice", "gpt-4o"])
    # explicit prices, several tiers at once
    assert be.main(["--report-only", "--json", str(path), "--reprice", "llm=0.5/1,slm=1/2"]) == 0
    out = capsys.readouterr().out
    assert "Repriced: tier llm at $0.5 in / $1 out per 1M; tier slm at $1 in / $2 out" in out
    assert "| llm | 1 | 100.0% | 0.5 |" in out
    assert be.main(["--report-only", "--json", str(path), "--reprice", "llm=nope-model"]) == 0
    assert "--reprice: 'nope-model' is neither" in capsys.readouterr().out


def test_stream_table_by_position_with_memory_shown() -> None:
    def at(policy: str, n: int, ok: bool, prompt: int, reason: str | None = None) -> Any:
        facts = [attempt_fact("slm", 0.1, prompt, 5)]
        return rec(policy, ok, id=f"multiple_{n}", category="multiple", tier="slm",
                   fallback_reason=reason, attempts=facts)  # fmt: skip

    records = [
        at("slm", 0, True, 100), at("slm", 1, False, 100), at("slm", 2, True, 120),
        at("mem", 0, True, 100), at("mem", 1, True, 100, "low_confidence"),
        at("mem", 2, True, 180),  # demonstrations added 60 prompt tokens
    ]  # fmt: skip
    rows = be.stream_table(records, ["slm", "mem"], bucket=2)
    view = [(r["policy"], r["items"], r["n"], r["accuracy"], r["escalated"], r["shown"])
            for r in rows]  # fmt: skip
    assert view == [
        ("slm", "0-1", 2, 0.5, 0.0, 0.0), ("slm", "2-3", 1, 1.0, 0.0, 0.0),
        ("mem", "0-1", 2, 1.0, 0.5, 0.0), ("mem", "2-3", 1, 1.0, 0.0, 1.0),
    ]  # fmt: skip
    table = be.render_stream(rows).splitlines()
    assert table[-1] == "| mem | 2-3 | 1 | 100.0% | 0.0% | 100.0% |"


def test_apply_facts_counts_memory_examples() -> None:
    record = rec("auto", False)
    be.apply_facts(record, {"slmgate": {"memory_examples": ["a", "b"]}})
    assert record.memory_examples == 2
    be.apply_facts(record, {"slmgate": {}})
    assert record.memory_examples is None


def test_compare_escalation_pairs_items_and_reads_the_answering_attempt() -> None:
    from benchmarks.bfcl_report import ItemRecord, compare_escalation, render_escalation

    def rec(item: str, policy: str, output: str, latency: float, reused: int | None,
            escalated: bool = True) -> ItemRecord:  # fmt: skip
        last = {"outcome": "accepted", "latency_s": latency / 2, "completion_tokens": 10,
                "escalation": "verified" if reused is not None else None,
                "reused_tokens": reused}  # fmt: skip
        return ItemRecord("simple", item, policy, "t", success=output == "ok", output=output,
                          latency_s=latency, tier="llm" if escalated else "slm",
                          fallback_reason="low_confidence" if escalated else None,
                          attempts=[{"outcome": "escalated"}, last])  # fmt: skip

    records = [
        rec("1", "v", "ok", 2.0, 8), rec("1", "r", "ok", 6.0, None),
        rec("2", "v", "ok", 4.0, 2), rec("2", "r", "bad", 8.0, None),
        rec("3", "v", "ok", 1.0, None, escalated=False), rec("3", "r", "ok", 1.0, None, False),
    ]
    c = compare_escalation(records, "v", "r")
    assert (c["items"], c["identical_replies"], c["escalated_both"]) == (3, 2, 2)
    assert c["identical_escalated"] == 1
    assert c["successes"] == (3, 2)
    assert (c["reused_tokens"], c["answer_tokens"], c["reused_share"]) == (10, 20, 0.5)
    assert c["p50_latency_s"] == (3.0, 7.0)
    assert c["p50_answer_attempt_s"] == (1.5, 3.5)
    assert "10 of 20 (50.0%)" in render_escalation(c)


# ---- --format json: the same call as a structured output ------------------------------------


def test_json_request_asks_for_the_functions_arguments_as_a_schema() -> None:
    it = item("simple_python_0")
    tools, _ = bd.openai_tools(it.functions)
    body = be.build_json_request(it, tools, "slm", 96)
    assert "tools" not in body
    assert "tool_choice" not in body
    fmt = body["response_format"]
    assert fmt["type"] == "json_schema"
    assert fmt["json_schema"]["name"] == "calculate_triangle_area"
    assert fmt["json_schema"]["schema"] == tools[0]["function"]["parameters"]
    assert body["messages"][0]["role"] == "system"
    assert "`calculate_triangle_area`" in body["messages"][0]["content"]
    assert body["messages"][1:] == [m for m in it.messages if m["role"] != "system"]
    several = item("multiple_0")
    with pytest.raises(ValueError, match="one function"):
        be.build_json_request(several, bd.openai_tools(several.functions)[0], "slm", 96)


def test_judge_reads_a_json_reply_as_the_call_it_stands_for() -> None:
    it = item("simple_python_0")
    tools, names = bd.openai_tools(it.functions)

    def judged(content: str) -> be.ItemRecord:
        record = be.ItemRecord(it.category, it.id, "slm", "t", success=False, kind="json")
        body = reply(None)
        body["choices"][0]["message"]["content"] = content
        be.judge(record, it, body, tools, names)
        return record

    right = judged('{"base": 10, "height": 5}')
    assert (right.success, right.calls, right.executable_local) == (True, 1, True)
    wrong = judged('{"base": 11, "height": 5}')
    assert (wrong.success, wrong.error_type) == (False, "value_error:others")
    assert judged('{"base": 10, "hei').success is False  # a cut reply is a wrong one
    rows = be.label_rows([dataclasses.replace(right, signals={"lp_q10": -0.1})])
    assert rows[0]["kind"] == "json"


def test_json_format_sends_only_single_function_items(tmp_path: Path) -> None:
    gw = FakeGateway()
    args = be.parse_args(["--base-url", "http://gw", "--categories", "simple_python,multiple",
                          "--limit", "2", "--run-id", "r1", "--quiet", "--policies", "slm",
                          "--format", "json", "--json", str(tmp_path / "out.json")])  # fmt: skip
    report = be.evaluate(args, "http://gw", httpx.MockTransport(gw))
    sent = [body for path, _, body in gw.seen if path.endswith("completions")]
    assert {r["category"] for r in report["records"]} == {"simple_python"}  # multiple: skipped
    assert all("response_format" in b and "tools" not in b for b in sent)
    assert len(sent) == 2  # no warm-up in json form
    assert report["format"] == "json"
    assert all(r["kind"] == "json" for r in report["records"])
