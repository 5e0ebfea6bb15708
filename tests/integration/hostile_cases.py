"""The hostile-input table of issue 11 and the live gateway it runs against.

Each ``Case`` is one bad or extreme request (or a few sent at once) with the answers the gateway
contract allows: the exact status and OpenAI error ``type``/``code``/``param``. Where the contract
leaves a choice open (a huge enum may compile within the deadline or be refused as too complex),
``expect`` lists every acceptable outcome; everything else is exact. ``LiveGateway`` is the server
these cases assume: SmolLM2-135M as both tiers, small limits the cases lean on
(``max_body_bytes``, ``grammar_compile_timeout_s``, ``max_concurrent_per_key``), and keys set so
that the open-endpoint cases mean something. ``tests/integration/test_hostile.py`` sends the table;
``tests/integration/test_fuzz_requests.py`` fuzzes the same server.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

# --------------------------------------------------------------------------- the server

KEY = "sk-hostile-main"
SIDE_KEY = "sk-hostile-side"  # the in-flight probe's key, so per-key limits never refuse it
BURST_KEYS = tuple(f"sk-hostile-burst-{i}" for i in range(8))
CHAT = "/v1/chat/completions"
KNOWN_TASK = "hostile-known-task"
MAX_BODY_BYTES = 1_000_000
MAX_JSON_DEPTH = 64
RSS_HEADROOM = 1536 * 1024 * 1024  # bytes over the ready baseline before the watcher kills
DEPTH_MESSAGE = "JSON nesting deeper than 64 levels (limits.max_json_depth)"

LIMITS: dict[str, int | float] = {
    "max_body_bytes": MAX_BODY_BYTES,
    "max_json_depth": MAX_JSON_DEPTH,
    "max_choices": 16,
    "max_generated_tokens": 32768,
    "max_concurrent_per_key": 4,
    "grammar_compile_timeout_s": 3,
    "grammar_cache_bytes": 256 * 1024 * 1024,
}
"""The contract's ``limits`` the cases rely on (issue 11); see ``supported_limits``."""


def supported_limits() -> tuple[dict[str, int | float], list[str]]:
    """``LIMITS`` less the fields ``gateway.config.Limits`` does not have yet, and those fields.

    The server must start for any case to run, so a missing field is left out here and reported
    by ``test_config_accepts_the_contract_limits`` instead of failing every case at startup."""
    from gateway.config import Limits

    known = {f.name for f in dataclasses.fields(Limits)}
    return {k: v for k, v in LIMITS.items() if k in known}, sorted(set(LIMITS) - known)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def config_text(ledger_url: str) -> str:
    keys = ", ".join((KEY, SIDE_KEY, *BURST_KEYS))
    limits = ", ".join(f"{k}: {v}" for k, v in supported_limits()[0].items())
    return (
        "models:\n"
        "  - {name: slm, source: 'builtin:smollm2-135m-instruct', tier: slm}\n"
        "  - {name: llm, source: 'builtin:smollm2-135m-instruct', tier: llm}\n"
        "routes:\n"
        "  - {name: auto, tiers: [slm]}\n"
        "  - {name: cascade, tiers: [slm, llm], policy: cascade, threshold: 0.5}\n"
        f"api_keys: [{keys}]\n"
        f"limits: {{{limits}}}\n"
        f"ledger_url: '{ledger_url}'\n"
    )


class LiveGateway:
    """One ``slmgate serve`` subprocess that can be restarted after a case breaks it.

    Its output goes to a log file so a failing case can show what the server said meanwhile;
    ``baseline_rss`` is measured after readiness and one warm request."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.config = workdir / "slmgate.yaml"
        self.config.write_text(config_text(f"sqlite:///{workdir / 'ledger.sqlite3'}"))
        self.log_path = workdir / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.base = ""
        self.port = 0
        self.baseline_rss = 0
        self.restarts: list[str] = []

    def start(self) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", "serve", "--port", str(self.port),
                 "--config", str(self.config), "--log-level", "warning"],
                stdout=log, stderr=subprocess.STDOUT, env={**os.environ},
                cwd=Path(__file__).resolve().parents[2],
            )  # fmt: skip
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited during startup:\n{self.log_tail(0)}")
            try:
                ready = httpx.get(f"{self.base}/readyz", headers=auth(KEY), timeout=2)
                if ready.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        else:
            raise RuntimeError("the server did not become ready in 600 s")
        warm = httpx.post(f"{self.base}{CHAT}", headers=auth(SIDE_KEY), json=chat(), timeout=120)
        warm.raise_for_status()
        self.baseline_rss = self.rss()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL, for a server whose memory runs away (it would take the machine with it)."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)

    def restart(self, why: str) -> None:
        self.restarts.append(why)
        self.stop()
        self.start()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def rss(self) -> int:
        """The server's resident set size in bytes (``VmRSS``), 0 once it is gone."""
        try:
            status = Path(f"/proc/{self.pid}/status").read_text()
        except (FileNotFoundError, ProcessLookupError):
            return 0
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def log_size(self) -> int:
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def log_tail(self, since: int, limit: int = 4000) -> str:
        """What the server logged after byte ``since`` (its last ``limit`` characters)."""
        with self.log_path.open("rb") as log:
            log.seek(since)
            text = log.read().decode("utf-8", "replace")
        return text[-limit:]


