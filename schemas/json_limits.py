"""Checks on raw JSON that must run before anything recursive touches it.

``json.loads`` and pydantic recurse once per nesting level, so a body nested 10,000 deep raises
``RecursionError`` deep inside them. ``raw_json_depth`` measures the nesting on the raw bytes
without recursion (string literals removed first, so brackets inside strings do not count), and
``lone_surrogate_path`` finds text no encoder can write back out (a lone UTF-16 surrogate such as
``"\\ud800"`` is valid JSON, but fails the moment it is tokenized or logged as UTF-8).
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np

# A JSON string literal: quote, then any run of non-quote/non-backslash bytes or escapes, quote.
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
# A \u escape in the surrogate range: only bodies containing one need the full walk.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_OPEN = (ord("["), ord("{"))
_CLOSE = (ord("]"), ord("}"))


def raw_json_depth(body: bytes) -> int:
    """The deepest nesting of arrays/objects in ``body`` (0 for a scalar).

    >>> raw_json_depth(b'{"a": [1, {"b": "[[[["}]}')
    3

    Malformed input gives some number (the parser then reports the syntax error); the scan is
    linear in the body and allocates two small arrays per bracket, never recursing.
    """
    stripped = _STRING.sub(b'""', body)
    codes = np.frombuffer(stripped, dtype=np.uint8)
    step = np.isin(codes, _OPEN).astype(np.int32) - np.isin(codes, _CLOSE).astype(np.int32)
    if not step.any():
        return 0
    return int(np.cumsum(step).max())


def lone_surrogate_path(body: bytes, data: Any) -> str | None:
    """The dotted path (e.g. ``messages.0.content``) of the first string or key in ``data``
    holding a lone UTF-16 surrogate, or None. ``body`` is the raw text ``data`` was parsed from:
    when it has no surrogate escape at all, nothing is walked. Iterative, so depth costs no stack.
    """
    if not _SURROGATE_ESCAPE.search(body):
        return None
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            if _has_lone_surrogate(value):
                return path or "(body)"
        elif isinstance(value, dict):
            for key, item in reversed(list(value.items())):
                child = f"{path}.{key}" if path else str(key)
                if _has_lone_surrogate(key):
                    return path or "(body)"
                stack.append((child, item))
        elif isinstance(value, list):
            stack.extend((f"{path}.{i}" if path else str(i), item)
                         for i, item in reversed(list(enumerate(value))))  # fmt: skip
    return None


def _has_lone_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def compact_json(value: Any) -> str:
    """``json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)`` without
    recursion (the C encoder raises RecursionError past ~1,000 levels)."""
    parts: list[str] = []
    stack: list[tuple[bool, Any]] = [(False, value)]  # (is literal text, item)
    while stack:
        literal, item = stack.pop()
        if literal:
            parts.append(item)
        elif isinstance(item, dict):
            seq: list[tuple[bool, Any]] = [(True, "{")]
            for i, (key, sub) in enumerate(item.items()):
                prefix = "," if i else ""
                name = key if isinstance(key, str) else json.dumps(key, default=str)
                seq += [(True, prefix + json.dumps(str(name), ensure_ascii=False) + ":"),
                        (False, sub)]  # fmt: skip
            seq.append((True, "}"))
            stack.extend(reversed(seq))
        elif isinstance(item, list | tuple):
            seq = [(True, "[")]
            for i, sub in enumerate(item):
                seq += [(True, ","), (False, sub)] if i else [(False, sub)]
            seq.append((True, "]"))
            stack.extend(reversed(seq))
        else:
            parts.append(json.dumps(item, ensure_ascii=False, default=str))
    return "".join(parts)
