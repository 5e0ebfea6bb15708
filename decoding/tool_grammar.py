"""Structural tags (xgrammar's JSON format) for tool calls and their ``tool_choice`` modes.

Pure functions: constraint in, structural-tag dict out. The grammar follows the forms small
models actually write (measured in BENCHMARKS.md, "Tool calls: grammar vs free"): Hermes/Qwen
tags, bare JSON (small models drop the tags), a markdown JSON fence (coder models), and for
several calls any of: one tagged block per call, bare calls one per line, several calls in one
fence (what Qwen2.5-Coder wants after its first call: 43-98% of its probability mass goes to a
second object where a fence per call forced the fence closed), or a JSON array of calls::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

    ```json
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    {"name": "get_weather", "arguments": {"city": "Rome"}}
    ```

    [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", ...}]

The tool name is fixed by each tag's ``begin`` string (so it can only be an offered tool) and the
arguments follow that tool's ``parameters`` schema. ``decoding.tool_parser`` maps every form to
the same OpenAI ``tool_calls``.
"""

from __future__ import annotations

import json
from typing import Any

from decoding.constraint import JsonObject, JsonSchema, ToolCalls, ToolSpec

TAG_OPEN = "<tool_call>"
TAG_CLOSE = "</tool_call>"
FENCE_OPEN = "```json\n"
FENCE_CLOSE = "\n```"
CALL_SEPARATOR = "\n"  # between tagged blocks, bare calls, calls in a fence, and fences
ARRAY_SEPARATOR = ", "
# How free text may start in ``auto`` mode: not where a call could start (``{``, ``[``, ``<``, a
# JSON fence), not whitespace; a fence in another language (a code answer) is text. Written as
# the prefixes of ``FENCE_OPEN`` that diverge from it, since xgrammar regexes have no lookahead.
TEXT_START = r"(```([^j\n`]|j[^s]|js[^o]|jso[^n]|json[^\n])|[^{<`\s\[])"
# Longest run of whitespace allowed inside generated JSON: enough for "a": 1 but not for the
# endless newlines a small model can fall into.
MAX_JSON_WHITESPACE = 2

Format = dict[str, Any]


def _arguments(tool: ToolSpec) -> Format:
    return {
        "type": "json_schema",
        "json_schema": tool.parameters,
        "max_whitespace_cnt": MAX_JSON_WHITESPACE,
    }


def _call_tag(tool: ToolSpec, begin: str = "", end: str = "") -> Format:
    """One call ``{"name": ..., "arguments": ...}`` to ``tool``, between ``begin`` and ``end``."""
    head = '{"name": ' + json.dumps(tool.name) + ', "arguments": '
    return {"type": "tag", "begin": begin + head, "content": _arguments(tool), "end": "}" + end}


def _several(tags: list[Format], separator: str, parallel: bool) -> Format:
    """One or more of ``tags`` (exactly one when ``parallel`` is off), ``separator`` between."""
    return {
        "type": "tags_with_separator",
        "tags": tags,
        "separator": separator,
        "at_least_one": True,
        "stop_after_first": not parallel,
    }


def _tagged(tools: tuple[ToolSpec, ...]) -> list[Format]:
    return [_call_tag(t, TAG_OPEN + "\n", "\n" + TAG_CLOSE) for t in tools]


def _tagged_calls(tools: tuple[ToolSpec, ...], parallel: bool) -> Format:
    return _several(_tagged(tools), CALL_SEPARATOR, parallel)


def _bare_calls(tools: tuple[ToolSpec, ...], parallel: bool) -> Format:
    return _several([_call_tag(t) for t in tools], CALL_SEPARATOR, parallel)


def _array_of_calls(tools: tuple[ToolSpec, ...], parallel: bool) -> Format:
    content = _several([_call_tag(t) for t in tools], ARRAY_SEPARATOR, parallel)
    return {"type": "tag", "begin": "[", "content": content, "end": "]"}


def _fenced_calls(tools: tuple[ToolSpec, ...], parallel: bool) -> Format:
    """JSON fences, each holding calls one per line or a JSON array of calls."""
    inside = {
        "type": "or",
        "elements": [_bare_calls(tools, parallel), _array_of_calls(tools, parallel)],
    }
    fence = {"type": "tag", "begin": FENCE_OPEN, "content": inside, "end": FENCE_CLOSE}
    return _several([fence], CALL_SEPARATOR, parallel)


def _final_json(final: JsonObject | JsonSchema) -> Format:
    schema: dict[str, Any] | bool = (
        final.schema if isinstance(final, JsonSchema) else {"type": "object"}
    )
    return {"type": "json_schema", "json_schema": schema, "max_whitespace_cnt": MAX_JSON_WHITESPACE}


def _text_with_tagged_calls(tools: tuple[ToolSpec, ...], parallel: bool) -> Format:
    """Free text in which every ``<tool_call>`` opens a constrained call.

    The text may not start where a call form starts (``TEXT_START``), so a leading call is
    always fully constrained; a ``<tool_call>`` may also come first, with no text before it.
    """
    tags = _tagged(tools)

    def triggered(at_least_one: bool) -> Format:
        return {
            "type": "triggered_tags",
            "triggers": [TAG_OPEN],
            "tags": tags,
            "at_least_one": at_least_one,
            "stop_after_first": not parallel,
        }

    start = {"type": "regex", "pattern": TEXT_START}
    return {
        "type": "or",
        "elements": [{"type": "sequence", "elements": [start, triggered(False)]}, triggered(True)],
    }


def tool_call_structural_tag(constraint: ToolCalls) -> Format:
    """The structural tag enforcing ``constraint``.

    ``required``/``named``: calls in any of the forms above, nothing else. ``auto``: additionally
    free text (with any embedded ``<tool_call>`` constrained); with a ``final`` response format
    the alternative to calls is that JSON instead of free text (bare calls and arrays are then
    dropped: they would be ambiguous with the final JSON).
    """
    tools, parallel = constraint.tools, constraint.parallel
    tagged, fenced = _tagged_calls(tools, parallel), _fenced_calls(tools, parallel)
    forms: list[Format]
    if constraint.mode == "auto" and constraint.final is not None:
        forms = [tagged, fenced, _final_json(constraint.final)]
    else:
        forms = [tagged, fenced, _bare_calls(tools, parallel), _array_of_calls(tools, parallel)]
        if constraint.mode == "auto":
            forms.append(_text_with_tagged_calls(tools, parallel))
    return {"type": "structural_tag", "format": {"type": "or", "elements": forms}}
