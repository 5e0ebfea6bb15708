"""Issue 11's hostile-input suite: every case of ``hostile_cases.CASES`` against a live server.

Each case is written byte for byte on its own socket (so bodies, encodings, lengths and headers
are exactly the hostile ones, with no client normalising them). Per case the suite asserts:
the answer's exact status and OpenAI error body, an answer within the case's bound, a simple
1-token request on another connection answered within ``PROBE_BOUND_S`` *while* the hostile
one is in flight, the server's RSS within ``RSS_HEADROOM`` of its ready baseline (the watcher
kills the server past it, so a runaway case cannot take the machine with it), no traceback in
the server's log, and the server still up. A case that leaves the server dead, killed or busy
restarts it, so the next case starts clean; ``test_no_case_needed_a_restart`` lists those.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.integration.hostile_cases import (
    ANY,
    CASES,
    CHAT,
    KNOWN_TASK,
    RSS_HEADROOM,
    SIDE_KEY,
    Case,
    LiveGateway,
    Outcome,
    RssWatch,
    Send,
    auth,
    chat,
    live_gateway,
    supported_limits,
)

pytestmark = pytest.mark.slow

PROBE_DELAY_S = 0.5
PROBE_BOUND_S = 20.0
CHUNK = 64 * 1024


# --------------------------------------------------------------------------- one exchange


@dataclass(frozen=True)
class Answer:
    """What came back on one connection; ``status`` 0 when no whole HTTP answer did."""

    status: int
    headers: dict[str, str]
    body: bytes
    elapsed_s: float
    failure: str | None = None

    def describe(self) -> str:
        if self.status == 0:
            return f"no answer ({self.failure}) after {self.elapsed_s:.1f} s"
        text = self.body[:400].decode("utf-8", "replace")
        return f"{self.status} {text!r} after {self.elapsed_s:.1f} s"


def request_bytes(send: Send, host: str) -> tuple[bytes, list[bytes]]:
    """The request head and the body's pieces as they go on the wire."""
    lines = [f"{send.method} {send.path} HTTP/1.1".encode(), f"Host: {host}".encode(),
             b"Connection: close"]  # fmt: skip
    for name, value in send.headers:
        lines.append(name.encode() + b": " + (value if isinstance(value, bytes) else
                                               value.encode("latin-1")))  # fmt: skip
    pieces = [send.body[i : i + CHUNK] for i in range(0, len(send.body), CHUNK)]
    if send.chunked:
        lines.append(b"Transfer-Encoding: chunked")
        pieces = [f"{len(p):x}\r\n".encode() + p + b"\r\n" for p in pieces] + [b"0\r\n\r\n"]
    elif send.declared_length is not None:
        lines.append(f"Content-Length: {send.declared_length}".encode())
    elif send.method != "GET" or send.body:
        lines.append(f"Content-Length: {len(send.body)}".encode())
    return b"\r\n".join(lines) + b"\r\n\r\n", pieces


def _write(sock: socket.socket, head: bytes, pieces: list[bytes]) -> None:
    # The server may answer (413, 401) and close before the body is all sent: that is fine,
    # the reader has the answer.
    with contextlib.suppress(OSError):
        sock.sendall(head)
        for piece in pieces:
            sock.sendall(piece)


def dechunk(data: bytes) -> tuple[bytes, bool]:
    """A chunked body decoded, and whether its last chunk arrived."""
    out = bytearray()
    pos = 0
    while True:
        end = data.find(b"\r\n", pos)
        if end < 0:
            return bytes(out), False
        size = int(data[pos:end].split(b";")[0] or b"0", 16)
        if size == 0:
            return bytes(out), True
        start = end + 2
        out += data[start : start + size]
        if len(data) < start + size + 2:
            return bytes(out), False
        pos = start + size + 2


def parse_response(raw: bytes) -> tuple[int, dict[str, str], bytes, bool] | None:
    """Status, lower-cased headers, body and whether it is whole; None without a head."""
    head, sep, rest = raw.partition(b"\r\n\r\n")
    if not sep:
        return None
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body, whole = dechunk(rest)
    elif "content-length" in headers:
        length = int(headers["content-length"])
        body, whole = rest[:length], len(rest) >= length
    else:
        body, whole = rest, True  # delimited by the close
    return status, headers, body, whole


