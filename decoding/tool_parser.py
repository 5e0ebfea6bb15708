"""Turn generated text into content and tool calls.

Accepts the shapes the tool grammar allows (and black-box models produce): Hermes/Qwen
``<tool_call>`` blocks anywhere in the text, a bare JSON call, several bare calls one per line
(or as a JSON array), and bare calls inside one markdown JSON fence. A call is
``{"name": ..., "arguments": {...}}``; ``parameters`` is accepted for ``arguments`` since some
models write that.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

_TAGGED = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
_FENCED = re.compile(r"```(?:json)?[ \t]*\n(.*?)\n?```", re.DOTALL)


@dataclass(frozen=True, slots=True)
class ParsedToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI returns it


@dataclass(frozen=True, slots=True)
class ParsedOutput:
    content: str | None
    tool_calls: tuple[ParsedToolCall, ...]


def _as_call(obj: Any, names: set[str]) -> ParsedToolCall | None:
    if not isinstance(obj, dict) or set(obj) - {"name", "arguments", "parameters"}:
        return None
    name = obj.get("name")
    args = obj.get("arguments", obj.get("parameters", {}))
    if not isinstance(name, str) or name not in names:
        return None
    if isinstance(args, str):  # some models double-encode the arguments
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ParsedToolCall(name, json.dumps(args, ensure_ascii=False))


def _bare_calls(text: str, names: set[str]) -> list[ParsedToolCall] | None:
    """Calls when the whole text is bare JSON calls, else None. A call with doubled outer braces
    (``{{"name": ..., "arguments": {...}}}``, Qwen2.5-Coder-1.5B's most likely first token when
    tools are offered) is read as that call."""
    stripped = text.strip()
    if stripped.startswith("{{") and stripped.endswith("}}"):
        undoubled = _bare_calls(stripped[1:-1], names)
        if undoubled is not None:
            return undoubled
    if not stripped or stripped[0] not in "{[":
        return None
    decoder = json.JSONDecoder()
    objects: list[Any] = []
    pos = 0
    while pos < len(stripped):
        try:
            obj, end = decoder.raw_decode(stripped, pos)
        except json.JSONDecodeError:
            return None
        objects.extend(obj if isinstance(obj, list) else [obj])
        pos = end
        while pos < len(stripped) and stripped[pos] in " \t\r\n,":
            pos += 1
    calls = [_as_call(o, names) for o in objects]
    if not calls or any(c is None for c in calls):
        return None
    return [c for c in calls if c is not None]


def _fenced_calls(text: str, names: set[str]) -> list[ParsedToolCall] | None:
    """Calls when the whole text is markdown JSON fences holding bare calls, else None.

    An unterminated last fence (output cut at max_tokens) is dropped, as an unterminated
    ``<tool_call>`` is."""
    fences = list(_FENCED.finditer(text))
    rest = _FENCED.sub("", text).strip()
    if not fences or (rest and not (rest.startswith("```") and rest.count("```") == 1)):
        return None
    calls: list[ParsedToolCall] = []
    for fence in fences:
        inner = _bare_calls(fence.group(1), names)
        if inner is None:
            return None
        calls.extend(inner)
    return calls


def parse_tool_calls(text: str, tool_names: list[str] | set[str]) -> ParsedOutput:
    """Split ``text`` into content and calls to the offered tools.

    >>> parse_tool_calls('{"name": "f", "arguments": {"x": 1}}', ["f"]).tool_calls
    (ParsedToolCall(name='f', arguments='{"x": 1}'),)
    """
    names = set(tool_names)
    bare = _bare_calls(text, names)
    if bare is None:
        bare = _fenced_calls(text, names)
    if bare is not None:
        return ParsedOutput(None, tuple(bare))
    calls: list[ParsedToolCall] = []
    for match in _TAGGED.finditer(text):
        try:
            obj = json.loads(match.group(1))
        except json.JSONDecodeError:
            continue
        call = _as_call(obj, names)
        if call is not None:
            calls.append(call)
    if not calls:
        return ParsedOutput(text, ())
    content = _TAGGED.sub("", text).strip()
    return ParsedOutput(content or None, tuple(calls))