class RssWatch(threading.Thread):
    """Samples the server's RSS; past ``limit`` it kills the server (SIGKILL) and says so."""

    def __init__(self, gateway: LiveGateway, limit: int):
        super().__init__(daemon=True)
        self.gateway = gateway
        self.limit = limit
        self.peak = 0
        self.killed = False
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.1):
            rss = self.gateway.rss()
            self.peak = max(self.peak, rss)
            if rss > self.limit:
                self.killed = True
                self.gateway.kill()
                return

    def finish(self) -> None:
        self._done.set()
        self.join()


@contextmanager
def live_gateway(workdir: Path) -> Iterator[LiveGateway]:
    """Start, yield and stop a ``LiveGateway`` (the body of the module-scoped fixtures)."""
    gateway = LiveGateway(workdir)
    try:
        gateway.start()
        yield gateway
    finally:
        gateway.stop()


def auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# --------------------------------------------------------------------------- the table's types


class _Any:
    """Matches any value of an error field the contract leaves open."""

    def __repr__(self) -> str:
        return "ANY"


ANY: Any = _Any()
IRE = "invalid_request_error"
JSON_AUTH: tuple[tuple[str, str | bytes], ...] = (
    ("Content-Type", "application/json"),
    ("Authorization", f"Bearer {KEY}"),
)


@dataclass(frozen=True)
class Send:
    """One HTTP request, written byte for byte on its own connection.

    ``chunked`` sends the body with ``Transfer-Encoding: chunked`` (no length up front);
    ``declared_length`` sends that ``Content-Length`` whatever the body's real size."""

    body: bytes = b""
    method: str = "POST"
    path: str = CHAT
    headers: tuple[tuple[str, str | bytes], ...] = JSON_AUTH
    chunked: bool = False
    declared_length: int | None = None


@dataclass(frozen=True)
class Outcome:
    """One acceptable answer: status and, for errors, the OpenAI error fields (exact, or ANY).

    ``message`` is a regular expression the error message must match (case-insensitive), or
    the whole message when ``exact_message``;
    ``header`` must be present; ``check`` looks at the decoded JSON body and returns a problem
    or None. ``error_body`` False accepts any body (answers from the HTTP layer itself)."""

    status: int
    type: str | None = None
    code: Any = ANY
    param: Any = ANY
    message: str | None = None
    exact_message: bool = False
    header: str | None = None
    check: Callable[[Any], str | None] | None = None
    error_body: bool = True


@dataclass(frozen=True)
class Case:
    """A hostile request (or several at once) and what the contract allows in reply.

    Every answer must match one of ``expect``; each status in ``must_see`` must occur among
    the answers; every answer must arrive within ``bound_s`` (a safety bound, not a benchmark)."""

    name: str
    sends: tuple[Send, ...]
    expect: tuple[Outcome, ...]
    must_see: frozenset[int] = field(default_factory=frozenset)
    bound_s: float = 30.0


# --------------------------------------------------------------------------- builders


def chat(**fields: Any) -> dict[str, Any]:
    """A cheap valid chat body (1 token from the single-tier ``auto`` route), with overrides."""
    body: dict[str, Any] = {
        "model": "auto", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
    }  # fmt: skip
    body.update(fields)
    return body


RAW = "@@raw@@"


def js(value: Any, raw: str | None = None) -> bytes:
    """JSON bytes (ASCII: lone surrogates become ``\\udxxx`` escapes, NaN stays a literal); the
    string ``RAW`` in ``value`` is replaced by the JSON text ``raw`` (literals json can't make)."""
    text = json.dumps(value)
    if raw is not None:
        text = text.replace(json.dumps(RAW), raw)
    return text.encode()


def post(body: bytes | Mapping[str, Any], path: str = CHAT, **kwargs: Any) -> Send:
    data = body if isinstance(body, bytes) else js(body)
    return Send(body=data, path=path, **kwargs)


def get(path: str, key: str | None = KEY) -> Send:
    headers = () if key is None else (("Authorization", f"Bearer {key}"),)
    return Send(method="GET", path=path, headers=headers)


def with_headers(
    *extra: tuple[str, str | bytes], key: str | None = KEY
) -> tuple[tuple[str, str | bytes], ...]:
    base: tuple[tuple[str, str | bytes], ...] = (("Content-Type", "application/json"),)
    if key is not None:
        base += (("Authorization", f"Bearer {key}"),)
    return base + extra


def rf(schema: Any) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "out", "schema": schema}}


def tool(name: str, parameters: Any = None, description: str | None = None) -> dict[str, Any]:
    function: dict[str, Any] = {"name": name}
    if parameters is not None:
        function["parameters"] = parameters
    if description is not None:
        function["description"] = description
    return {"type": "function", "function": function}


GET_TIME = tool("get_time", {"type": "object", "properties": {"tz": {"type": "string"}},
                             "required": ["tz"]})  # fmt: skip


def deep(depth: int, open_: str = "[", close: str = "]", inner: str = "") -> str:
    return open_ * depth + inner + close * depth