def exchange(port: int, send: Send, timeout_s: float) -> Answer:
    """Send ``send`` on a fresh connection (writer thread) while reading the answer."""
    start = time.monotonic()
    deadline = start + timeout_s
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout_s)
    except OSError as exc:
        return Answer(0, {}, b"", 0.0, f"could not connect: {exc!r}")
    head, pieces = request_bytes(send, f"127.0.0.1:{port}")
    writer = threading.Thread(target=_write, args=(sock, head, pieces), daemon=True)
    writer.start()
    received = bytearray()
    failure: str | None = None
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            sock.settimeout(remaining)
            data = sock.recv(CHUNK)
            if not data:
                break
            received += data
    except TimeoutError:
        failure = f"nothing complete within the {timeout_s:.0f} s bound"
    except OSError as exc:
        failure = f"connection error: {exc!r}"
    finally:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()
        writer.join(5)
    elapsed = time.monotonic() - start
    parsed = parse_response(bytes(received))
    if parsed is None:
        return Answer(0, {}, bytes(received), elapsed, failure or "the connection closed")
    status, headers, body, whole = parsed
    if not whole:
        return Answer(0, headers, body, elapsed, failure or f"a cut-off {status} answer")
    return Answer(status, headers, body, elapsed)


# --------------------------------------------------------------------------- judging


def error_shape(body: Any) -> str | None:
    """Why ``body`` is not an OpenAI error body, or None."""
    if not isinstance(body, dict) or set(body) != {"error"} or not isinstance(body["error"], dict):
        return f"not an OpenAI error body: {str(body)[:300]}"
    error = body["error"]
    if set(error) != {"message", "type", "param", "code"}:
        return f"error fields {sorted(error)}, expected code/message/param/type"
    if not isinstance(error["message"], str) or not error["message"]:
        return "error.message is empty"
    return None


def mismatch(answer: Answer, outcome: Outcome) -> str | None:
    """Why ``answer`` is not ``outcome``, or None when it is."""
    if answer.status != outcome.status:
        return f"status {answer.status}"
    if outcome.header and outcome.header not in answer.headers:
        return f"no {outcome.header} header"
    needs_json = (answer.status >= 400 and outcome.error_body) or outcome.check is not None
    if not needs_json:
        return None
    try:
        body = json.loads(answer.body)
    except ValueError:
        return f"body is not JSON: {answer.body[:200]!r}"
    if answer.status >= 400 and outcome.error_body:
        if (problem := error_shape(body)) is not None:
            return problem
        error = body["error"]
        for name, want in (("type", outcome.type), ("code", outcome.code),
                           ("param", outcome.param)):  # fmt: skip
            if want is not ANY and error[name] != want:
                return f"error.{name} {error[name]!r}, expected {want!r}"
        if outcome.message is not None:
            said = error["message"]
            if outcome.exact_message and said != outcome.message:
                return f"message {said!r}, expected {outcome.message!r}"
            if not outcome.exact_message and not re.search(outcome.message, said, re.I):
                return f"message {said!r} does not match {outcome.message!r}"
    return None if outcome.check is None else outcome.check(body)


def show(outcome: Outcome) -> str:
    if outcome.status < 400 or not outcome.error_body:
        return str(outcome.status)
    return f"{outcome.status} {outcome.type}/{outcome.code!r}/param={outcome.param!r}"


def judge(case: Case, answers: list[Answer]) -> list[str]:
    """Every way the answers break the case's contract (empty: they keep it)."""
    problems = []
    for i, answer in enumerate(answers):
        label = "answer" if len(answers) == 1 else f"answer {i}"
        if answer.status == 0:
            problems.append(f"{label}: {answer.describe()}")
            continue
        misses = [mismatch(answer, outcome) for outcome in case.expect]
        if all(miss is not None for miss in misses):
            why = "; ".join(f"{show(o)}: {m}" for o, m in zip(case.expect, misses, strict=True))
            problems.append(f"{label}: got {answer.describe()} -- vs {why}")
    seen = {a.status for a in answers}
    problems += [f"no answer had status {s} (saw {sorted(seen)})" for s in case.must_see - seen]
    return problems


