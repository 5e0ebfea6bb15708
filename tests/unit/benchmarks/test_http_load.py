"""``benchmarks.http_load``: request encoding, response framing, the summary, and one small load
against an in-process server (counts only, no timing)."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from benchmarks.http_load import (
    FramingError,
    ResponseFramer,
    Target,
    encode_request,
    parse_url,
    percentile,
    run_load,
    summarize,
)


def test_parse_url() -> None:
    assert parse_url("http://127.0.0.1:8000/v1/chat/completions") == Target(
        "127.0.0.1", 8000, "/v1/chat/completions"
    )
    assert parse_url("http://localhost") == Target("localhost", 80, "/")
    assert parse_url("http://h:1/p?x=1").path == "/p?x=1"
    with pytest.raises(ValueError, match="only http"):
        parse_url("https://example.com/")


def test_encode_request_post_and_get() -> None:
    target = Target("127.0.0.1", 9, "/v1/chat/completions")
    raw = encode_request(target, b'{"a": 1}', [("Authorization", "Bearer k")])
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "POST /v1/chat/completions HTTP/1.1"
    assert "Host: 127.0.0.1:9" in lines
    assert "Authorization: Bearer k" in lines
    assert "Content-Type: application/json" in lines
    assert "Content-Length: 8" in lines
    assert body == b'{"a": 1}'
    get = encode_request(target, None)
    assert get.startswith(b"GET /v1/chat/completions HTTP/1.1\r\n")
    assert get.endswith(b"\r\n\r\n")
    assert b"Content-Length" not in get
    typed = encode_request(target, b"x", [("content-type", "text/plain")])
    assert b"application/json" not in typed


def _response(status: int, body: bytes, extra: str = "") -> bytes:
    return (f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\n{extra}\r\n").encode() + body


def test_framer_content_length_whole_split_and_pipelined() -> None:
    framer = ResponseFramer()
    assert framer.idle
    assert framer.feed(_response(200, b'{"ok": true}')) == [(200, b'{"ok": true}')]
    assert framer.idle
    data = _response(200, b"first") + _response(503, b"second")
    out: list[tuple[int, bytes]] = []
    for i in range(len(data)):  # one byte at a time
        out += framer.feed(data[i : i + 1])
    assert out == [(200, b"first"), (503, b"second")]
    assert framer.feed(data) == [(200, b"first"), (503, b"second")]  # both in one read
    assert framer.feed(_response(200, b"")) == [(200, b"")]


def test_framer_chunked_with_extensions_and_trailers() -> None:
    body = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\n")  # fmt: skip
    framer = ResponseFramer()
    assert framer.feed(body) == [(200, b"hello world")]
    out: list[tuple[int, bytes]] = []
    for i in range(len(body)):
        out += framer.feed(body[i : i + 1])
    assert out == [(200, b"hello world")]
    plain_end = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    assert framer.feed(plain_end + _response(200, b"next")) == [(200, b"abc"), (200, b"next")]


def test_framer_interim_no_body_and_close() -> None:
    framer = ResponseFramer()
    interim = b"HTTP/1.1 100 Continue\r\n\r\n"
    assert framer.feed(interim + _response(201, b"made")) == [(201, b"made")]
    assert framer.feed(b"HTTP/1.1 204 No Content\r\n\r\n") == [(204, b"")]
    assert not framer.close_after
    assert framer.feed(_response(200, b"bye", "Connection: close\r\n")) == [(200, b"bye")]
    assert framer.close_after


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 200 OK\r\n\r\n",  # framed by close: refused
        b"SSH-2.0-OpenSSH\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: ten\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ],
)
def test_framer_refuses_what_it_cannot_frame(raw: bytes) -> None:
    with pytest.raises(FramingError):
        ResponseFramer().feed(raw)


def test_percentile() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0], 95) == 3.0
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 100) == 5.0
    assert percentile([0.0, 10.0], 95) == pytest.approx(9.5)
    with pytest.raises(ValueError, match="percentile"):
        percentile([1.0], 101)


def test_summarize_counts_errors_and_converts_to_ms() -> None:
    statuses: Counter[int] = Counter({200: 3, 500: 1})
    s = summarize([0.001, 0.002, 0.003, 0.004], statuses, lost=1, wall_s=0.5)
    assert s["requests"] == 5
    assert s["errors"] == 2  # the 500 and the lost one
    assert s["statuses"] == {"200": 3, "500": 1}
    assert s["requests_per_s"] == 10.0
    assert s["p50_ms"] == pytest.approx(2.5)
    assert s["max_ms"] == pytest.approx(4.0)
    empty = summarize([], Counter(), lost=0, wall_s=0.0)
    assert empty["requests"] == 0
    assert empty["p50_ms"] is None
    assert empty["requests_per_s"] is None


async def _serve(close_every: int = 0) -> tuple[asyncio.Server, int, Counter[str]]:
    """A tiny keep-alive server: /ok answers 200, /chunked a chunked 200, anything else 500;
    with ``close_every`` it closes the connection after that many answers."""
    seen: Counter[str] = Counter()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                path = head.split(b" ", 2)[1].decode()
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                await reader.readexactly(length)
                seen[path] += 1
                served += 1
                closing = bool(close_every) and served % close_every == 0
                extra = "Connection: close\r\n" if closing else ""
                if path == "/chunked":
                    writer.write(f"HTTP/1.1 200 OK\r\n{extra}Transfer-Encoding: chunked\r\n\r\n"
                                 "2\r\nok\r\n0\r\n\r\n".encode())  # fmt: skip
                else:
                    status = 200 if path == "/ok" else 500
                    writer.write(_response(status, b"{}", extra))
                await writer.drain()
                if closing:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, int(server.sockets[0].getsockname()[1]), seen


async def test_run_load_round_robin_and_errors() -> None:
    server, port, seen = await _serve()
    async with server:
        urls = [f"http://127.0.0.1:{port}/ok", f"http://127.0.0.1:{port}/chunked"]
        result = await run_load(urls, b"{}", [], connections=3, requests=40, warmup=6)
        assert result["requests"] == 40
        assert result["errors"] == 0
        assert result["lost"] == 0
        assert result["statuses"] == {"200": 40}
        assert seen == Counter({"/ok": 23, "/chunked": 23})  # warm-up + measured, alternating
        bad = await run_load([f"http://127.0.0.1:{port}/nope"], b"{}", [], 1, 5)
        assert bad["errors"] == 5
        assert bad["statuses"] == {"500": 5}
        assert bad["error_sample"].startswith("HTTP 500")


async def test_run_load_reconnects_after_connection_close() -> None:
    server, port, seen = await _serve(close_every=3)
    async with server:
        result = await run_load([f"http://127.0.0.1:{port}/ok"], None, [], 2, 20)
        assert result["requests"] == 20
        assert result["errors"] == 0
        assert seen["/ok"] == 20
