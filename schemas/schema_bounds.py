"""Size bounds on schemas: repetition counts and forced text that would make the grammar engine's
memory grow far past any real schema's needs (measured: xgrammar's matcher grows with the square
of a repetition count), refused up front with a message naming the keyword."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from schemas.jsonschema_utils import iter_subschemas
from schemas.schema_shape import _SATURATE, SchemaShape, _is_number, schema_shape

_UPPER_KEYWORDS = ("maxItems", "maxLength", "maxProperties")
_LOWER_KEYWORDS = ("minItems", "minLength", "minProperties")
_QUANTIFIER = re.compile(r"\{(\d+)(?:(,)(\d*))?\}")


def pattern_repeat(pattern: str) -> int:
    """How long a regex's longest forced expansion can get: its length with every counted
    repetition (``{n}``, ``{n,m}``, ``{n,}``) written out (alternatives count their longest
    branch; ``*``, ``+`` and ``?`` count once). Grammar engines expand counted repetitions, so
    this bounds their states and the text they can force.

    >>> pattern_repeat("^(ab|c){3}-[0-9]{2,4}$")
    11
    """
    frames: list[list[int]] = [[0, 0]]  # per group: [current branch, longest closed branch]
    last = 0  # size of the atom a quantifier would apply to
    i = 0
    while i < len(pattern):
        char = pattern[i]
        atom = None
        if char == "\\":
            atom, i = 1, i + 2
        elif char == "[":
            j = i + 1
            if j < len(pattern) and pattern[j] == "^":
                j += 1
            if j < len(pattern) and pattern[j] == "]":
                j += 1
            while j < len(pattern) and pattern[j] != "]":
                j += 2 if pattern[j] == "\\" else 1
            atom, i = 1, j + 1
        elif char == "(":
            frames.append([0, 0])
            i = _group_body(pattern, i + 1)
            last = 0
            continue
        elif char == ")" and len(frames) > 1:
            branch, longest = frames.pop()
            atom, i = max(branch, longest), i + 1
        elif char == "|":
            frame = frames[-1]
            frame[1], frame[0] = max(frame[1], frame[0]), 0
            last, i = 0, i + 1
            continue
        elif char == "{" and (match := _QUANTIFIER.match(pattern, i)):
            low, comma, high = match.groups()
            times = int(high) if comma and high else int(low)
            frames[-1][0] += last * (max(times, 1) - 1)
            last *= max(times, 1)
            frames[-1][0] = min(frames[-1][0], _SATURATE)
            last = min(last, _SATURATE)
            i = match.end()
            continue
        elif char in "*+?^$":
            i += 1
            continue
        else:
            atom, i = 1, i + 1
        frames[-1][0] = min(frames[-1][0] + atom, _SATURATE)
        last = atom
    while len(frames) > 1:  # unbalanced: close what is open
        branch, longest = frames.pop()
        frames[-1][0] += max(branch, longest)
    return int(max(frames[0]))


def _group_body(pattern: str, i: int) -> int:
    """Where a group's body starts after ``(`` at ``i - 1``: past ``?:``, ``?=``, ``?!``,
    ``?<=``, ``?<!``, ``?<name>`` and ``?P<name>``."""
    if not pattern.startswith("?", i):
        return i
    if pattern.startswith(("?:", "?=", "?!"), i):
        return i + 2
    if pattern.startswith(("?<=", "?<!"), i):
        return i + 3
    if pattern.startswith(("?<", "?P<"), i):
        close = pattern.find(">", i)
        return close + 1 if close > 0 else len(pattern)
    return i + 1


def _patterns(sub: dict[str, Any]) -> Iterator[tuple[str, str]]:
    if isinstance(sub.get("pattern"), str):
        yield "pattern", sub["pattern"]
    if isinstance(sub.get("patternProperties"), dict):
        for key in sub["patternProperties"]:
            yield "patternProperties", key


def size_limit_reason(
    schema: Any,
    *,
    max_repeat: int,
    max_min_repeat: int,
    max_forced_chars: int,
    shape: SchemaShape | None = None,
) -> str | None:
    """Why ``schema`` is too big to enforce with a grammar (None when it is not), and its
    shape. Bounds, measured with xgrammar 0.2.8 on this machine:

    - ``maxItems``/``maxLength``/``maxProperties`` and a ``pattern``'s expanded repetitions
      above ``max_repeat``: the grammar grows with them.
    - ``minItems``/``minLength``/``minProperties`` above ``max_min_repeat``: the matcher keeps
      states that grow with the square of a lower bound (minLength 4,000 held 350 MB,
      20,000 held 11 GB) and a lower bound on forced items is forced text.
    - a subschema whose shortest value is longer than ``max_forced_chars`` characters: that
      much text can be forced in one piece (and no model writes it within its tokens).

    ``shape`` is ``schema_shape(schema)`` when the caller has it already.
    """
    for pointer, sub in iter_subschemas(schema):
        for group, bound in ((_UPPER_KEYWORDS, max_repeat), (_LOWER_KEYWORDS, max_min_repeat)):
            for keyword in group:
                value = sub.get(keyword)
                if _is_number(value) and value > bound:
                    return (
                        f"'{keyword}' is {value} at {pointer}; grammars here enforce at most "
                        f"{bound} for {', '.join(group)}"
                    )
        for keyword, pattern in _patterns(sub):
            repeat = pattern_repeat(pattern)
            if repeat > max_repeat:
                return (
                    f"'{keyword}' {_clip(pattern)} at {pointer} expands to {repeat} "
                    f"repeated characters; grammars here enforce at most {max_repeat}"
                )
    found = shape or schema_shape(schema)
    if found.largest_min_chars > max_forced_chars:
        return (
            f"the shortest value {found.largest_at} allows is {found.largest_min_chars} "
            f"characters long; grammars here force at most {max_forced_chars} in one piece"
        )
    return None


def _clip(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")