def deep_schema(levels: int, required: bool = False) -> str:
    """JSON text of ``levels`` nested object schemas (2 JSON levels each)."""
    req = ',"required":["a"]' if required else ""
    head = '{"type":"object","properties":{"a":'
    return head * levels + '{"type":"integer"}' + ("}" + req + "}") * levels


def one(name: str, send: Send, *expect: Outcome, bound_s: float = 30.0) -> Case:
    return Case(name, (send,), expect, bound_s=bound_s)


def bad(code: Any = ANY, param: Any = ANY, message: str | None = None) -> Outcome:
    """A 400 invalid_request_error."""
    return Outcome(400, IRE, code, param, message)


def choices_are(n: int) -> Callable[[Any], str | None]:
    def check(body: Any) -> str | None:
        if not isinstance(body, dict) or body.get("object") != "chat.completion":
            return f"not a chat.completion: {str(body)[:200]}"
        got = len(body.get("choices") or [])
        return None if got == n else f"{got} choices, expected {n}"

    return check


def ok(n: int = 1) -> Outcome:
    """A 200 chat.completion with ``n`` choices."""
    return Outcome(200, check=choices_are(n))


def json_is(expected: Any) -> Callable[[Any], str | None]:
    return lambda body: None if body == expected else f"body {body!r}, expected {expected!r}"


def recorded(body: Any) -> str | None:
    return None if isinstance(body, dict) and body.get("recorded") is True else f"{body!r}"


UNAUTHORIZED = Outcome(401, "authentication_error", "invalid_api_key", None)
TOO_DEEP = Outcome(400, IRE, "request_too_large", None, DEPTH_MESSAGE, exact_message=True)
TOO_LARGE = Outcome(413, IRE, "payload_too_large", None)
MEDIA = Outcome(415, IRE, "unsupported_media_type", None)
NOT_FOUND = Outcome(404, "not_found_error")
RF = "response_format"


def rf_outcomes(*codes: str) -> tuple[Outcome, ...]:
    """200, or a 400 with one of ``codes`` on ``response_format`` (or, more precisely, on its
    ``json_schema.schema``): what a costly but valid schema may get."""
    params = (RF, f"{RF}.json_schema.schema")
    return (ok(), *(bad(code, param) for code in codes for param in params))


def lone_surrogate(param: Any) -> Outcome:
    return bad(ANY, param, r"\blone\b.*\bsurrogate")


# --------------------------------------------------------------------------- schemas

ISSUE_SCHEMA = {  # issue 11: grew the process by ~0.2 GB/s until the kernel killed it
    "$defs": {"node": {"type": "object", "properties": {"child": {"$ref": "#/$defs/node"}},
                       "required": ["child"]}},
    "$ref": "#/$defs/node",
}  # fmt: skip
ARRAY_RECURSION = {
    "$defs": {"n": {"type": "array", "items": {"$ref": "#/$defs/n"}, "minItems": 1}},
    "$ref": "#/$defs/n",
}
MUTUAL_RECURSION = {
    "$defs": {
        "a": {"type": "object", "properties": {"b": {"$ref": "#/$defs/b"}}, "required": ["b"]},
        "b": {"type": "object", "properties": {"a": {"$ref": "#/$defs/a"}}, "required": ["a"]},
    },
    "$ref": "#/$defs/a",
}
ROOT_RECURSION = {"type": "object", "properties": {"self": {"$ref": "#"}}, "required": ["self"]}
ALLOF_RECURSION = {
    "$defs": {"n": {"allOf": [{"type": "object", "properties": {"c": {"$ref": "#/$defs/n"}},
                               "required": ["c"]}]}},
    "$ref": "#/$defs/n",
}  # fmt: skip
ANYOF_ALL_BRANCHES_RECURSE = {
    "$defs": {"n": {"anyOf": [
        {"type": "array", "items": {"$ref": "#/$defs/n"}, "minItems": 1},
        {"type": "object", "properties": {"x": {"$ref": "#/$defs/n"}}, "required": ["x"]},
    ]}},
    "$ref": "#/$defs/n",
}  # fmt: skip
PURE_REF_CYCLE = {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}},
                  "$ref": "#/$defs/a"}  # fmt: skip
OPTIONAL_RECURSION = {
    "$defs": {"node": {"type": "object", "properties": {"child": {"$ref": "#/$defs/node"}}}},
    "$ref": "#/$defs/node",
}
NULLABLE_RECURSION = {
    "$defs": {"node": {"type": "object", "properties": {
        "child": {"anyOf": [{"$ref": "#/$defs/node"}, {"type": "null"}]}},
        "required": ["child"]}},
    "$ref": "#/$defs/node",
}  # fmt: skip


def enum_schema(count: int, prefix: str = "value") -> dict[str, Any]:
    return {"type": "string", "enum": [f"{prefix}-{i}" for i in range(count)]}


def surrogate_history(arguments: str) -> list[dict[str, Any]]:
    """A conversation whose earlier tool call has ``arguments`` (messages.1.tool_calls.0)."""
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_time", "arguments": arguments}}  # fmt: skip
    return [
        {"role": "user", "content": "time?"},
        {"role": "assistant", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "noon"},
    ]


# --------------------------------------------------------------------------- the cases


