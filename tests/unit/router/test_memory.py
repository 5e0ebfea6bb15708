"""Escalation memory: pure retrieval and the no-look-ahead rule, the SQL store, and a cascade
that learns from an escalation (scripted backends)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from decoding.constraint import ToolCalls, ToolSpec
from decoding.types import GenerationRequest, SamplingParams
from decoding.validate import check_output
from router.confidence import EarlyFallback
from router.ledger import Ledger
from router.memory import (
    DEMO_HEADER,
    EscalationMemory,
    MemoryConfig,
    answer_text,
    similarity,
    with_demonstrations,
)
from router.router import Route, Router, Trace
from tests.unit.router.test_cascade import Scripted, tokens

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}  # fmt: skip
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}


def request(prompt: str, tools: tuple[dict[str, Any], ...] = (WEATHER,), system: str = "") -> (
    GenerationRequest
):  # fmt: skip
    messages: list[dict[str, Any]] = [{"role": "user", "content": prompt}]
    if system:
        messages.insert(0, {"role": "system", "content": system})
    specs = tuple(ToolSpec(t["function"]["name"], t["function"]["parameters"]) for t in tools)
    return GenerationRequest(tuple(messages), SamplingParams(temperature=0.0),
                             ToolCalls(specs), tools, request_id="r", task_id="t")  # fmt: skip


def test_recall_prefers_shared_tools_and_words_and_never_returns_the_request_itself() -> None:
    memory = EscalationMemory("auto", MemoryConfig(enabled=True, k=2, min_similarity=0.1))
    memory.add(request("weather in Paris today"), "a", now=1.0)
    memory.add(request("what time is it in Tokyo", (TIME,)), "b", now=2.0)
    memory.add(request("weather in Rome tomorrow"), "c", now=3.0)
    got = memory.recall(request("weather in Paris today"))  # the same request was kept: skipped
    assert [e.answer for e in got] == ["c"]  # shares get_weather and "weather in"
    assert [e.answer for e in memory.recall(request("time in Oslo", (TIME,)))] == ["b"]


def test_no_look_ahead_on_an_ordered_stream() -> None:
    """Each request sees only examples added before it, never its own."""
    memory = EscalationMemory("auto", MemoryConfig(enabled=True, k=5, min_similarity=0.0))
    stream = [f"weather in city {i}" for i in range(6)]
    for position, prompt in enumerate(stream):
        seen = {e.prompt for e in memory.recall(request(prompt))}
        assert seen <= set(stream[:position])
        assert prompt not in seen
        memory.add(request(prompt), f"answer {position}", now=float(position))


def test_memory_is_bounded_oldest_first() -> None:
    memory = EscalationMemory("auto", MemoryConfig(enabled=True, max_examples=2))
    for i in range(4):
        memory.add(request(f"weather {i}"), str(i), now=float(i))
    assert len(memory) == 2
    assert {e.answer for e in memory.recall(request("weather"))} == {"2", "3"}


def test_similarity_bounds() -> None:
    memory = EscalationMemory("auto", MemoryConfig(enabled=True))
    example = memory.add(request("weather in Paris"), "x", now=0.0)
    assert similarity(["get_weather"], "weather in Paris", example) == 1.0
    assert similarity(["other"], "nothing shared", example) == 0.0


def test_demonstrations_go_into_the_system_message() -> None:
    memory = EscalationMemory("auto", MemoryConfig(enabled=True))
    example = memory.add(request("weather in Paris"), "<tool_call>x</tool_call>", now=0.0)
    plain = with_demonstrations(request("weather in Rome"), [example])
    assert plain.messages[0]["role"] == "system"
    assert plain.messages[0]["content"].startswith(DEMO_HEADER)
    assert "Request: weather in Paris\nAnswer:\n<tool_call>x</tool_call>" in plain.messages[0][
        "content"]  # fmt: skip
    kept = with_demonstrations(request("weather in Rome", system="Be brief."), [example])
    assert kept.messages[0]["content"].startswith("Be brief.\n\n" + DEMO_HEADER)
    assert kept.messages[1:] == request("weather in Rome").messages


def test_answer_text_writes_calls_as_tagged_blocks() -> None:
    constraint = request("x").constraint
    text = '```json\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n```'
    assert answer_text(check_output(constraint, text), text) == (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    )


def test_sql_store_persists_and_bounds_per_route(tmp_path: Path) -> None:
    ledger = Ledger(f"sqlite:///{tmp_path / 'l.sqlite3'}")
    store = ledger.memory_store()
    config = MemoryConfig(enabled=True, max_examples=2)
    first = EscalationMemory("auto", config, store)
    for i in range(3):
        first.add(request(f"weather {i}"), str(i), now=float(i))
    EscalationMemory("other", config, store).add(request("weather 9"), "9", now=9.0)
    again = EscalationMemory("auto", config, ledger.memory_store())  # a restart
    assert len(again) == 2
    assert {e.answer for e in again.recall(request("weather"))} == {"1", "2"}


CALL = '{"name": "get_weather", "arguments": {"city": "Paris"}}'


async def test_a_cascade_learns_from_an_escalation_and_shows_it_next_time() -> None:
    slm = Scripted("slm", "slm", tokens(CALL, 0.2))  # always unsure: escalates
    llm = Scripted("llm", "llm", tokens(CALL, 0.99))
    route = Route("auto", ("slm", "llm"), policy="cascade", threshold=0.5,
                  memory=MemoryConfig(enabled=True, k=1),
                  early_fallback=EarlyFallback(enabled=False))  # fmt: skip
    router = Router({"slm": slm, "llm": llm}, {"auto": route})

    async def ask(prompt: str) -> Any:
        req = request(prompt)
        trace = Trace("r", "auto", "t")
        plan = await router.plan_async(route, req, trace)
        return await router.complete(plan, req, trace)

    first = await ask("weather in Paris")
    assert first.fallback_reason == "low_confidence"
    assert first.memory_examples == ()
    assert all(len(r.messages) == 1 for r in slm.seen)  # nothing to show yet
    slm.seen.clear()
    second = await ask("weather in Paris please")
    assert len(second.memory_examples) == 1
    shown = slm.seen[0].messages[0]
    assert shown["role"] == "system"
    assert "Request: weather in Paris\nAnswer:\n<tool_call>" in shown["content"]
    assert all(len(r.messages) == 1 for r in llm.seen)  # the large tier gets the caller's request


def test_the_gateway_keeps_memory_in_the_ledger_database(tmp_path: Path) -> None:
    from gateway.config import GatewayConfig
    from gateway.metrics import GatewayMetrics
    from gateway.state import Gateway

    route = Route("auto", ("slm", "llm"), policy="cascade", memory=MemoryConfig(enabled=True))
    slm, llm = Scripted("slm", "slm", tokens(CALL, 0.2)), Scripted("llm", "llm", tokens(CALL, 1))
    router = Router({"slm": slm, "llm": llm}, {"auto": route})
    ledger = Ledger(f"sqlite:///{tmp_path / 'l.sqlite3'}")
    Gateway(GatewayConfig(routes=(route,), ledger_url="off"), router, ledger, GatewayMetrics())
    memory = router.memory(route)
    assert memory is not None
    memory.add(request("weather in Paris"), "x", now=1.0)
    again = EscalationMemory("auto", route.memory, ledger.memory_store())
    assert [e.answer for e in again.recall(request("weather in Paris today"))] == ["x"]
