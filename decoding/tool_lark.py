"""The tool-call grammar as Lark for llguidance: the same forms, in the same modes, as the
structural tag ``decoding.tool_grammar`` builds for xgrammar (one set of grammar tests covers
both engines).

Free text in ``auto`` mode may hold ``<tool_call>`` blocks. Lark lexemes are greedy, so the
text before a call is one *lazy* lexeme that ends at the first ``<tool_call>`` (llguidance's
own structural-tag idiom), and every text lexeme excludes ``<tool_call>`` (``&`` and ``~`` are
llguidance's lexeme intersection and complement), so a call inside text is always constrained.
"""

from __future__ import annotations

import json
from typing import Any

from decoding.constraint import JsonObject, JsonSchema, ToolCalls, ToolSpec
from decoding.tool_grammar import (
    ARRAY_SEPARATOR,
    CALL_SEPARATOR,
    FENCE_CLOSE,
    FENCE_OPEN,
    MAX_JSON_WHITESPACE,
    TAG_CLOSE,
    TAG_OPEN,
    TEXT_START,
)
from schemas.schema_rewrite import close_objects, schema_object

# JSON inside calls: flexible whitespace, at most MAX_JSON_WHITESPACE characters of it.
TOOL_JSON: dict[str, Any] = {
    "whitespace_flexible": True,
    "whitespace_pattern": rf"[\x20\x0A\x0D\x09]{{0,{MAX_JSON_WHITESPACE}}}",
    "item_separator": ",",
    "key_separator": ":",
    "coerce_one_of": True,
}
_NO_CALL = rf"(.|\n)*{TAG_OPEN}(.|\n)*"


def json_options(base: dict[str, Any], *, lenient: bool = False) -> dict[str, Any]:
    """llguidance JSON-compiler options: ``base`` plus leniency (ignore unimplemented keys)."""
    return {**base, "lenient": lenient}


def _lit(text: str) -> str:
    return json.dumps(text)


def _json(schema: Any) -> str:
    """An inline ``%json`` rule body for ``schema`` with the call's whitespace options."""
    closed = close_objects(schema_object(schema))
    return "%json " + json.dumps({**closed, "x-guidance": json_options(TOOL_JSON)})


def _call_rule(index: int, tool: ToolSpec) -> str:
    head = '{"name": ' + json.dumps(tool.name) + ', "arguments": '
    return f"call_{index}: {_lit(head)} {_json(tool.parameters)} {_lit('}')}"


def _several(item: str, separator: str, parallel: bool) -> str:
    """One ``item`` (exactly one without ``parallel``), else one or more with ``separator``."""
    return f"{item} ({_lit(separator)} {item})*" if parallel else item


def tool_call_lark(constraint: ToolCalls) -> str:
    """The Lark grammar enforcing ``constraint`` (see ``tool_call_structural_tag``)."""
    tools, parallel = constraint.tools, constraint.parallel
    lines = [_call_rule(i, t) for i, t in enumerate(tools)]
    lines += [
        "call: " + " | ".join(f"call_{i}" for i in range(len(tools))),
        f"tag_body: {_lit(chr(10))} call {_lit(chr(10) + TAG_CLOSE)}",
        f"tagged_call: {_lit(TAG_OPEN)} tag_body",
        f"tagged: {_several('tagged_call', CALL_SEPARATOR, parallel)}",
        f"bare: {_several('call', CALL_SEPARATOR, parallel)}",
        f"array: {_lit('[')} {_several('call', ARRAY_SEPARATOR, parallel)} {_lit(']')}",
        f"fence: {_lit(FENCE_OPEN)} (bare | array) {_lit(FENCE_CLOSE)}",
        f"fenced: {_several('fence', CALL_SEPARATOR, parallel)}",
    ]
    forms = ["tagged", "fenced"]
    if constraint.mode == "auto" and constraint.final is not None:
        lines.append(f"final: {_final_json(constraint.final)}")
        forms.append("final")
    else:
        forms += ["bare", "array"]
        if constraint.mode == "auto":
            lines += _text_with_tagged_calls(parallel)
            forms.append("text_calls")
    return "\n".join([f"start: {' | '.join(forms)}", *lines]) + "\n"


def _final_json(final: JsonObject | JsonSchema) -> str:
    return _json(final.schema if isinstance(final, JsonSchema) else {"type": "object"})


def _text_with_tagged_calls(parallel: bool) -> list[str]:
    """Free text (starting as ``TEXT_START`` allows) in which every ``<tool_call>`` opens a
    constrained call; with ``parallel`` a ``<tool_call>`` may also come first, text and more
    calls after it."""
    if parallel:
        rules = [
            "text_calls: TEXT_FIRST | first_trig tag_body (trig tag_body)* TEXT"
            " | tagged_call (trig tag_body)* TEXT",
            f"trig[lazy]: TEXT {_lit(TAG_OPEN)}",
        ]
    else:
        rules = ["text_calls: TEXT_FIRST | first_trig tag_body"]
    return [
        *rules,
        f"first_trig[lazy]: TEXT_FIRST {_lit(TAG_OPEN)}",
        f"TEXT_FIRST: /{TEXT_START}(.|\\n)*/ & ~/{_NO_CALL}/",
        f"TEXT: /(.|\\n)*/ & ~/{_NO_CALL}/",
    ]
