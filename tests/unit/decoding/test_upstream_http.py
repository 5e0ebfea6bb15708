"""``decoding.upstream_http.JsonPoster`` against a raw asyncio HTTP/1.1 server on loopback: what
it sends, what it returns, keep-alive, and each failure as the gateway's error."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from decoding.upstream_http import JsonPoster, env_proxy
from schemas.errors import RequestTimeoutError, UpstreamError


@dataclass
class Server:
    """Answers each request with ``status``/``body``; ``mode`` "hang" never answers, "close"
    closes the connection unanswered. Records requests and counts connections."""

    status: int = 200
    body: bytes = b'{"ok": true}'
    extra_headers: str = ""
    mode: str = "answer"
    connections: int = 0
    requests: list[tuple[str, dict[str, str], bytes]] = field(default_factory=list)
    port: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                line, *lines = head.decode("latin-1").split("\r\n")
                headers = {k.lower(): v.strip() for k, _, v in
                           (h.partition(":") for h in lines if h)}  # fmt: skip
                payload = await reader.readexactly(int(headers.get("content-length", "0")))
                self.requests.append((line, headers, payload))
                if self.mode == "hang":
                    await asyncio.sleep(3600)
                if self.mode == "close":
                    writer.close()
                    return
                writer.write(
                    f"HTTP/1.1 {self.status} X\r\ncontent-type: application/json\r\n"
                    f"{self.extra_headers}content-length: {len(self.body)}\r\n\r\n".encode()
                    + self.body
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    srv = Server()
    listener = await asyncio.start_server(srv.handle, "127.0.0.1", 0)
    srv.port = listener.sockets[0].getsockname()[1]
    yield srv
    listener.close()


def poster(srv: Server, timeout_s: float = 5.0) -> JsonPoster:
    headers = {"Content-Type": "application/json", "Authorization": "Bearer k"}
    return JsonPoster("up", f"http://127.0.0.1:{srv.port}/v1", headers, timeout_s)


async def test_posts_json_with_headers_and_reuses_the_connection(server: Server) -> None:
    p = poster(server)
    first = await p.post("/chat/completions", {"model": "m", "n": 1}, {"X-Task-Id": "t1"})
    second = await p.post("/chat/completions", {"model": "m", "n": 2})
    await p.aclose()
    assert (first.status, json.loads(first.body)) == (200, {"ok": True})
    assert second.status == 200
    line, headers, body = server.requests[0]
    assert line == "POST /v1/chat/completions HTTP/1.1"
    assert headers["authorization"] == "Bearer k"
    assert headers["content-type"] == "application/json"
    assert headers["x-task-id"] == "t1"
    assert "x-task-id" not in server.requests[1][1]
    assert json.loads(body) == {"model": "m", "n": 1}
    assert server.connections == 1  # keep-alive: the second call rode the first connection


async def test_error_answers_come_back_with_their_headers(server: Server) -> None:
    server.status, server.body = 429, b'{"error": {"message": "slow down"}}'
    server.extra_headers = "Retry-After: 3\r\n"
    p = poster(server)
    reply = await p.post("/chat/completions", {})
    await p.aclose()
    assert reply.status == 429
    assert reply.headers["retry-after"] == "3"
    assert json.loads(reply.body)["error"]["message"] == "slow down"


async def test_no_answer_within_the_timeout_is_a_timeout_error(server: Server) -> None:
    server.mode = "hang"
    p = poster(server, timeout_s=0.3)
    with pytest.raises(RequestTimeoutError, match=r"within 0\.3 s"):
        await p.post("/chat/completions", {})
    await p.aclose()


async def test_a_connection_closed_unanswered_is_an_upstream_error(server: Server) -> None:
    server.mode = "close"
    p = poster(server)
    with pytest.raises(UpstreamError, match="cannot reach"):
        await p.post("/chat/completions", {})
    await p.aclose()


async def test_a_refused_port_is_an_upstream_error() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = JsonPoster("up", f"http://127.0.0.1:{port}/v1", {}, 5.0)
    with pytest.raises(UpstreamError, match="cannot reach"):
        await p.post("/chat/completions", {})
    await p.aclose()


def test_one_poster_serves_successive_event_loops() -> None:
    async def once() -> int:
        srv = Server()
        listener = await asyncio.start_server(srv.handle, "127.0.0.1", 0)
        srv.port = listener.sockets[0].getsockname()[1]
        p.base_url = f"http://127.0.0.1:{srv.port}/v1"
        reply = await p.post("/x", {})
        await p.aclose()
        listener.close()
        return reply.status

    p = JsonPoster("up", "http://127.0.0.1:1/v1", {}, 5.0)
    assert asyncio.run(once()) == 200
    assert asyncio.run(once()) == 200  # a new session on the new loop


def test_env_proxy_follows_http_proxy_and_no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    assert env_proxy("http://vllm:8000/v1") is None
    monkeypatch.setenv("HTTP_PROXY", "http://proxy:3128")
    monkeypatch.setenv("HTTPS_PROXY", "http://secure-proxy:3128")
    monkeypatch.setenv("NO_PROXY", "localhost,.internal")
    assert env_proxy("http://vllm:8000/v1") == "http://proxy:3128"
    assert env_proxy("https://api.example.com/v1") == "http://secure-proxy:3128"
    assert env_proxy("http://gpu.internal:8000/v1") is None
    assert env_proxy("http://localhost:8000/v1") is None


async def test_calls_go_through_the_environments_proxy(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("NO_PROXY", "no_proxy", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{server.port}")
    p = JsonPoster("up", "http://upstream.invalid/v1", {}, 5.0)
    reply = await p.post("/chat/completions", {"model": "m"})
    await p.aclose()
    assert reply.status == 200  # the "proxy" answered for a host that does not resolve
    line, _headers, body = server.requests[0]
    assert line == "POST http://upstream.invalid/v1/chat/completions HTTP/1.1"
    assert json.loads(body) == {"model": "m"}
