"""A lean closed-loop HTTP/1.1 load generator for servers that answer in well under a millisecond.

An HTTP client library costs more per request than the gateway overhead being measured, so this
one does the least it can: raw asyncio protocols on keep-alive connections, each request encoded
once up front, responses framed from the status line and ``Content-Length`` (chunked bodies are
handled too), one latency sample per request taken in ``data_received``. Each of
``--connections`` workers keeps one request in flight; with several URLs every worker holds a
connection to each and requests go to the URLs round robin. Run it in its own process, so the
client never shares an event loop (or a GIL) with the server it measures:

    python -m benchmarks.http_load http://127.0.0.1:8000/v1/chat/completions \\
        --connections 8 --requests 2000 --warmup 200 --body '{"model": "m", ...}' \\
        --header 'Authorization: Bearer sk-...'

prints one JSON line: requests, errors (non-200 answers and lost connections), status counts,
wall time, requests/s and latency p50/p95/p99/mean/max in ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from router.stats import percentile


class FramingError(ValueError):
    """The server sent something that is not an HTTP/1.1 response this client can frame."""


# ---- pure parts: request encoding, response framing, summary ---------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    host: str
    port: int
    path: str


def parse_url(url: str) -> Target:
    """``http://host[:port]/path`` (plain HTTP only)."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"only http://host[:port]/path URLs are supported, got {url!r}")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return Target(parts.hostname, parts.port or 80, path)


def encode_request(
    target: Target, body: bytes | None, headers: Sequence[tuple[str, str]] = (),
    method: str | None = None,
) -> bytes:  # fmt: skip
    """One keep-alive HTTP/1.1 request, as bytes to write as is (POST when there is a body)."""
    method = method or ("GET" if body is None else "POST")
    lines = [f"{method} {target.path} HTTP/1.1", f"Host: {target.host}:{target.port}"]
    lines += [f"{k}: {v}" for k, v in headers]
    if body is not None:
        if not any(k.lower() == "content-type" for k, _ in headers):
            lines.append("Content-Type: application/json")
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


