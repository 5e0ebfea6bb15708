"""What a request constrains its output to. Built by the router from the wire request; compiled
into a grammar by ``decoding.grammar``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(frozen=True, slots=True)
class NoConstraint:
    kind: Literal["none"] = "none"


@dataclass(frozen=True, slots=True)
class JsonObject:
    """Any JSON object (``response_format: json_object``)."""

    kind: Literal["json_object"] = "json_object"


@dataclass(frozen=True, slots=True, eq=False)
class JsonSchema:
    """A JSON value valid against ``schema``.

    Both OpenAI modes are enforced by the grammar, which never generates properties the schema
    does not declare; ``strict`` is kept for logs and for black-box backends."""

    schema: dict[str, Any] | bool
    strict: bool = False
    name: str = "response"
    kind: Literal["json_schema"] = "json_schema"


@dataclass(frozen=True, slots=True, eq=False)
class ToolSpec:
    """One offered function: its name and the JSON schema of its arguments."""

    name: str
    parameters: dict[str, Any] = field(default_factory=lambda: {"type": "object"})
    strict: bool = False
    position: int | None = None  # index in the request's ``tools`` (a named choice keeps one)

    def param(self, index: int) -> str:
        """The request field of this tool's parameters, for error messages."""
        at = index if self.position is None else self.position
        return f"tools.{at}.function.parameters"


@dataclass(frozen=True, slots=True, eq=False)
class ToolCalls:
    """Tool calls shaped by ``tool_choice``.

    ``mode``: ``auto`` = text or calls, ``required`` = at least one call to any offered tool,
    ``named`` = a call to ``tools[0]`` only (the router passes just that tool). ``final`` is the
    request's ``response_format`` when it has one: in ``auto`` mode the model then answers with
    either tool calls or that JSON (the OpenAI Agents SDK's shape of request).
    """

    tools: tuple[ToolSpec, ...]
    mode: Literal["auto", "required", "named"] = "auto"
    parallel: bool = True
    final: JsonObject | JsonSchema | None = None
    kind: Literal["tool_calls"] = "tool_calls"

    def __post_init__(self) -> None:
        if not self.tools:
            raise ValueError("ToolCalls needs at least one tool")
        if self.mode == "named" and len(self.tools) != 1:
            raise ValueError("named tool_choice takes exactly one tool")


@dataclass(frozen=True, slots=True)
class Regex:
    pattern: str
    kind: Literal["regex"] = "regex"


Constraint = NoConstraint | JsonObject | JsonSchema | ToolCalls | Regex

# Which engine compiles a constraint into a grammar (``decoding.engine_choice``).
GrammarEngine = Literal["auto", "xgrammar", "llguidance"]
GRAMMAR_ENGINES: tuple[GrammarEngine, ...] = ("auto", "xgrammar", "llguidance")
