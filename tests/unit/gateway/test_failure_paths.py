"""Gateway failure paths that a real model cannot be made to hit on demand: an error after the
stream started, a timeout, overload. A scripted backend injects the failure (failure injection
only; every success path is tested against the real models in tests/integration)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from decoding.backend import BackendInfo, FinishEvent
from decoding.types import GenerationRequest, GenerationResult, TokenEvent
from gateway.app import create_app
from gateway.config import GatewayConfig, Limits
from router.ledger import Ledger
from router.router import Route, Router
from schemas.errors import UpstreamError

INFO = BackendInfo("slm", "slm", "scripted", 4096, True, True)


class ScriptedBackend:
    """Emits ``tokens`` then raises ``fail`` (if any), sleeping ``delay`` s per token."""

    def __init__(self, tokens: list[str], fail: Exception | None = None, delay: float = 0.0):
        self.info = INFO
        self.tokens, self.fail, self.delay = tokens, fail, delay
        self.ready = True

    def token_text(self, token_id: int) -> str:
        return self.tokens[token_id]

    async def generate(
        self, req: GenerationRequest, prepared: Any = None
    ) -> AsyncIterator[TokenEvent | FinishEvent]:
        for i, text in enumerate(self.tokens):
            await asyncio.sleep(self.delay)
            yield TokenEvent(0, i, text, -0.1, 0.2, 1.0, False)
        if self.fail is not None:
            raise self.fail
        yield FinishEvent(0, "stop", "", 3)

    async def complete(self, req: GenerationRequest, prepared: Any = None) -> GenerationResult:
        raise AssertionError("not used")


def make_client(
    backend: ScriptedBackend, limits: Limits | None = None, ledger: Ledger | None = None
) -> httpx.AsyncClient:
    config = GatewayConfig(routes=(Route("auto", ("slm",)),), limits=limits or Limits(),
                           ledger_url="off")  # fmt: skip
    router = Router({"slm": backend}, {"auto": Route("auto", ("slm",))})
    app = create_app(config, router, ledger)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


BODY: dict[str, Any] = {"model": "auto", "stream": True,
                        "messages": [{"role": "user", "content": "hi"}]}  # fmt: skip


def events(text: str) -> list[str]:
    return [line[6:] for line in text.splitlines() if line.startswith("data: ")]


async def test_error_after_stream_started_is_an_sse_error_then_done() -> None:
    backend = ScriptedBackend(["Hel", "lo"], fail=UpstreamError("backend crashed mid-stream"))
    async with make_client(backend) as client:
        r = await client.post("/v1/chat/completions", json=BODY)
    assert r.status_code == 200  # the status was sent with the first byte
    data = events(r.text)
    assert data[-1] == "[DONE]"
    error = json.loads(data[-2])
    assert error == {"error": {"message": "backend crashed mid-stream", "type": "upstream_error",
                               "param": None, "code": None}}  # fmt: skip
    content = "".join(json.loads(d)["choices"][0]["delta"].get("content", "") for d in data[:-2])
    assert content == "Hello"


async def test_stream_timeout_is_reported_in_stream() -> None:
    backend = ScriptedBackend(["a"] * 50, delay=0.05)
    async with make_client(backend, Limits(request_timeout_s=0.3)) as client:
        r = await client.post("/v1/chat/completions", json=BODY)
    data = events(r.text)
    assert data[-1] == "[DONE]"
    assert json.loads(data[-2])["error"]["type"] == "timeout"


async def test_overload_is_503_with_retry_after() -> None:
    backend = ScriptedBackend(["a"] * 20, delay=0.05)
    async with make_client(backend, Limits(max_queue=1)) as client:
        first = asyncio.create_task(client.post("/v1/chat/completions", json=BODY))
        await asyncio.sleep(0.2)
        second = await client.post("/v1/chat/completions", json=BODY)
        await first
    assert second.status_code == 503
    assert second.headers["retry-after"] == "5"
    assert second.json()["error"]["type"] == "overloaded_error"


async def test_unknown_route_and_unexpected_errors_are_openai_bodies() -> None:
    async with make_client(ScriptedBackend(["a"])) as client:
        missing = await client.get("/v1/nothing")
        assert missing.status_code == 404
        assert set(missing.json()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("body", [b"", b"[]", b"\xff\xfe"])
async def test_non_object_bodies_are_400(body: bytes) -> None:
    async with make_client(ScriptedBackend(["a"])) as client:
        r = await client.post("/v1/chat/completions", content=body,
                              headers={"content-type": "application/json"})  # fmt: skip
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"


async def test_a_ledger_outage_is_counted_not_a_500(caplog: pytest.LogCaptureFixture) -> None:
    # Nothing listens on port 1: every write fails; the response path must not notice.
    ledger = Ledger("postgresql+psycopg://postgres@127.0.0.1:1/test?connect_timeout=1")
    ledger.start()
    try:
        async with make_client(ScriptedBackend(["o", "k"]), ledger=ledger) as client:
            body = {**BODY, "stream": False}
            r = await client.post("/v1/chat/completions", json=body)
            assert r.status_code == 200
            assert r.json()["choices"][0]["message"]["content"] == "ok"
            assert await asyncio.to_thread(ledger.flush, 30.0)
            health = ledger.health()
            assert health["write_failures"] >= 1
            assert health["dropped_write_failed"] == 1
            stats = await client.get("/v1/stats")
            assert stats.status_code == 503  # reads report the outage as a retryable error
            assert stats.json()["error"]["type"] == "overloaded_error"
            assert stats.json()["ledger"]["write_failures"] >= 1  # health readable regardless
    finally:
        ledger.close(timeout=1.0)


async def test_task_outcome_endpoint_validates_its_body(tmp_path: Path) -> None:
    ledger = Ledger(f"sqlite:///{tmp_path / 'l.sqlite3'}")
    ledger.start()
    try:
        async with make_client(ScriptedBackend(["a"]), ledger=ledger) as client:
            unknown = await client.post("/v1/tasks/t1/outcome", json={"success": True})
            assert unknown.status_code == 404
            assert unknown.json()["error"]["code"] == "task_not_found"
            body = {**BODY, "stream": False}
            done = await client.post("/v1/chat/completions", json=body, headers={"x-task-id": "t1"})
            assert done.status_code == 200
            bad = await client.post("/v1/tasks/t1/outcome", json={"success": "maybe"})
            assert bad.status_code == 400
            assert bad.json()["error"]["param"] == "success"
            ok = await client.post("/v1/tasks/t1/outcome", json={"success": True})
            assert ok.json() == {"object": "task.outcome", "task_id": "t1", "success": True,
                                 "score": None, "recorded": True}  # fmt: skip
            task = await client.get("/v1/tasks/t1")
            assert task.json()["success"] is True, task.text
            # the response's id is the ledger's id of the request (as a stream's chunks' is)
            assert [r["request_id"] for r in task.json()["requests"]] == [done.json()["id"]]
            missing = await client.get("/v1/tasks/nope")
            assert missing.status_code == 404
            window = await client.get("/v1/stats", params={"window": "soon"})
            assert window.status_code == 400
            assert window.json()["error"]["param"] == "window"
    finally:
        ledger.close()


@pytest.mark.parametrize("stream", [False, True])
async def test_a_timed_out_request_books_its_cut_attempt_first(
    tmp_path: Path, stream: bool
) -> None:
    """The deadline cancels the generation itself (no zombie decoding on), and the request's
    ledger row is written after its attempt was booked with the tokens it produced."""
    ledger = Ledger(f"sqlite:///{tmp_path / 'l.sqlite3'}")
    ledger.start()
    backend = ScriptedBackend(["a"] * 200, delay=0.02)
    try:
        async with make_client(backend, Limits(request_timeout_s=0.5), ledger) as client:
            r = await client.post("/v1/chat/completions", json={**BODY, "stream": stream},
                                  headers={"x-task-id": "slow"})  # fmt: skip
            if stream:  # the first bytes went out before the deadline: the error is in-stream
                assert r.status_code == 200
                assert json.loads(events(r.text)[-2])["error"]["code"] == "request_timeout"
            else:
                assert r.status_code == 504
            assert await asyncio.to_thread(ledger.flush, 30.0)
            task = await client.get("/v1/tasks/slow")
        [request] = task.json()["requests"]
        assert request["status"] == 504
        [attempt] = request["attempts"]
        assert attempt["outcome"] == "cancelled"
        assert 5 <= attempt["completion_tokens"] < 200
        assert request["completion_tokens"] == attempt["completion_tokens"]
    finally:
        ledger.close()
