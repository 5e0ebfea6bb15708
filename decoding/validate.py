"""Check a finished output against its constraint: the last line of defence behind the grammar.

The grammar makes outputs valid by construction, but some keywords are only checked here (see
``schemas.jsonschema_utils.VALIDATED_AFTER_GENERATION``), a black-box backend may ignore the
constraint, and ``finish_reason == "length"`` truncates. The router escalates on ``valid=False``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from decoding.constraint import Constraint, JsonObject, JsonSchema, NoConstraint, Regex, ToolCalls
from decoding.tool_parser import ParsedOutput, parse_tool_calls
from schemas.jsonschema_utils import validation_errors

# How a tool call starts in every form the tool grammar allows (``decoding.tool_grammar``).
CALL_STARTS = ("{", "[", "<tool_call>", "```json")


@dataclass(frozen=True, slots=True)
class OutputCheck:
    valid: bool
    errors: tuple[str, ...] = ()
    parsed: ParsedOutput | None = None  # content and tool calls, for tool requests


def _check_json(text: str, schema: Any) -> tuple[str, ...]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return (f"not valid JSON: {exc}",)
    return tuple(validation_errors(value, schema))


def check_output(constraint: Constraint, text: str) -> OutputCheck:
    """Whether ``text`` satisfies ``constraint``; tool outputs are also split into calls."""
    if isinstance(constraint, NoConstraint | Regex):
        return OutputCheck(True)
    if isinstance(constraint, JsonObject):
        errors = _check_json(text, {"type": "object"})
        return OutputCheck(not errors, errors)
    if isinstance(constraint, JsonSchema):
        errors = _check_json(text, constraint.schema)
        return OutputCheck(not errors, errors)
    assert isinstance(constraint, ToolCalls)
    tools = {t.name: t for t in constraint.tools}
    parsed = parse_tool_calls(text, list(tools))
    errors_list: list[str] = []
    for call in parsed.tool_calls:
        for err in validation_errors(json.loads(call.arguments), tools[call.name].parameters):
            errors_list.append(f"{call.name}: {err}")
    if not parsed.tool_calls:
        if constraint.mode != "auto":
            errors_list.append("no tool call, but tool_choice requires one")
        elif constraint.final is None and text.lstrip().startswith(CALL_STARTS):
            # The grammar lets text start with none of these: this is a call cut short.
            errors_list.append("an unfinished tool call (cut at max_tokens?)")
        elif constraint.final is not None:
            schema = (
                constraint.final.schema
                if isinstance(constraint.final, JsonSchema)
                else {"type": "object"}
            )
            errors_list.extend(_check_json(text, schema))
    if not constraint.parallel and len(parsed.tool_calls) > 1:
        errors_list.append("several tool calls, but parallel_tool_calls is false")
    return OutputCheck(not errors_list, tuple(errors_list), parsed)
