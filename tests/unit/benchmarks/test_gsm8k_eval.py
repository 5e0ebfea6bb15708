"""``slmgate eval gsm8k``: answers read from free text and from JSON, the requests of each format,
and the labelled rows ``slmgate calibrate`` reads (the run itself needs models)."""

from __future__ import annotations

import json

import jsonschema

from benchmarks import gsm8k_eval
from benchmarks.gsm8k_eval import Problem, Record, json_answer, label_rows, request_body
from router.deferral import KINDS

PROBLEM = Problem(7, "Tom has 3 apples and buys 4 more. How many now?", "7")


def test_json_answer_reads_the_numeric_answer_only() -> None:
    assert json_answer('{"steps": ["3 + 4 = 7"], "answer": 7}') == "7"
    assert json_answer('{"steps": [], "answer": 1250.0}') == "1250"
    assert json_answer('{"steps": [], "answer": 0.5}') == "0.5"
    # A cut, malformed or non-numeric reply is a wrong one, never read as free text.
    assert json_answer('{"steps": ["3 + 4 = 7"], "answer": ') is None
    assert json_answer('{"steps": [], "answer": "7"}') is None
    assert json_answer('{"steps": [], "answer": true}') is None
    assert json_answer("[7]") is None
    assert json_answer("#### 7") is None


def test_text_request_has_no_response_format() -> None:
    body = request_body(PROBLEM, "slm", 256, "text")
    assert "response_format" not in body
    assert body["messages"][0]["content"] == gsm8k_eval.SYSTEM_PROMPT
    assert body["messages"][1]["content"] == PROBLEM.question
    assert (body["model"], body["max_tokens"], body["temperature"]) == ("slm", 256, 0)


def test_json_request_asks_for_a_strict_schema_its_answers_satisfy() -> None:
    body = request_body(PROBLEM, "slm", 256, "json")
    fmt = body["response_format"]
    assert fmt["type"] == "json_schema"
    assert fmt["json_schema"]["strict"] is True
    schema = fmt["json_schema"]["schema"]
    jsonschema.validate({"steps": ["3 + 4 = 7"], "answer": 7}, schema)
    bad = {"steps": [], "answer": 7, "extra": 1}
    assert not jsonschema.Draft202012Validator(schema).is_valid(bad)
    assert body["messages"][0]["content"] == gsm8k_eval.JSON_SYSTEM_PROMPT


def test_label_rows_keep_one_policy_with_signals_and_kind() -> None:
    signals = {"lp_q10": -0.3, "valid": 1.0}
    records = [
        Record(1, "slm", kind="json", correct=True, signals=signals),
        Record(2, "slm", kind="json", correct=False, signals=signals),
        Record(3, "llm", kind="json", correct=True, signals=signals),
        Record(4, "slm", kind="json", error="http_500: boom"),
        Record(5, "slm", kind="json", correct=False),  # no signals: nothing to learn from
    ]
    rows = label_rows(records, "slm")
    assert [r["id"] for r in rows] == ["gsm8k-1", "gsm8k-2"]
    assert [r["success"] for r in rows] == [True, False]
    assert all(r["kind"] == "json" and r["kind"] in KINDS for r in rows)
    assert json.loads(json.dumps(rows[0]))["signals"] == signals


def test_parse_args_formats_and_concurrency() -> None:
    args = gsm8k_eval.parse_args(["--format", "json", "--concurrency", "8", "--labels", "x.jsonl"])
    assert (args.format, args.concurrency, str(args.labels)) == ("json", 8, "x.jsonl")
    assert gsm8k_eval.parse_args([]).format == "text"
