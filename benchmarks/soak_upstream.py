"""A fake OpenAI-compatible upstream on 127.0.0.1 that fails on a schedule, then recovers.

A raw asyncio HTTP/1.1 server rather than an ASGI app, because the faults live below HTTP: a
connection closed with no answer, and a port that refuses connections (the listener is closed
for the ``refuse`` phase and reopened on the same port after it). Answers come from
``soak_plan.fake_completion`` / ``fake_chunks`` after a fixed latency.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from collections.abc import Callable

from benchmarks.soak_plan import Fault, FaultWindow, fake_chunks, fake_completion, fault_at

REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 500: "Internal Server Error"}


class FakeUpstream:
    """``start()`` binds a free port (or ``port``); ``progress()`` says how much of the load
    has started (0-1), which decides the fault in force."""

    def __init__(
        self,
        window: FaultWindow,
        latency_s: float = 0.2,
        progress: Callable[[], float] = lambda: 0.0,
    ):
        self.window = window
        self.latency_s = latency_s
        self.progress = progress
        self.port = 0
        self.counts: Counter[str] = Counter()  # served, http_500, closed, refuse_windows
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._watch: asyncio.Task[None] | None = None
        self._serial = 0

    def fault(self) -> Fault | None:
        return fault_at(self.window, self.progress())

    async def start(self, port: int = 0) -> int:
        await self._listen(port)
        self._watch = asyncio.create_task(self._watch_refusals())
        return self.port

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        await self._unlisten()

    async def _listen(self, port: int) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", port,
                                                  reuse_address=True)  # fmt: skip
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _unlisten(self) -> None:
        server, self._server = self._server, None
        for writer in list(self._writers):
            writer.transport.abort()
        if server is not None:
            server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2.0)

    async def _watch_refusals(self) -> None:
        """Close the port while the fault is ``refuse``, reopen it (same port) after."""
        while True:
            refusing = self.fault() == "refuse"
            if refusing and self._server is not None:
                self.counts["refuse_windows"] += 1
                await self._unlisten()
            elif not refusing and self._server is None:
                with contextlib.suppress(OSError):  # port briefly busy: try again next tick
                    await self._listen(self.port)
            await asyncio.sleep(0.02)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while await self._one_request(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self._writers.discard(writer)
            writer.transport.abort()

    async def _one_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Serve one request of a keep-alive connection; False when the connection is done."""
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, path = [*lines[0].split(" "), "", ""][:2]
        headers = {k.strip().lower(): v.strip() for k, _, v in
                   (line.partition(":") for line in lines[1:] if line)}  # fmt: skip
        raw = await reader.readexactly(int(headers.get("content-length") or 0))
        fault = self.fault()
        if fault in ("close", "refuse"):  # refuse: a connection that slipped in before the close
            self.counts["closed"] += 1
            return False
        if fault == "500":
            self.counts["http_500"] += 1
            error = {"error": {"message": "injected fault", "type": "server_error"}}
            await self._send(writer, 500, json.dumps(error).encode())
            return True
        if method != "POST" or not path.endswith("/chat/completions"):
            await self._send(writer, 404, b'{"error": {"message": "not found"}}')
            return True
        try:
            body = json.loads(raw)
        except ValueError:
            await self._send(writer, 400, b'{"error": {"message": "bad json"}}')
            return True
        self._serial += 1
        cid, created = f"chatcmpl-fake{self._serial}", int(time.time())
        if body.get("stream"):
            await self._stream(writer, fake_chunks(body, cid, created))
        else:
            await asyncio.sleep(self.latency_s)
            await self._send(writer, 200, json.dumps(fake_completion(body, cid, created)).encode())
        self.counts["served"] += 1
        return True

    async def _send(self, writer: asyncio.StreamWriter, status: int, payload: bytes) -> None:
        writer.write(
            f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        await writer.drain()

    async def _stream(self, writer: asyncio.StreamWriter, chunks: list[dict[str, object]]) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")  # fmt: skip
        pause = self.latency_s / max(len(chunks), 1)
        for data in [*(json.dumps(c) for c in chunks), "[DONE]"]:
            event = f"data: {data}\n\n".encode()
            writer.write(f"{len(event):x}\r\n".encode() + event + b"\r\n")
            await writer.drain()
            await asyncio.sleep(pause)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
