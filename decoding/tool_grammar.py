"""Structural tags (xgrammar's JSON format) for tool calls and their ``tool_choice`` modes.

Pure functions: constraint in, structural-tag dict out. A call is written either inside the
Hermes/Qwen tags or as bare JSON, because small models often drop the tags::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

    {"name": "get_weather", "arguments": {"city": "Paris"}}

The tool name is fixed by each tag's ``begin`` string (so it can only be an offered tool) and the
arguments follow that tool's ``parameters`` schema.
"""

from __future__ import annotations

import json
from typing import Any

from decoding.constraint import JsonObject, JsonSchema, ToolCalls, ToolSpec

TAG_OPEN = "<tool_call>"
TAG_CLOSE = "</tool_call>"
FENCE_OPEN = "```json\n"
FENCE_CLOSE = "\n```"
# First character of free text in ``auto`` mode: not where a call could start, not whitespace.
TEXT_START = r"[^{<`\s]"
# Longest run of whitespace allowed inside generated JSON: enough for "a": 1 but not for the
# endless newlines a small model can fall into.
MAX_JSON_WHITESPACE = 2


def _arguments(tool: ToolSpec) -> dict[str, Any]:
    return {
        "type": "json_schema",
        "json_schema": tool.parameters,
        "max_whitespace_cnt": MAX_JSON_WHITESPACE,
    }


Wrapping = tuple[str, str]
TAGGED: Wrapping = (TAG_OPEN + "\n", "\n" + TAG_CLOSE)
BARE: Wrapping = ("", "")
# Coder models wrap calls in a markdown JSON fence (Qwen2.5-Coder-0.5B does, greedy, here).
FENCED: Wrapping = (FENCE_OPEN, FENCE_CLOSE)


def _call_tag(tool: ToolSpec, wrapping: Wrapping) -> dict[str, Any]:
    head = '{"name": ' + json.dumps(tool.name) + ', "arguments": '
    return {
        "type": "tag",
        "begin": wrapping[0] + head,
        "content": _arguments(tool),
        "end": "}" + wrapping[1],
    }


def _calls(tools: tuple[ToolSpec, ...], wrapping: Wrapping, parallel: bool) -> dict[str, Any]:
    """One or more calls (one when ``parallel`` is off), separated by a newline."""
    return {
        "type": "tags_with_separator",
        "tags": [_call_tag(t, wrapping) for t in tools],
        "separator": "\n",
        "at_least_one": True,
        "stop_after_first": not parallel,
    }


def _final_json(final: JsonObject | JsonSchema) -> dict[str, Any]:
    schema: dict[str, Any] | bool = (
        final.schema if isinstance(final, JsonSchema) else {"type": "object"}
    )
    return {"type": "json_schema", "json_schema": schema, "max_whitespace_cnt": MAX_JSON_WHITESPACE}


def _text_with_tagged_calls(tools: tuple[ToolSpec, ...], parallel: bool) -> dict[str, Any]:
    """Free text in which every ``<tool_call>`` opens a constrained call.

    The text may not start with ``{`` or a backtick (the bare and fenced call branches, fully
    constrained), ``<`` (so a leading ``<tool_call>`` is always a constrained call) nor
    whitespace.
    """
    triggered = {
        "type": "triggered_tags",
        "triggers": [TAG_OPEN],
        "tags": [_call_tag(t, TAGGED) for t in tools],
        "at_least_one": False,
        "stop_after_first": not parallel,
    }
    return {
        "type": "or",
        "elements": [
            {"type": "sequence", "elements": [{"type": "regex", "pattern": TEXT_START}, triggered]},
            {
                "type": "triggered_tags",
                "triggers": [TAG_OPEN],
                "tags": [_call_tag(t, TAGGED) for t in tools],
                "at_least_one": True,
                "stop_after_first": not parallel,
            },
        ],
    }


def tool_call_structural_tag(constraint: ToolCalls) -> dict[str, Any]:
    """The structural tag enforcing ``constraint``.

    ``required``/``named``: tagged, bare or fenced calls, nothing else. ``auto``: additionally free
    text (with any embedded ``<tool_call>`` constrained); with a ``final`` response format the
    alternative to calls is that JSON instead of free text.
    """
    tools, parallel = constraint.tools, constraint.parallel
    calls: list[dict[str, Any]] = [
        _calls(tools, TAGGED, parallel),
        _calls(tools, BARE, parallel),
        _calls(tools, FENCED, parallel),
    ]
    if constraint.mode == "auto":
        if constraint.final is not None:
            # Bare calls are dropped: a bare JSON call and the final JSON would be ambiguous.
            calls = [calls[0], calls[2], _final_json(constraint.final)]
        else:
            calls.append(_text_with_tagged_calls(tools, parallel))
    return {"type": "structural_tag", "format": {"type": "or", "elements": calls}}
