"""Which grammar engine compiles a constraint: ``grammar_engine: auto | xgrammar | llguidance``.

``auto`` orders the engines per constraint by what each enforces and by measured speed
(BENCHMARKS.md, "Guided decoding"): JSON schemas go to llguidance first — it compiles in
milliseconds where xgrammar takes milliseconds to seconds and, on the worst shared schemas,
minutes, and it refuses keywords it cannot enforce (``not``, unknown formats, …) instead of
ignoring them — then to xgrammar (which compiles what llguidance refuses, leaving those
keywords to the check after generation), then to outlines-core's regex. Tool calls and
regexes go to xgrammar first (its masks are the faster of the two, and its structural tags are
what the tool-call evaluations measured), then llguidance. A named engine is used alone
(xgrammar keeps its outlines-core fallback).
"""

from __future__ import annotations

from typing import Literal

from decoding.constraint import Constraint, JsonSchema
from decoding.grammar_state import GRAMMAR_ENGINES, GrammarEngine
from schemas.errors import InvalidRequestError

Step = Literal["xgrammar", "llguidance", "llguidance-lenient", "outlines-regex"]


def engine_order(constraint: Constraint, setting: GrammarEngine) -> tuple[Step, ...]:
    """The compile attempts for ``constraint`` under ``setting``, first to last; the first that
    compiles is used."""
    schema = isinstance(constraint, JsonSchema)
    if setting == "xgrammar":
        return ("xgrammar", "outlines-regex") if schema else ("xgrammar",)
    if setting == "llguidance":
        return ("llguidance-lenient",) if schema else ("llguidance",)
    if schema:
        return ("llguidance", "xgrammar", "outlines-regex")
    return ("xgrammar", "llguidance")


def parse_grammar_engine(value: object, param: str = "grammar_engine") -> GrammarEngine:
    """A ``grammar_engine`` setting from a request, route or model config, or a 400."""
    if value not in GRAMMAR_ENGINES:
        raise InvalidRequestError(
            f"grammar_engine must be one of {', '.join(GRAMMAR_ENGINES)}; got {value!r}",
            param=param,
        )
    return value