# --------------------------------------------------------------------------- watching


def probe(base: str) -> str | None:
    """A simple 1-token request on its own connection; a problem, or None when answered."""
    start = time.monotonic()
    body = chat(messages=[{"role": "user", "content": "Say hi."}])
    try:
        r = httpx.post(f"{base}{CHAT}", headers=auth(SIDE_KEY), json=body, timeout=PROBE_BOUND_S)
    except httpx.HTTPError as exc:
        return f"in-flight probe: no answer ({type(exc).__name__}) after " \
               f"{time.monotonic() - start:.1f} s"  # fmt: skip
    elapsed = time.monotonic() - start
    if r.status_code != 200:
        return f"in-flight probe: {r.status_code} {r.text[:200]!r}"
    if elapsed > PROBE_BOUND_S:
        return f"in-flight probe: answered after {elapsed:.1f} s (bound {PROBE_BOUND_S:.0f} s)"
    return None


def healthy(gateway: LiveGateway) -> bool:
    if not gateway.alive():
        return False
    try:
        return httpx.get(f"{gateway.base}/healthz", timeout=10).status_code == 200
    except httpx.HTTPError:
        return False


# --------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveGateway]:
    with live_gateway(tmp_path_factory.mktemp("hostile")) as gw:
        yield gw


@pytest.fixture(scope="module")
def known_task(gateway: LiveGateway) -> str:
    """A task the ledger knows, for the outcome cases (the ledger writes in the background)."""
    r = httpx.post(f"{gateway.base}{CHAT}", headers={**auth(SIDE_KEY), "X-Task-Id": KNOWN_TASK},
                   json=chat(), timeout=60)  # fmt: skip
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        got = httpx.get(f"{gateway.base}/v1/tasks/{KNOWN_TASK}", headers=auth(), timeout=10)
        if got.status_code == 200:
            return KNOWN_TASK
        time.sleep(0.5)
    pytest.fail(f"task {KNOWN_TASK} never reached the ledger")


def test_config_accepts_the_contract_limits() -> None:
    """Every ``limits`` field the cases rely on exists (the server runs without the missing)."""
    assert supported_limits()[1] == []


def test_the_table_is_distinct_and_big_enough() -> None:
    names = [case.name for case in CASES]
    assert len(names) == len(set(names))
    assert len(names) >= 60


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_hostile_request(case: Case, gateway: LiveGateway, known_task: str) -> None:
    if not healthy(gateway):
        gateway.restart(f"down before {case.name}")
    log_from = gateway.log_size()
    watch = RssWatch(gateway, gateway.baseline_rss + RSS_HEADROOM)
    watch.start()
    with ThreadPoolExecutor(max_workers=len(case.sends)) as pool:
        futures = [pool.submit(exchange, gateway.port, s, case.bound_s) for s in case.sends]
        time.sleep(PROBE_DELAY_S)
        probe_problem = probe(gateway.base)
        answers = [f.result() for f in futures]
    watch.finish()
    problems = judge(case, answers)
    if probe_problem:
        problems.append(probe_problem)
    if watch.killed:
        problems.append(f"RSS passed the ready baseline + {RSS_HEADROOM >> 20} MiB "
                        f"({watch.peak >> 20} MiB): the watcher killed the server")  # fmt: skip
    up = healthy(gateway)
    if not up and not watch.killed:
        problems.append("the server is down after the case")
    log = gateway.log_tail(log_from)
    if "Traceback" in log:
        problems.append("the server logged a traceback")
    if not up or probe_problem or any(a.status == 0 for a in answers):
        gateway.restart(case.name)  # the next case must not inherit this one's leftovers
    detail = f"\n--- server log during the case ---\n{log}" if log.strip() else ""
    assert not problems, "\n".join(problems) + detail


def test_no_case_needed_a_restart(gateway: LiveGateway) -> None:
    """Cases that left the server dead, killed or stuck (each one also failed on its own)."""
    assert gateway.restarts == []
