"""The soak benchmark's pure parts: which requests it sends (a mix drawn from a seed), what the
fake upstream answers, and when that upstream fails.

Kept free of I/O so the mix and the fault schedule are reproducible and unit-tested without a
server or a model; ``soak_bench`` drives them against a live gateway.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["text", "json", "tool"]
Behaviour = Literal["normal", "disconnect", "timeout"]
Fault = Literal["500", "close", "refuse"]
FaultMode = Literal["500", "close", "refuse", "mixed"]

# Routes of the benchmark's config: a cascade over both tiers, a cascade that starts on the
# failing upstream (its faults must become answers from the SLM), and one route per tier.
ROUTES = ("cascade", "failover", "slm", "remote")
REMOTE_ROUTES = frozenset({"cascade", "failover", "remote"})  # routes that can reach the upstream
# Routes with another tier to answer when the upstream fails: a retryable fault must never reach
# their clients as a 5xx. ``remote`` has only the upstream: its faults are reported, not judged.
FALLBACK_ROUTES = frozenset({"cascade", "failover"})

PERSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
PERSON = {"name": "Ada", "age": 36}  # the fake upstream's answer: valid for PERSON_SCHEMA
WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
WEATHER_ARGS = {"city": "Paris"}
FAKE_TEXT = "The fake upstream says hello, and the soak goes on."
TEXT_PROMPTS = (
    "Say hi in one short sentence.",
    "Name three colours.",
    "Count from one to ten in words.",
    "Write one sentence about the sea.",
    "Describe a cat in a few words.",
)
JSON_PROMPT = "Invent a person. Answer as JSON with their name and age."
TOOL_PROMPT = "What is the weather in Paris right now?"


@dataclass(frozen=True, slots=True)
class MixWeights:
    """Shares of the mix; each draw is independent, so shares hold on average, not exactly."""

    routes: tuple[tuple[str, float], ...] = (
        ("cascade", 0.4), ("failover", 0.2), ("slm", 0.2), ("remote", 0.2),
    )  # fmt: skip
    kinds: tuple[tuple[Kind, float], ...] = (("text", 0.5), ("json", 0.25), ("tool", 0.25))
    stream: float = 0.4
    disconnect: float = 0.15
    timeout: float = 0.15
    disconnect_s: tuple[float, float] = (0.05, 1.0)  # delay before the client hangs up
    timeout_s: tuple[float, float] = (0.1, 0.6)  # client deadline, shorter than a generation
    text_tokens: tuple[int, int] = (16, 48)

    def __post_init__(self) -> None:
        shares = (self.stream, self.disconnect, self.timeout)
        if any(not 0.0 <= s <= 1.0 for s in shares) or self.disconnect + self.timeout > 1.0:
            raise ValueError("stream, disconnect, timeout are shares in [0, 1]; cuts sum <= 1")
        for table in (self.routes, self.kinds):
            if not table or any(w < 0 for _, w in table) or not sum(w for _, w in table):
                raise ValueError("route and kind weights must be >= 0 and not all 0")
        unknown = {r for r, _ in self.routes} - set(ROUTES)
        if unknown:
            raise ValueError(f"unknown routes {sorted(unknown)}; known: {ROUTES}")


@dataclass(frozen=True, slots=True)
class PlannedRequest:
    """One request of the mix: what it asks, where, and how its client behaves."""

    index: int
    task_id: str
    route: str
    kind: Kind
    stream: bool
    behaviour: Behaviour
    cut_after_s: float | None  # disconnect delay or client deadline; None for normal clients
    max_tokens: int
    prompt: str


def _pick(rng: random.Random, table: tuple[tuple[Any, float], ...]) -> Any:
    return rng.choices([k for k, _ in table], weights=[w for _, w in table])[0]


def plan_mix(
    n: int, seed: int, tag: str, weights: MixWeights | None = None
) -> list[PlannedRequest]:
    """``n`` requests drawn from ``seed``; task ids ``soak-<tag>-<index>`` are unique per run."""
    if n < 0:
        raise ValueError("n must be >= 0")
    w = weights or MixWeights()
    rng = random.Random(seed)
    plan = []
    for i in range(n):
        route = _pick(rng, w.routes)
        kind: Kind = _pick(rng, w.kinds)
        stream = rng.random() < w.stream
        draw = rng.random()
        behaviour: Behaviour = "normal"
        cut: float | None = None
        if draw < w.disconnect:
            behaviour, cut = "disconnect", round(rng.uniform(*w.disconnect_s), 3)
        elif draw < w.disconnect + w.timeout:
            behaviour, cut = "timeout", round(rng.uniform(*w.timeout_s), 3)
        max_tokens = rng.randint(*w.text_tokens) if kind == "text" else 64
        prompt = {
            "text": TEXT_PROMPTS[rng.randrange(len(TEXT_PROMPTS))],
            "json": JSON_PROMPT,
            "tool": TOOL_PROMPT,
        }[kind]
        plan.append(PlannedRequest(i, f"soak-{tag}-{i:05d}", route, kind, stream, behaviour,
                                   cut, max_tokens, prompt))  # fmt: skip
    return plan


def request_body(p: PlannedRequest) -> dict[str, Any]:
    """The chat completions body for ``p`` (greedy, so reruns of a seed ask the same)."""
    body: dict[str, Any] = {
        "model": p.route,
        "messages": [{"role": "user", "content": p.prompt}],
        "max_tokens": p.max_tokens,
        "temperature": 0,
    }
    if p.kind == "json":
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": PERSON_SCHEMA, "strict": True},
        }
    elif p.kind == "tool":
        body["tools"] = [WEATHER_TOOL]
        body["tool_choice"] = "required"
    if p.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


# ---- the fake upstream's answers ----------------------------------------------------------------


def _wants_tool(body: dict[str, Any]) -> str | None:
    tools = body.get("tools") or []
    if not tools or body.get("tool_choice") == "none":
        return None
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        return str(choice.get("function", {}).get("name"))
    return str(tools[0].get("function", {}).get("name"))


def _content(body: dict[str, Any]) -> str:
    fmt = (body.get("response_format") or {}).get("type")
    return json.dumps(PERSON) if fmt in ("json_schema", "json_object") else FAKE_TEXT


def prompt_tokens_of(body: dict[str, Any]) -> int:
    """A stand-in token count (4 characters a token) so the ledger has prompt tokens to price."""
    chars = sum(len(str(m.get("content") or "")) for m in body.get("messages") or [])
    return max(1, chars // 4)


def _usage(body: dict[str, Any], completion: int) -> dict[str, int]:
    prompt = prompt_tokens_of(body)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}  # fmt: skip


def fake_completion(body: dict[str, Any], completion_id: str, created: int) -> dict[str, Any]:
    """A whole chat completion answering ``body``: the weather call when tools are offered, the
    fixed person for JSON formats, else fixed text; always with usage."""
    tool = _wants_tool(body)
    if tool is not None:
        call = {"id": "call_soak", "type": "function",
                "function": {"name": tool, "arguments": json.dumps(WEATHER_ARGS)}}  # fmt: skip
        message: dict[str, Any] = {"role": "assistant", "content": None, "tool_calls": [call]}
        reason, completion = "tool_calls", 12
    else:
        content = _content(body)
        message = {"role": "assistant", "content": content}
        reason, completion = "stop", max(1, len(content) // 4)
    return {
        "id": completion_id, "object": "chat.completion", "created": created,
        "model": body.get("model", "fake"),
        "choices": [{"index": 0, "message": message, "finish_reason": reason}],
        "usage": _usage(body, completion),
    }  # fmt: skip


def fake_chunks(body: dict[str, Any], completion_id: str, created: int) -> list[dict[str, Any]]:
    """The same answer as SSE chunks: role, content in word pieces (or the call), the finish,
    then a usage chunk (sent whether or not the client asked; the gateway always asks)."""
    whole = fake_completion(body, completion_id, created)
    message, choice = whole["choices"][0]["message"], whole["choices"][0]
    head = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
            "model": whole["model"]}  # fmt: skip

    def chunk(delta: dict[str, Any], reason: str | None = None) -> dict[str, Any]:
        return {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]}

    out = [chunk({"role": "assistant", "content": ""})]
    if message.get("tool_calls"):
        call = message["tool_calls"][0]
        out.append(chunk({"tool_calls": [{"index": 0, **call}]}))
    else:
        words = message["content"].split(" ")
        out.extend(chunk({"content": w if i == 0 else " " + w}) for i, w in enumerate(words))
    out.append(chunk({}, choice["finish_reason"]))
    out.append({**head, "choices": [], "usage": whole["usage"]})
    return out


# ---- when the upstream fails ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FaultWindow:
    """The upstream fails while the share of the load started is in ``[start, end)``, then
    recovers. Measured in load progress, not seconds, so the faults meet traffic however fast
    the machine is (a slow CPU tier can hold every client for minutes).

    ``mixed`` spends a third of the window on each fault: HTTP 500, connections closed without
    an answer, and connections refused (the port is closed)."""

    start: float = 0.2
    end: float = 0.6
    mode: FaultMode = "mixed"

    def __post_init__(self) -> None:
        if not 0.0 <= self.start <= self.end <= 1.0:
            raise ValueError("the fault window needs 0 <= start <= end <= 1 (shares of the load)")
        if self.mode not in ("500", "close", "refuse", "mixed"):
            raise ValueError(f"unknown fault mode {self.mode!r}")


def fault_at(window: FaultWindow, progress: float) -> Fault | None:
    """The fault in force once ``progress`` (0-1) of the load has started (None: healthy)."""
    if not window.start <= progress < window.end:
        return None
    if window.mode != "mixed":
        return window.mode
    third = (window.end - window.start) / 3
    into = progress - window.start
    return "500" if into < third else "close" if into < 2 * third else "refuse"