def _schema_cases() -> list[Case]:
    unsat = bad("unsatisfiable_schema", RF)
    tool_param = "tools.1.function.parameters"
    return [
        one("schema_required_self_recursion", post(chat(response_format=rf(ISSUE_SCHEMA))),
            unsat),
        one("schema_array_minitems_recursion", post(chat(response_format=rf(ARRAY_RECURSION))),
            unsat),
        one("schema_mutual_recursion", post(chat(response_format=rf(MUTUAL_RECURSION))), unsat),
        one("schema_root_hash_recursion", post(chat(response_format=rf(ROOT_RECURSION))), unsat),
        one("schema_allof_recursion", post(chat(response_format=rf(ALLOF_RECURSION))), unsat),
        one("schema_anyof_every_branch_recursion",
            post(chat(response_format=rf(ANYOF_ALL_BRANCHES_RECURSE))), unsat),
        one("schema_pure_ref_cycle", post(chat(response_format=rf(PURE_REF_CYCLE))),
            unsat, bad("unsupported_schema", RF)),
        one("schema_optional_recursion_ok",
            post(chat(response_format=rf(OPTIONAL_RECURSION), max_tokens=4)), ok()),
        one("schema_nullable_required_recursion_ok",
            post(chat(response_format=rf(NULLABLE_RECURSION), max_tokens=4)), ok()),
        one("stream_unsatisfiable_schema_keeps_status",
            post(chat(response_format=rf(ISSUE_SCHEMA), stream=True)), unsat),
        one("tool_params_required_self_recursion",
            post(chat(tools=[GET_TIME, tool("loop", ISSUE_SCHEMA)], tool_choice="required")),
            bad("unsatisfiable_schema", tool_param)),
        one("tool_params_root_recursion_named_choice",
            post(chat(tools=[GET_TIME, tool("loop", ROOT_RECURSION)],
                      tool_choice={"type": "function", "function": {"name": "loop"}})),
            bad("unsatisfiable_schema", tool_param)),
        one("tool_params_mutual_recursion_auto",
            post(chat(tools=[GET_TIME, tool("loop", MUTUAL_RECURSION)], tool_choice="auto")),
            bad("unsatisfiable_schema", tool_param)),
        one("schema_remote_ref_https",
            post(chat(response_format=rf({"$ref": "https://example.com/x.json"}))),
            bad("unsupported_schema", RF)),
        one("schema_remote_ref_file", post(chat(response_format=rf({"$ref": "file:///etc/passwd"}))),
            bad("unsupported_schema", RF)),
        one("schema_remote_ref_metadata_ip",
            post(chat(response_format=rf({"type": "object", "properties": {
                "a": {"$ref": "http://169.254.169.254/latest/meta-data/"}}}))),
            bad("unsupported_schema", RF)),
        one("tool_params_remote_ref",
            post(chat(tools=[tool("fetch", {"$ref": "https://example.com/p.json"})],
                      tool_choice="required")),
            bad("unsupported_schema", "tools.0.function.parameters")),
        one("schema_not_an_object", post(chat(response_format=rf([1, 2]))),
            bad(ANY, "response_format.json_schema.schema")),
        one("schema_nan_minimum", post(js(chat(response_format=rf(
            {"type": "number", "minimum": RAW})), raw="NaN")),
            bad(ANY, None), bad(ANY, RF)),
    ]  # fmt: skip


