"""SLM-first routing end to end: a live ``slmgate serve`` with the real models, the openai SDK,
and the ledger read back through the task API — once on SQLite, once on PostgreSQL."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from tests.integration.conftest import KEY

pytestmark = pytest.mark.slow

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                   "city": {"type": "string"}},
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}  # fmt: skip
# ``contains`` is checked after generation (xgrammar does not enforce it): SmolLM2 writes an
# array without a 7, which fails validation; the cascade escalates to Qwen.
CONTAINS = {"type": "array", "items": {"type": "integer"}, "minItems": 3, "maxItems": 5,
            "contains": {"const": 7}}  # fmt: skip


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def gateway(request: pytest.FixtureRequest) -> str:
    """The shared live server (SQLite ledger) or its PostgreSQL twin."""
    base: str = request.getfixturevalue("server" if request.param == "sqlite" else "pg_server")
    return base


@pytest.fixture
def sdk(gateway: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{gateway}/v1", api_key=KEY, max_retries=0) as c:
        yield c


def ask(sdk: openai.OpenAI, task: str, messages: list[dict[str, str]], schema: dict[str, Any],
        **extra: Any) -> Any:  # fmt: skip
    return sdk.chat.completions.create(
        model="cascade", messages=messages, temperature=0, max_tokens=60,  # type: ignore[arg-type]
        response_format={"type": "json_schema",
                         "json_schema": {"name": "out", "schema": schema}},
        extra_headers={"X-Task-Id": task}, **extra,
    )  # fmt: skip


def task_rows(base: str, task: str, requests: int = 1) -> dict[str, Any]:
    """The task as the ledger has it, once its requests are written (writes are async)."""
    deadline = time.monotonic() + 20
    while True:
        r = httpx.get(f"{base}/v1/tasks/{task}", headers={"Authorization": f"Bearer {KEY}"})
        if r.status_code == 200 and len(r.json()["requests"]) >= requests:
            found: dict[str, Any] = r.json()
            return found
        assert time.monotonic() < deadline, f"task {task} not in the ledger: {r.text}"
        time.sleep(0.2)


def test_confident_request_stays_on_the_slm(gateway: str, sdk: openai.OpenAI) -> None:
    task = f"stay-{uuid.uuid4().hex[:8]}"
    text = "Extract: John Smith is 42 years old and lives in Boston."
    messages = [{"role": "user", "content": text}]
    resp = ask(sdk, task, messages, PERSON)
    facts = resp.model_extra["slmgate"]
    value = json.loads(resp.choices[0].message.content or "")
    jsonschema.validate(value, PERSON)
    assert value == {"name": "John Smith", "age": 42, "city": "Boston"}
    assert facts["tier"] == "slm"
    assert facts["fallback_reason"] is None
    assert [a["outcome"] for a in facts["attempts"]] == ["accepted"]
    assert facts["confidence"] >= 0.5  # the route's threshold

    ledger = task_rows(gateway, task)
    assert ledger["outcome_source"] == "inferred"
    assert ledger["success"] is True
    (row,) = ledger["requests"]
    assert row["tier"] == "slm"
    assert row["status"] == 200
    assert row["schema_valid"] is True
    assert row["prompt_tokens"] == resp.usage.prompt_tokens
    assert row["completion_tokens"] == resp.usage.completion_tokens
    assert row["cost_usd"] == pytest.approx(facts["cost_usd"], rel=1e-6)
    (attempt,) = row["attempts"]
    assert attempt["backend"] == "slm"
    assert attempt["confidence"] == pytest.approx(facts["confidence"])


def test_invalid_answer_is_escalated_and_recorded(gateway: str, sdk: openai.OpenAI) -> None:
    task = f"escalate-{uuid.uuid4().hex[:8]}"
    messages = [{"role": "user", "content": "List some numbers, including 7."}]
    resp = ask(sdk, task, messages, CONTAINS)
    facts = resp.model_extra["slmgate"]
    jsonschema.validate(json.loads(resp.choices[0].message.content or ""), CONTAINS)
    assert facts["tier"] == "llm"
    assert facts["fallback_reason"] == "invalid"
    assert [(a["tier"], a["outcome"]) for a in facts["attempts"]] == [
        ("slm", "escalated"), ("llm", "accepted")]  # fmt: skip
    assert facts["cost_usd"] == pytest.approx(sum(a["cost_usd"] for a in facts["attempts"]))

    ok = httpx.post(f"{gateway}/v1/tasks/{task}/outcome", json={"success": False},
                    headers={"Authorization": f"Bearer {KEY}"})  # fmt: skip
    assert ok.status_code == 200
    assert ok.json()["recorded"] is True
    ledger = task_rows(gateway, task)
    assert ledger["success"] is False  # the reported outcome wins over the inferred one
    assert ledger["outcome_source"] == "reported"
    (row,) = ledger["requests"]
    assert row["fallback"] is True
    assert row["fallback_reason"] == "invalid"
    assert row["tier"] == "llm"
    slm_try, llm_try = row["attempts"]
    assert (slm_try["outcome"], slm_try["schema_valid"]) == ("escalated", False)
    assert (llm_try["outcome"], llm_try["schema_valid"]) == ("accepted", True)
    assert row["counterfactual_cost_usd"] == pytest.approx(llm_try["cost_usd"], rel=1e-6)


def test_streamed_json_on_a_cascade_is_decided_before_the_first_byte(
    gateway: str, sdk: openai.OpenAI
) -> None:
    task = f"stream-{uuid.uuid4().hex[:8]}"
    messages = [{"role": "user", "content": "List some numbers, including 7."}]
    stream = ask(sdk, task, messages, CONTAINS, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    jsonschema.validate(json.loads(text), CONTAINS)  # the escalated, valid answer only
    (row,) = task_rows(gateway, task)["requests"]
    assert row["stream"] is True
    assert row["tier"] == "llm"
    assert row["ttft_s"] is not None


def test_caller_errors_get_a_ledger_row_too(gateway: str, sdk: openai.OpenAI) -> None:
    task = f"bad-{uuid.uuid4().hex[:8]}"
    with pytest.raises(openai.BadRequestError) as info:
        ask(sdk, task, [{"role": "user", "content": "x"}],
            {"type": "object", "properties": {"a": {"$ref": "https://example.com/a.json"}}})
    assert info.value.status_code == 400
    (row,) = task_rows(gateway, task)["requests"]
    assert row["status"] == 400
    assert row["error_type"] == "invalid_request_error"
    assert row["attempts"] == []


def test_stats_reflect_the_route(gateway: str) -> None:
    r = httpx.get(f"{gateway}/v1/stats", params={"window": "1h", "route": "cascade"},
                  headers={"Authorization": f"Bearer {KEY}"})  # fmt: skip
    assert r.status_code == 200
    stats = r.json()
    assert stats["requests"] >= 4
    assert stats["by_tier"]["slm"]["attempts"] >= 3
    assert stats["by_tier"]["llm"]["answered"] >= 2
    assert 0 < stats["fallback_rate"] < 1
    assert stats["fallback_reasons"]["invalid"] >= 2
    assert stats["ledger"]["write_failures"] == 0