class ResponseFramer:
    """Incremental framing of HTTP/1.1 responses on one connection: ``feed`` bytes as they
    arrive, get back every response completed so far as ``(status, body)``. Bodies framed by
    ``Content-Length`` or ``Transfer-Encoding: chunked``; 1xx interim responses are skipped;
    204/304 have no body. A response framed by the connection closing is refused."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._status = 0
        self._remaining = -1  # body bytes still to come (Content-Length framing)
        self._chunked = False
        self._body = bytearray()
        self.close_after = False  # the last response said ``Connection: close``

    @property
    def idle(self) -> bool:
        """No partial response is buffered."""
        return not self._buf and self._status == 0

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        self._buf += data
        done: list[tuple[int, bytes]] = []
        while True:
            if self._status == 0 and not self._head():
                return done
            if self._chunked:
                if not self._chunks():
                    return done
            elif self._remaining > len(self._buf):
                return done
            else:
                self._body += self._buf[: self._remaining]
                del self._buf[: self._remaining]
            done.append((self._status, bytes(self._body)))
            self._status, self._remaining, self._chunked = 0, -1, False
            self._body.clear()

    def _head(self) -> bool:
        """Parse a status line and headers if whole; False when more bytes are needed."""
        while True:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buf) > 64 * 1024:
                    raise FramingError("response head over 64 KiB")
                return False
            head = bytes(self._buf[:end]).decode("latin-1")
            del self._buf[: end + 4]
            lines = head.split("\r\n")
            version, _, rest = lines[0].partition(" ")
            code = rest[:3]
            if not version.startswith("HTTP/1.") or not code.isdigit():
                raise FramingError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
            status = int(code)
            if 100 <= status < 200:  # interim (100 Continue): the real answer follows
                continue
            length: int | None = None
            chunked = False
            self.close_after = version == "HTTP/1.0"
            for line in lines[1:]:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                if name == "content-length":
                    try:
                        length = int(value.strip())
                    except ValueError:
                        raise FramingError(f"bad Content-Length {value.strip()!r}") from None
                elif name == "transfer-encoding":
                    chunked = "chunked" in value.lower()
                elif name == "connection":
                    self.close_after = "close" in value.lower()
            if status in (204, 304):
                length, chunked = 0, False
            if not chunked and length is None:
                raise FramingError(f"HTTP {status} with neither Content-Length nor chunked body")
            self._status, self._chunked = status, chunked
            self._remaining = 0 if chunked else int(length or 0)
            return True

    def _chunks(self) -> bool:
        """Consume chunks; True once the last chunk and trailers are in."""
        while True:
            if self._remaining > 0:  # inside a chunk's data (+ its CRLF)
                if len(self._buf) < self._remaining + 2:
                    return False
                self._body += self._buf[: self._remaining]
                del self._buf[: self._remaining + 2]
                self._remaining = 0
            end = self._buf.find(b"\r\n")
            if end < 0:
                return False
            if self._remaining < 0:  # after the last chunk: trailers until an empty line
                del self._buf[: end + 2]
                if end == 0:
                    return True
                continue
            size_text = bytes(self._buf[:end]).split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise FramingError(f"bad chunk size {size_text[:20]!r}") from None
            del self._buf[: end + 2]
            self._remaining = size if size > 0 else -1


def summarize(
    latencies_s: Sequence[float], statuses: Counter[int], lost: int, wall_s: float
) -> dict[str, Any]:
    """Counts and latency percentiles (ms) of one run. ``latencies_s`` holds every answered
    request (any status); errors are non-200 answers plus ``lost`` (no answer)."""
    answered = sum(statuses.values())
    errors = answered - statuses.get(200, 0) + lost
    ordered = sorted(latencies_s)

    def ms(value: float | None) -> float | None:
        return None if value is None else round(value * 1e3, 4)

    return {
        "requests": answered + lost,
        "errors": errors,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "lost": lost,
        "wall_s": round(wall_s, 4),
        "requests_per_s": round((answered + lost) / wall_s, 2) if wall_s > 0 else None,
        "p50_ms": ms(percentile(ordered, 50)),
        "p95_ms": ms(percentile(ordered, 95)),
        "p99_ms": ms(percentile(ordered, 99)),
        "mean_ms": ms(sum(ordered) / len(ordered)) if ordered else None,
        "max_ms": ms(ordered[-1]) if ordered else None,
    }


# ---- the load ---------------------------------------------------------------------------------


class _Conn(asyncio.Protocol):
    """One keep-alive connection of a worker; hands every framed response to the worker."""

    def __init__(self, worker: _Worker) -> None:
        self.worker = worker
        self.framer = ResponseFramer()
        self.transport: asyncio.Transport | None = None
        self.sent_at = 0.0
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            responses = self.framer.feed(data)
        except FramingError as exc:
            self.worker.run.fail(exc)
            return
        for status, body in responses:
            latency = time.perf_counter() - self.sent_at
            self.busy = False
            if self.framer.close_after and self.transport is not None:
                self.transport.close()
                self.transport = None
            self.worker.answered(status, body, latency)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.busy:
            self.busy = False
            self.worker.lost()


class _Worker:
    """Keeps one request in flight, on its connection to the next target (round robin)."""

    def __init__(self, run: _Run) -> None:
        self.run = run
        self.conns: list[_Conn] = [_Conn(self) for _ in run.targets]

    async def connect(self, i: int) -> None:
        t = self.run.targets[i]
        loop = asyncio.get_running_loop()
        await loop.create_connection(lambda: self.conns[i], t.host, t.port)

    def send_next(self) -> None:
        run = self.run
        if run.failed is not None:
            return
        if run.remaining <= 0:
            run.worker_done()
            return
        run.remaining -= 1
        i = run.next_target
        run.next_target = (i + 1) % len(run.targets)
        conn = self.conns[i]
        if conn.transport is None or conn.transport.is_closing():
            task = asyncio.get_running_loop().create_task(self._reconnect_and_send(i))
            run.tasks.add(task)
            task.add_done_callback(run.tasks.discard)
            return
        self._send(conn, i)

    def _send(self, conn: _Conn, i: int) -> None:
        assert conn.transport is not None
        conn.busy = True
        conn.sent_at = time.perf_counter()
        conn.transport.write(self.run.payloads[i])

    async def _reconnect_and_send(self, i: int) -> None:
        try:
            self.conns[i] = _Conn(self)
            await self.connect(i)
        except OSError as exc:
            self.run.fail(exc)
            return
        self._send(self.conns[i], i)

    def answered(self, status: int, body: bytes, latency: float) -> None:
        self.run.record(status, body, latency)
        self.send_next()

    def lost(self) -> None:
        self.run.lost += 1
        self.send_next()


class _Run:
    """One phase (warm-up or measured): ``count`` requests over the workers."""

    def __init__(self, targets: list[Target], payloads: list[bytes]) -> None:
        self.targets = targets
        self.payloads = payloads
        self.remaining = 0
        self.next_target = 0
        self.active = 0
        self.latencies: list[float] = []
        self.statuses: Counter[int] = Counter()
        self.lost = 0
        self.error_sample: str | None = None
        self.failed: BaseException | None = None
        self.done: asyncio.Future[None] | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    def reset(self, count: int, workers: int) -> asyncio.Future[None]:
        self.remaining, self.active = count, workers
        self.latencies, self.statuses, self.lost = [], Counter(), 0
        self.done = asyncio.get_running_loop().create_future()
        return self.done

    def record(self, status: int, body: bytes, latency: float) -> None:
        self.latencies.append(latency)
        self.statuses[status] += 1
        if status != 200 and self.error_sample is None:
            self.error_sample = f"HTTP {status}: {body[:300].decode('utf-8', 'replace')}"

    def worker_done(self) -> None:
        self.active -= 1
        if self.active == 0 and self.done is not None and not self.done.done():
            self.done.set_result(None)

    def fail(self, exc: BaseException) -> None:
        self.failed = exc
        if self.done is not None and not self.done.done():
            self.done.set_exception(exc)


async def run_load(
    urls: Sequence[str], body: bytes | None, headers: Sequence[tuple[str, str]],
    connections: int, requests: int, warmup: int = 0, timeout_s: float = 300.0,
) -> dict[str, Any]:  # fmt: skip
    """Warm up (not counted), then ``requests`` requests with ``connections`` in flight."""
    targets = [parse_url(u) for u in urls]
    payloads = [encode_request(t, body, headers) for t in targets]
    run = _Run(targets, payloads)
    workers = [_Worker(run) for _ in range(connections)]
    await asyncio.gather(*(w.connect(i) for w in workers for i in range(len(targets))))
    result: dict[str, Any] = {}
    for phase, count in (("warmup", warmup), ("measured", requests)):
        if count <= 0:
            continue
        done = run.reset(count, len(workers))
        started = time.perf_counter()
        for w in workers:
            w.send_next()
        try:
            await asyncio.wait_for(done, timeout_s)
        except TimeoutError:
            result["timed_out"] = phase
            run.lost += run.remaining + sum(c.busy for w in workers for c in w.conns)
            run.remaining = 0
        wall = time.perf_counter() - started
        if phase == "measured":
            result.update(summarize(run.latencies, run.statuses, run.lost, wall))
        if "timed_out" in result:
            break
    for w in workers:
        for c in w.conns:
            if c.transport is not None:
                c.transport.close()
    result.update(connections=connections, targets=len(targets), warmup=warmup,
                  error_sample=run.error_sample)  # fmt: skip
    return result


def main(argv: list[str] | None = None) -> int:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser("python -m benchmarks.http_load", description=__doc__,
                                     formatter_class=raw)  # fmt: skip
    parser.add_argument("urls", nargs="+", help="one or more http:// URLs (round robin)")
    parser.add_argument("--connections", type=int, default=1, help="requests in flight")
    parser.add_argument("--requests", type=int, default=1000, help="measured requests")
    parser.add_argument("--warmup", type=int, default=0, help="requests sent first, not counted")
    parser.add_argument("--body", default=None, help="request body (POST); none: GET")
    parser.add_argument("--header", action="append", default=[], help="'Name: value'")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per phase")
    args = parser.parse_args(argv)
    if args.connections < 1 or args.requests < 1 or args.warmup < 0:
        parser.error("--connections >= 1, --requests >= 1, --warmup >= 0")
    headers = []
    for h in args.header:
        name, sep, value = h.partition(":")
        if not sep:
            parser.error(f"--header wants 'Name: value', got {h!r}")
        headers.append((name.strip(), value.strip()))
    body = None if args.body is None else args.body.encode()
    try:
        result = asyncio.run(run_load(args.urls, body, headers, args.connections, args.requests,
                                      args.warmup, args.timeout))  # fmt: skip
    except (OSError, FramingError) as exc:
        print(json.dumps({"failed": f"{type(exc).__name__}: {exc}"}))
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
