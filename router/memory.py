"""Escalation memory: verified answers become the small model's in-context demonstrations.

When a cascade escalates and a later tier's answer passes validation, the request (its tools and
last user message) and that answer are kept. A later request to the route's first tier gets the
``k`` most similar kept examples as demonstrations, so the small model learns from what it got
wrong before, without training. Similarity is cheap and explainable: the Jaccard overlap of the
offered tool names plus the Jaccard overlap of the prompts' words.

No look-ahead: an example is added only after its request was answered, and a request is never
shown an example of itself (the same prompt and tools). Bounded: the oldest examples go first
once ``max_examples`` are kept. Persisted through a ``MemoryStore`` (the ledger's database in
the gateway), so a restart keeps what was learned.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from decoding.chat_template import text_of
from decoding.types import GenerationRequest
from decoding.validate import OutputCheck

DEMO_HEADER = (
    "Examples of earlier requests answered correctly (follow the same way of answering):"
)


@dataclass(frozen=True, slots=True)
class MemoryConfig:
    """A route's ``memory`` setting."""

    enabled: bool = False
    k: int = 2  # demonstrations per request
    max_examples: int = 512  # kept per route; the oldest go first
    min_similarity: float = 0.2  # examples scoring less are not shown

    def __post_init__(self) -> None:
        if self.k < 1 or self.max_examples < 1 or not 0.0 <= self.min_similarity <= 1.0:
            raise ValueError("memory: k >= 1, max_examples >= 1, min_similarity in [0, 1]")


@dataclass(frozen=True, slots=True)
class MemoryExample:
    id: str  # a hash of route, tools and prompt: the same request is kept once
    route: str
    tools: tuple[str, ...]  # offered tool names, sorted
    prompt: str  # the last user message
    answer: str  # what the verified answer wrote, in the tool grammar's tagged form
    created_at: float


class MemoryStore(Protocol):
    """Where a route's examples persist (the ledger's database in the gateway)."""

    def load(self, route: str, limit: int) -> list[MemoryExample]: ...

    def save(self, example: MemoryExample, keep: int) -> None: ...


def _words(text: str) -> frozenset[str]:
    return frozenset(re.findall(r"[a-z0-9]+", text.lower()))


def _jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    union = a | b
    return 0.0 if not union else len(a & b) / len(union)


def similarity(tools: Sequence[str], prompt: str, example: MemoryExample) -> float:
    """Half shared tools, half shared words (both Jaccard); in [0, 1]."""
    return 0.5 * _jaccard(frozenset(tools), frozenset(example.tools)) + 0.5 * _jaccard(
        _words(prompt), _words(example.prompt)
    )


def last_user_text(messages: Sequence[Mapping[str, Any]]) -> str:
    for m in reversed(messages):
        if m.get("role") == "user":
            return text_of(m.get("content"))
    return ""


def tool_names(req: GenerationRequest) -> tuple[str, ...]:
    names = (t.get("function", {}).get("name") for t in req.tools)
    return tuple(sorted(n for n in names if isinstance(n, str)))


def example_id(route: str, tools: Sequence[str], prompt: str) -> str:
    key = json.dumps([route, sorted(tools), prompt])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def answer_text(check: OutputCheck, text: str) -> str:
    """A verified answer as a demonstration: tool calls as ``<tool_call>`` blocks (the form the
    chat templates teach), anything else as written."""
    calls = check.parsed.tool_calls if check.parsed is not None else ()
    if not calls:
        return text
    blocks = [
        "<tool_call>\n" + json.dumps({"name": c.name, "arguments": json.loads(c.arguments)},
                                      ensure_ascii=False) + "\n</tool_call>"
        for c in calls
    ]  # fmt: skip
    return "\n".join(blocks)


def demonstrations(examples: Sequence[MemoryExample]) -> str:
    blocks = [f"Request: {e.prompt}\nAnswer:\n{e.answer}" for e in examples]
    return DEMO_HEADER + "\n\n" + "\n\n".join(blocks)


def with_demonstrations(
    req: GenerationRequest, examples: Sequence[MemoryExample]
) -> GenerationRequest:
    """``req`` with the examples appended to its system message (one is added if none)."""
    if not examples:
        return req
    text = demonstrations(examples)
    messages = [dict(m) for m in req.messages]
    if messages and messages[0].get("role") in ("system", "developer"):
        first = messages[0]
        base = text_of(first.get("content"))
        first["content"] = (base + "\n\n" + text) if base else text
    else:
        messages.insert(0, {"role": "system", "content": text})
    return replace(req, messages=tuple(messages))


class EscalationMemory:
    """One route's examples, in memory, mirrored to ``store``. Thread-safe."""

    def __init__(self, route: str, config: MemoryConfig, store: MemoryStore | None = None):
        self.route, self.config, self.store = route, config, store
        # called with each example this replica verified (gateway.learned_sync publishes it)
        self.on_add: Callable[[MemoryExample], None] | None = None
        self._lock = threading.Lock()
        self._examples: list[MemoryExample] = (
            store.load(route, config.max_examples) if store is not None else []
        )

    def __len__(self) -> int:
        return len(self._examples)

    def recall(self, req: GenerationRequest) -> list[MemoryExample]:
        """The ``k`` most similar examples (never one of this same request), best first; ties go
        to the newer example."""
        tools, prompt = tool_names(req), last_user_text(req.messages)
        own = example_id(self.route, tools, prompt)
        with self._lock:
            pool = list(self._examples)
        scored = [
            (similarity(tools, prompt, e), e.created_at, e)
            for e in pool
            if e.id != own
        ]
        scored = [s for s in scored if s[0] >= self.config.min_similarity]
        scored.sort(key=lambda s: (s[0], s[1]), reverse=True)
        return [e for _, _, e in scored[: self.config.k]]

    def add(self, req: GenerationRequest, answer_text: str, now: float) -> MemoryExample:
        """Keep a verified answer to ``req`` (replacing an older one for the same request)."""
        tools, prompt = tool_names(req), last_user_text(req.messages)
        example = MemoryExample(
            example_id(self.route, tools, prompt), self.route, tools, prompt, answer_text, now
        )
        self.adopt(example)
        if self.store is not None:
            self.store.save(example, self.config.max_examples)
        if self.on_add is not None:
            self.on_add(example)
        return example

    def adopt(self, example: MemoryExample) -> None:
        """Keep an example in memory only: another replica verified and stored it."""
        with self._lock:
            self._examples = [e for e in self._examples if e.id != example.id] + [example]
            del self._examples[: max(0, len(self._examples) - self.config.max_examples)]
