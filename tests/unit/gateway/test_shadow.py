"""Shadow mode through the gateway with scripted backends: the client's answer is exactly the top
tier's, the small model's answer is recorded beside it with its agreement as the task outcome,
and a full queue drops shadow answers instead of delaying anyone."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from decoding.backend import BackendInfo, FinishEvent
from decoding.constraint import JsonSchema, NoConstraint, ToolCalls, ToolSpec
from decoding.types import GenerationRequest, TokenEvent
from decoding.validate import OutputCheck, check_output
from gateway.app import create_app
from gateway.config import GatewayConfig, Limits
from router.ledger import Ledger
from router.router import Route, Router
from router.shadow import agreement

CALL = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
OTHER = '{"name": "get_weather", "arguments": {"city": "Rome"}}'


class Scripted:
    def __init__(self, tier: str, text: str, delay: float = 0.0):
        self.info = BackendInfo(tier, tier, f"scripted-{tier}", 4096, True, True,
                                price_in_per_mtok=1.0, price_out_per_mtok=1.0)  # fmt: skip
        self.text, self.delay, self.calls = text, delay, 0
        self.ready = True

    def prepare(self, req: GenerationRequest) -> str:
        return "prepared"

    def token_text(self, token_id: int) -> str:
        return self.text[token_id]

    async def generate(
        self, req: GenerationRequest, prepared: Any = None
    ) -> AsyncIterator[TokenEvent | FinishEvent]:
        self.calls += 1
        await asyncio.sleep(self.delay)
        for i, ch in enumerate(self.text):
            yield TokenEvent(0, i, ch, -0.1, 0.2, 1.0, False)
        yield FinishEvent(0, "stop", "", 5)


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]  # fmt: skip
BODY: dict[str, Any] = {
    "model": "shadowed", "messages": [{"role": "user", "content": "Weather in Paris?"}],
    "tools": TOOLS, "temperature": 0,
}  # fmt: skip


def client_for(
    slm: Scripted, llm: Scripted, ledger: Ledger, pending: int = 16
) -> httpx.AsyncClient:
    routes = (Route("shadowed", ("slm", "llm"), policy="shadow"), Route("llm", ("llm",)))
    config = GatewayConfig(routes=routes, limits=Limits(max_shadow_pending=pending),
                           ledger_url="off")  # fmt: skip
    router = Router({"slm": slm, "llm": llm}, {r.name: r for r in routes})
    app = create_app(config, router, ledger)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def without_ids(choices: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for choice in choices:
        for call in choice["message"].get("tool_calls") or []:
            call.pop("id")
    return choices


async def shadow_counts(client: httpx.AsyncClient, key: str, at_least: int) -> dict[str, int]:
    for _ in range(200):
        counts: dict[str, int] = (await client.get("/readyz")).json().get("shadow", {})
        if counts.get(key, 0) >= at_least:
            return counts
        await asyncio.sleep(0.01)
    raise AssertionError(f"shadow {key} never reached {at_least}")


@pytest.mark.parametrize(("slm_text", "agreed"), [(CALL, True), (OTHER, False)])
@pytest.mark.parametrize("stream", [False, True])
async def test_client_gets_the_top_tier_and_the_slm_is_labelled_by_agreement(
    tmp_path: Path, slm_text: str, agreed: bool, stream: bool
) -> None:
    ledger = Ledger(f"sqlite:///{tmp_path / 'l.sqlite3'}")
    ledger.start()
    slm, llm = Scripted("slm", slm_text), Scripted("llm", CALL)
    try:
        async with client_for(slm, llm, ledger) as client:
            body = {**BODY, "stream": stream}
            shadowed = await client.post("/v1/chat/completions", json=body,
                                         headers={"x-task-id": "t1"})  # fmt: skip
            direct = await client.post("/v1/chat/completions", json={**body, "model": "llm"})
            assert shadowed.status_code == direct.status_code == 200
            if not stream:  # the client's answer is what the top tier alone gives
                got, want = shadowed.json(), direct.json()
                assert without_ids(got["choices"]) == without_ids(want["choices"])
                assert got["slmgate"]["tier"] == "llm"
                assert [a["tier"] for a in got["slmgate"]["attempts"]] == ["llm"]
            else:
                assert shadowed.text.count("get_weather") == direct.text.count("get_weather")
            counts = await shadow_counts(client, "agreed" if agreed else "disagreed", 1)
            assert counts["submitted"] == 1  # the direct request to "llm" has no shadow
            assert slm.calls == 1
            assert await asyncio.to_thread(ledger.flush, 30.0)
            task = (await client.get("/v1/tasks/t1~shadow")).json()
            assert task["success"] is agreed
            [request] = task["requests"]
            assert request["route"] == "shadowed~shadow"
            assert [a["backend"] for a in request["attempts"]] == ["slm"]
            rows = ledger.calibration_rows("shadowed~shadow", "slm")
            assert [(ok, kind) for _, _, ok, kind in rows] == [(agreed, "tools")]
    finally:
        ledger.close()


async def test_a_full_shadow_queue_drops_instead_of_delaying(tmp_path: Path) -> None:
    ledger = Ledger(f"sqlite:///{tmp_path / 'l.sqlite3'}")
    ledger.start()
    slm, llm = Scripted("slm", CALL, delay=0.5), Scripted("llm", CALL)
    try:
        async with client_for(slm, llm, ledger, pending=1) as client:
            for _ in range(3):
                r = await client.post("/v1/chat/completions", json=BODY)
                assert r.json()["slmgate"]["tier"] == "llm"
            counts = await shadow_counts(client, "agreed", 1)
            assert (counts["submitted"], counts["dropped"]) == (1, 2)
    finally:
        ledger.close()


def check(constraint: Any, text: str) -> OutputCheck:
    return check_output(constraint, text)


TOOL = ToolCalls((ToolSpec("get_weather", {"type": "object"}),))


@pytest.mark.parametrize(
    ("constraint", "top", "shadow", "expected"),
    [
        (TOOL, CALL, CALL, True),
        (TOOL, CALL, '{"name": "get_weather", "arguments": {"city": "Paris"} }', True),
        (TOOL, f"{CALL}\n{OTHER}", f"{OTHER}\n{CALL}", True),  # order does not matter
        (TOOL, CALL, OTHER, False),
        (TOOL, CALL, "It is sunny.", False),  # one calls, the other does not
        (TOOL, "It is sunny.", "Sunny!", None),  # free text cannot be judged
        (JsonSchema({"type": "object"}), '{"a": 1, "b": 2}', '{"b": 2, "a": 1}', True),
        (JsonSchema({"type": "object"}), '{"a": 1}', "[1]", False),  # invalid shadow
        (JsonSchema({"type": "object"}), "[1]", '{"a": 1}', None),  # invalid top: no label
        (NoConstraint(), "hi", "hi", None),
    ],
)
def test_agreement(constraint: Any, top: str, shadow: str, expected: bool | None) -> None:
    got = agreement(constraint, [check(constraint, top)], [top],
                    [check(constraint, shadow)], [shadow])  # fmt: skip
    assert got is expected