def _size_cases() -> list[Case]:
    alternation = "^(" + "|".join(f"w{i}x" for i in range(10_000)) + ")$"
    costly = ("schema_too_complex", "unsupported_schema")
    too_complex_tools = (bad("schema_too_complex", "tools"),
                         bad("schema_too_complex", "tools.0.function.parameters"))  # fmt: skip
    long_prompt = (bad("context_length_exceeded", "messages"),
                   bad("context_length_exceeded", "tools"))  # fmt: skip

    def burst(count: int) -> tuple[Send, ...]:
        return tuple(
            post(chat(response_format=rf(enum_schema(count, f"b{k}"))),
                 headers=with_headers(key=BURST_KEYS[k]))
            for k in range(8)
        )  # fmt: skip

    props = {f"p{i}": {"type": "integer"} for i in range(5_000)}
    wide = {"type": "object", "properties": props, "required": list(props)}
    return [
        one("schema_enum_50000", post(chat(response_format=rf(enum_schema(50_000)))),
            *rf_outcomes("schema_too_complex"), bound_s=60),
        Case("schema_enum_50000_x8_concurrent_distinct", burst(50_000),
             rf_outcomes("schema_too_complex"), bound_s=120),
        one("schema_enum_15000_under_size_limit",
            post(chat(response_format=rf(enum_schema(15_000, "v")))),
            *rf_outcomes("schema_too_complex"), bound_s=60),
        Case("schema_enum_15000_x8_concurrent_distinct", burst(15_000),
             rf_outcomes("schema_too_complex"), bound_s=120),
        one("tool_params_enum_50000",
            post(chat(tools=[tool("pick", {"type": "object", "properties": {
                "v": enum_schema(50_000)}, "required": ["v"]})], tool_choice="required")),
            *too_complex_tools, *long_prompt, bound_s=60),
        one("schema_pattern_10000_alternatives",
            post(chat(response_format=rf({"type": "string", "pattern": alternation}))),
            *rf_outcomes(*costly), bound_s=60),
        one("schema_pattern_nested_quantifiers",
            post(chat(response_format=rf({"type": "string", "pattern": "^(a{1,1000}){1,1000}$"}))),
            *rf_outcomes(*costly), bound_s=60),
        one("schema_pattern_forces_a_megabyte",
            post(chat(response_format=rf({"type": "string", "pattern": "^a{1000000}$"}))),
            *rf_outcomes(*costly), bound_s=60),
        one("schema_pattern_invalid_regex",
            post(chat(response_format=rf({"type": "string", "pattern": "(("}))), bad(ANY, RF)),
        one("schema_minlength_1e9",
            post(chat(response_format=rf({"type": "string", "minLength": 10**9}))),
            *rf_outcomes(*costly), bound_s=60),
        one("schema_minitems_1e6",
            post(chat(response_format=rf({"type": "array", "items": {"type": "integer"},
                                          "minItems": 10**6}))),
            *rf_outcomes(*costly), bound_s=60),
        one("schema_const_150kb_forced_text",
            post(chat(response_format=rf({"const": "x" * 150_000}), max_tokens=4)),
            *rf_outcomes(*costly), bound_s=60),
        one("schema_5000_required_properties", post(chat(response_format=rf(wide))),
            *rf_outcomes(*costly), bound_s=60),
        one("schema_25_required_levels_ok",
            post(js(chat(response_format=rf(RAW), max_tokens=4), raw=deep_schema(25, True))),
            ok()),
        one("tools_2000", post(chat(tools=[tool(f"f{i}") for i in range(2_000)])),
            bad("invalid_value", "tools")),
        one("tool_description_1mb", post(chat(tools=[tool("f", None, "d" * 1_100_000)])),
            TOO_LARGE),
        one("tool_description_150kb", post(chat(tools=[tool("f", None, "word " * 30_000)])),
            *long_prompt, bound_s=60),
        one("messages_3000", post(chat(messages=[{"role": "user", "content": "a b c"}] * 3000)),
            bad("context_length_exceeded", "messages"), bound_s=60),
        one("content_parts_5000_ok", post(chat(messages=[{"role": "user", "content": [
            {"type": "text", "text": "a"}] * 5000}])), ok(), bound_s=60),
        one("long_prompt_near_context_ok",
            post(chat(messages=[{"role": "user", "content": "hello " * 6000}])),
            ok(), bound_s=180),
        one("stream_context_length_keeps_status",
            post(chat(messages=[{"role": "user", "content": "word " * 20_000}], stream=True)),
            bad("context_length_exceeded", "messages"), bound_s=60),
    ]  # fmt: skip


def _depth_cases() -> list[Case]:
    ten_k = 10_000
    schema_10k = deep_schema(ten_k // 2)
    return [
        one("body_array_10000_deep", post(deep(ten_k).encode()), TOO_DEEP),
        one("body_object_10000_deep", post(js(chat(x=RAW), raw=deep(ten_k, '{"a":', "}", "1"))),
            TOO_DEEP),
        one("body_unclosed_10000_deep", post(("[" * ten_k).encode()), TOO_DEEP),
        one("schema_10000_deep", post(js(chat(response_format=rf(RAW)), raw=schema_10k)),
            TOO_DEEP),
        one("tool_params_10000_deep", post(js(chat(tools=[tool("f", RAW)]), raw=schema_10k)),
            TOO_DEEP),
        one("content_array_10000_deep",
            post(js(chat(messages=[{"role": "user", "content": RAW}]), raw=deep(ten_k))),
            TOO_DEEP),
        one("stream_body_10000_deep_keeps_status",
            post(js(chat(stream=True, x=RAW), raw=deep(ten_k))), TOO_DEEP),
        one("body_100_deep_over_limit", post(js(chat(x=RAW), raw=deep(100))), TOO_DEEP),
        one("body_40_deep_ok", post(js(chat(x=RAW), raw=deep(40))), ok()),
        one("outcome_body_10000_deep",
            post(js({"success": True, "x": RAW}, raw=deep(ten_k)),
                 path=f"/v1/tasks/{KNOWN_TASK}/outcome"), TOO_DEEP),
    ]  # fmt: skip


def _encoding_cases() -> list[Case]:
    content = "messages.0.content"
    body = chat()
    valid = js(body).decode()
    return [
        one("content_lone_high_surrogate",
            post(chat(messages=[{"role": "user", "content": "a\ud800b"}])),
            lone_surrogate(content)),
        one("content_part_lone_low_surrogate",
            post(chat(messages=[{"role": "user", "content": [{"type": "text",
                                                               "text": "\udfff"}]}])),
            lone_surrogate("messages.0.content.0.text")),
        one("name_lone_surrogate",
            post(chat(messages=[{"role": "user", "content": "hi", "name": "x\ud800"}])),
            lone_surrogate("messages.0.name")),
        one("tool_arguments_lone_surrogate",
            post(chat(messages=surrogate_history('{"tz": "\ud800"}'))),
            lone_surrogate("messages.1.tool_calls.0.function.arguments")),
        one("tool_name_lone_surrogate", post(chat(tools=[tool("f\ud800")])),
            bad(ANY, "tools.0.function.name")),
        one("model_lone_surrogate", post(chat(model="\udc00")), lone_surrogate("model")),
        one("key_lone_surrogate", post(chat(**{"\ud800": 1})), lone_surrogate(ANY)),
        one("valid_surrogate_pair_ok",
            post(chat(messages=[{"role": "user", "content": "smile \ud83d\ude00"}])), ok()),
        one("nul_in_content_ok", post(chat(messages=[{"role": "user", "content": "a\u0000b"}])),
            ok()),
        one("invalid_utf8_bytes",
            post(valid.encode().replace(b'"hi"', b'"h\xff\xfei"')),
            bad(ANY, None)),
        one("cesu8_encoded_surrogate_bytes",
            post(valid.encode().replace(b'"hi"', b'"h\xed\xa0\x80i"')), bad(ANY, None)),
        one("overlong_utf8_slash", post(valid.encode().replace(b'"hi"', b'"h\xc0\xafi"')),
            bad(ANY, None)),
        one("utf8_bom_prefix", post(b"\xef\xbb\xbf" + valid.encode()), ok(), bad(ANY, None)),
        one("utf16_body", post(valid.encode("utf-16")), ok(), bad(ANY, None)),
        one("nan_literal_temperature", post(js(chat(temperature=RAW), raw="NaN")),
            bad(ANY, None), bad("invalid_value", "temperature")),
        one("infinity_literal_max_tokens", post(js(chat(max_tokens=RAW), raw="Infinity")),
            bad(ANY, None), bad(ANY, "max_tokens")),
        one("negative_infinity_seed", post(js(chat(seed=RAW), raw="-Infinity")),
            bad(ANY, None), bad(ANY, "seed")),
        one("overflowing_float_top_p", post(js(chat(top_p=RAW), raw="1e999")),
            bad(ANY, None), bad("invalid_value", "top_p")),
        one("int_literal_5000_digits", post(js(chat(x=RAW), raw="1" + "0" * 5000)),
            bad(ANY, None), bad(ANY, "x")),
        one("max_tokens_5000_digits", post(js(chat(max_tokens=RAW), raw="9" * 5000)),
            bad(ANY, None), bad(ANY, "max_tokens")),
        one("duplicate_key_model",
            post(valid.replace('"model": "auto"', '"model": "auto", "model": "gpt-9"').encode()),
            Outcome(404, "not_found_error", "model_not_found", "model"), bad(ANY, None),
            bad(ANY, "model")),
        one("duplicate_key_flood_20000",
            post(valid.replace('"max_tokens": 1', '"x": 1, ' * 20_000 + '"max_tokens": 1')
                 .encode()), ok(), bad(ANY, None)),
        one("content_an_int", post(chat(messages=[
            {"role": "user", "content": 12}])), bad("invalid_value", content)),
        one("messages_a_string", post(chat(messages="hi")), bad("invalid_type", "messages")),
        one("messages_empty", post(chat(messages=[])), bad("invalid_value", "messages")),
        one("stream_not_a_boolean", post(chat(stream="maybe")), bad("invalid_type", "stream")),
        one("body_a_json_array", post(b"[]"), bad(ANY, None)),
        one("body_null", post(b"null"), bad(ANY, None)),
        one("body_empty", post(b""), bad(ANY, None)),
        one("body_truncated", post(valid[:-5].encode()), bad(ANY, None)),
    ]  # fmt: skip


def _content_type_cases() -> list[Case]:
    body = js(chat())
    outcome = js({"success": True})
    outcome_path = f"/v1/tasks/{KNOWN_TASK}/outcome"

    def typed(content_type: str | None) -> tuple[tuple[str, str | bytes], ...]:
        auth_header: tuple[tuple[str, str | bytes], ...] = (("Authorization", f"Bearer {KEY}"),)
        return auth_header + ((("Content-Type", content_type),) if content_type else ())

    return [
        one("content_type_text_plain", post(body, headers=typed("text/plain")), MEDIA),
        one("content_type_form", post(body, headers=typed("application/x-www-form-urlencoded")),
            MEDIA),
        one("content_type_multipart", post(body, headers=typed("multipart/form-data; boundary=x")),
            MEDIA),
        one("content_type_missing", post(body, headers=typed(None)), MEDIA),
        one("content_type_text_json", post(body, headers=typed("text/json")), MEDIA),
        one("content_type_jsonp_lookalike", post(body, headers=typed("application/jsonp")),
            MEDIA),
        one("content_type_json_charset_ok",
            post(body, headers=typed("application/json; charset=utf-8")), ok()),
        one("content_type_plus_json_ok", post(body, headers=typed("application/vnd.api+json")),
            ok()),
        one("content_type_json_uppercase_ok", post(body, headers=typed("Application/JSON")), ok()),
        one("outcome_content_type_text_plain",
            post(outcome, path=outcome_path, headers=typed("text/plain")), MEDIA),
        one("outcome_content_type_missing",
            post(outcome, path=outcome_path, headers=typed(None)), MEDIA),
    ]  # fmt: skip


def _oversize_cases() -> list[Case]:
    big = js(chat(messages=[{"role": "user", "content": "x" * 1_500_000}]))
    return [
        one("body_declared_oversize", post(big), TOO_LARGE),
        one("body_chunked_oversize_5mb",
            post(js(chat(messages=[{"role": "user", "content": "x" * 5_000_000}])),
                 chunked=True), TOO_LARGE),
        one("body_declared_1tb_never_sent", post(b"", declared_length=10**12), TOO_LARGE),
        one("outcome_body_100kb",
            post(js({"success": True, "x": "y" * 100_000}), path=f"/v1/tasks/{KNOWN_TASK}/outcome"),
            TOO_LARGE),
    ]  # fmt: skip


def _parameter_cases() -> list[Case]:
    too_large = "request_too_large"
    return [
        one("n_100", post(chat(n=100)), bad(too_large, "n")),
        one("n_17", post(chat(n=17)), bad(too_large, "n")),
        one("n_16_ok", post(chat(n=16, max_tokens=2)), ok(16), bound_s=60),
        one("stream_n_100_keeps_status", post(chat(n=100, stream=True)), bad(too_large, "n")),
        one("max_tokens_1e9", post(chat(max_tokens=10**9)), bad(too_large, "max_tokens")),
        one("max_completion_tokens_1e9", post(chat(max_tokens=None, max_completion_tokens=10**9)),
            bad(too_large, "max_tokens"), bad(too_large, "max_completion_tokens")),
        one("n_times_max_tokens_over_cap", post(chat(n=16, max_tokens=4096)),
            bad(too_large, "max_tokens")),
        one("max_tokens_2_pow_70", post(chat(max_tokens=2**70)), bad(too_large, "max_tokens")),
        one("max_tokens_zero", post(chat(max_tokens=0)), bad("invalid_value", "max_tokens")),
        one("n_zero", post(chat(n=0)), bad("invalid_value", "n")),
        one("temperature_1e308", post(chat(temperature=1e308)),
            bad("invalid_value", "temperature")),
        one("top_p_negative", post(chat(top_p=-1)), bad("invalid_value", "top_p")),
        one("presence_penalty_1e308", post(chat(presence_penalty=1e308)),
            bad("invalid_value", "presence_penalty")),
        one("top_logprobs_100", post(chat(logprobs=True, top_logprobs=100)),
            bad("invalid_value", "top_logprobs")),
        one("seed_2_pow_70", post(chat(seed=2**70)), ok(), bad(ANY, "seed")),
        one("top_k_1e12", post(chat(top_k=10**12)), ok(), bad(ANY, "top_k")),
        one("stop_100_entries", post(chat(stop=[f"s{i}" for i in range(100)])),
            bad("invalid_value", "stop")),
        one("stop_150kb_entry", post(chat(stop=["z" * 150_000])), ok(), bad(ANY, "stop")),
        one("logit_bias_50000_entries",
            post(chat(logit_bias={str(i): 100 for i in range(50_000)})),
            ok(), bad(ANY, "logit_bias")),
        one("unknown_model", post(chat(model="gpt-9")),
            Outcome(404, "not_found_error", "model_not_found", "model")),
        one("stream_unknown_model_keeps_status", post(chat(model="gpt-9", stream=True)),
            Outcome(404, "not_found_error", "model_not_found", "model")),
        one("model_name_100k", post(chat(model="m" * 100_000)),
            Outcome(404, "not_found_error", "model_not_found", "model"), bad(ANY, "model")),
    ]  # fmt: skip


def _auth_cases() -> list[Case]:
    body = js(chat())
    no_key = with_headers(key=None)
    cases = [
        one(f"no_key_get_{path.strip('/').replace('/', '_').replace('.', '_')}",
            get(path, key=None), UNAUTHORIZED)
        for path in ("/readyz", "/docs", "/redoc", "/openapi.json", "/metrics", "/v1/models",
                     "/v1/stats", "/v1/tasks", f"/v1/tasks/{KNOWN_TASK}")
    ]  # fmt: skip
    return [
        *cases,
        one("no_key_post_chat", post(body, headers=no_key), UNAUTHORIZED),
        one("no_key_post_outcome",
            post(js({"success": True}), path=f"/v1/tasks/{KNOWN_TASK}/outcome", headers=no_key),
            UNAUTHORIZED),
        one("healthz_open", get("/healthz", key=None),
            Outcome(200, check=json_is({"status": "ok"}))),
        one("dashboard_shell_open", get("/dashboard", key=None), Outcome(200, error_body=False)),
        one("key_in_url_models", get(f"/v1/models?key={KEY}", key=None), UNAUTHORIZED),
        one("key_in_url_stats", get(f"/v1/stats?key={KEY}", key=None), UNAUTHORIZED),
        one("key_in_url_openapi", get(f"/openapi.json?key={KEY}", key=None), UNAUTHORIZED),
        one("key_in_url_chat", post(body, path=f"{CHAT}?key={KEY}", headers=no_key),
            UNAUTHORIZED),
        one("wrong_key", post(body, headers=with_headers(key="sk-wrong")), UNAUTHORIZED),
        one("basic_auth_scheme",
            post(body, headers=with_headers(("Authorization", "Basic c2s6c2s="), key=None)),
            UNAUTHORIZED),
        one("bearer_8kb_key", post(body, headers=with_headers(key="k" * 8192)), UNAUTHORIZED),
        one("bearer_latin1_bytes",
            post(body, headers=with_headers(("Authorization", b"Bearer sk-\xe9\xff"), key=None)),
            UNAUTHORIZED),
        one("healthz_dotdot_to_models", get("/healthz/../v1/models", key=None),
            UNAUTHORIZED, NOT_FOUND),
        one("double_slash_models", get("//v1/models", key=None), UNAUTHORIZED, NOT_FOUND),
        one("get_on_chat", get(CHAT), Outcome(405, IRE, ANY, None)),
        one("unknown_path", get("/v1/nope"), NOT_FOUND),
    ]  # fmt: skip


def _task_cases() -> list[Case]:
    outcome = js({"success": True})
    task_not_found = (Outcome(404, "not_found_error", "task_not_found", "task_id"),
                      Outcome(404, "not_found_error", "task_not_found", None))  # fmt: skip
    long_id = "t" * 300
    return [
        one("outcome_known_task_ok", post(outcome, path=f"/v1/tasks/{KNOWN_TASK}/outcome"),
            Outcome(200, check=recorded)),
        one("outcome_unknown_task", post(outcome, path="/v1/tasks/no-such-task-7f3a/outcome"),
            *task_not_found),
        one("outcome_score_nan",
            post(js({"success": True, "score": RAW}, raw="NaN"),
                 path=f"/v1/tasks/{KNOWN_TASK}/outcome"),
            bad(ANY, None), bad(ANY, "score")),
        one("outcome_score_overflow",
            post(js({"success": True, "score": RAW}, raw="1e999"),
                 path=f"/v1/tasks/{KNOWN_TASK}/outcome"),
            bad(ANY, None), bad(ANY, "score")),
        one("task_id_path_300_chars", get(f"/v1/tasks/{long_id}"), bad(ANY, "task_id")),
        one("outcome_task_id_path_300_chars", post(outcome, path=f"/v1/tasks/{long_id}/outcome"),
            bad(ANY, "task_id")),
        one("task_id_path_100k_chars", get(f"/v1/tasks/{'t' * 100_000}"),
            *(Outcome(s, error_body=False) for s in (400, 414, 431))),
        one("task_id_header_300_chars",
            post(js(chat()), headers=with_headers(("X-Task-Id", long_id))), bad(ANY, "task_id")),
        one("task_id_header_with_space",
            post(js(chat()), headers=with_headers(("X-Task-Id", "a b"))), bad(ANY, "task_id")),
        one("task_id_header_latin1_bytes",
            post(js(chat()), headers=with_headers(("X-Task-Id", b"t\xe2che"))),
            bad(ANY, "task_id")),
        one("task_id_metadata_100k_chars", post(chat(metadata={"task_id": "t" * 100_000})),
            bad(ANY, "metadata.task_id")),
        one("task_id_metadata_control_char", post(chat(metadata={"task_id": "a\u0001b"})),
            bad(ANY, "metadata.task_id")),
        one("task_id_metadata_non_ascii", post(chat(metadata={"task_id": "tâche"})),
            bad(ANY, "metadata.task_id")),
        one("path_traversal_encoded_slashes", get("/v1/tasks/..%2F..%2Fetc%2Fpasswd"), NOT_FOUND),
        one("path_traversal_dotdot_id", get("/v1/tasks/%2e%2e"), NOT_FOUND, bad(ANY, "task_id")),
        one("path_traversal_outcome",
            post(outcome, path="/v1/tasks/..%2F..%2Fstats/outcome"), NOT_FOUND),
        one("window_20_digit_days", get("/v1/stats?window=99999999999999999999d"),
            bad(ANY, "window")),
        one("window_3651_days", get("/v1/stats?window=3651d"), bad(ANY, "window")),
        one("window_3650_days_ok", get("/v1/stats?window=3650d"), Outcome(200)),
        one("window_nan", get("/v1/stats?window=nan"), bad(ANY, "window")),
        one("window_inf_seconds", get("/v1/stats?window=inf"), bad(ANY, "window")),
        one("window_negative", get("/v1/stats?window=-1h"), bad(ANY, "window")),
        one("tasks_window_20_digit_days", get("/v1/tasks?window=99999999999999999999d"),
            bad(ANY, "window")),
        one("stats_buckets_1e30", get(f"/v1/stats?buckets={10**30}"), bad(ANY, "buckets")),
    ]  # fmt: skip


def _concurrency_cases() -> list[Case]:
    slow = js(chat(messages=[{"role": "user", "content": "Count from one to fifty."}],
                   max_tokens=24))  # fmt: skip
    limited = Outcome(429, "rate_limit_error", "rate_limit_exceeded", None, header="retry-after")
    burst = tuple(post(slow) for _ in range(12))
    return [Case("per_key_concurrency_burst_12", burst, (ok(), limited),
                 must_see=frozenset({200, 429}), bound_s=120)]  # fmt: skip


CASES: tuple[Case, ...] = (
    *_schema_cases(), *_size_cases(), *_depth_cases(), *_encoding_cases(),
    *_content_type_cases(), *_oversize_cases(), *_parameter_cases(), *_auth_cases(),
    *_task_cases(), *_concurrency_cases(),
)  # fmt: skip
