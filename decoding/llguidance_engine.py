"""llguidance behind ``GrammarState``: JSON schemas, regexes and tool calls (as Lark).

llguidance builds its lexer lazily, so a "compile" here is building one matcher (milliseconds;
the pool's deadline still bounds it) that every request deep-copies. Its JSON compiler refuses
keywords it does not implement instead of ignoring them; such a schema is compiled again in
lenient mode only when llguidance was asked for by name, and the grammar is then marked
incomplete (the output is checked after generation). Objects are closed the way xgrammar's
strict mode closes them (``schemas.schema_rewrite.close_objects``), so neither engine invents
properties. Matchers never enter llguidance's sticky error state here: a token is tried before
it is consumed, as xgrammar's ``accept_token`` leaves a matcher usable after a refusal.
"""

from __future__ import annotations

import json
import threading
from typing import Any, cast

import llguidance
import llguidance.torch
import torch

from decoding.constraint import JsonSchema, Regex, ToolCalls
from decoding.grammar_state import CompiledConstraint
from decoding.tool_lark import json_options, tool_call_lark
from decoding.xgrammar_engine import EngineCompileError
from schemas.jsonschema_utils import schema_keywords
from schemas.schema_rewrite import close_objects, schema_object

# The JSON text xgrammar's any_whitespace=False produces, so outputs look alike either way.
# oneOf is read as anyOf, as xgrammar reads it; exclusivity is checked after generation.
COMPACT_JSON: dict[str, Any] = {
    "whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ",
    "coerce_one_of": True,
}  # fmt: skip
UNIMPLEMENTED = "Unimplemented keys"


class LLGuidanceState:
    """``GrammarState`` over a deep copy of a compiled ``LLMatcher``."""

    def __init__(self, template: llguidance.LLMatcher, vocab_size: int, jump_forward: bool,
                 stop_ids: frozenset[int] = frozenset()):  # fmt: skip
        self._matcher = template.deep_copy()
        self._stop_ids = stop_ids
        self.bitmask = llguidance.torch.allocate_token_bitmask(1, vocab_size)
        self.can_jump_forward = jump_forward

    def fill_bitmask(self) -> torch.Tensor:
        llguidance.torch.fill_next_token_bitmask(self._matcher, self.bitmask, 0)
        return self.bitmask

    def accept(self, token_id: int) -> bool:
        if self._matcher.is_stopped():  # complete: only the end of text may follow
            return token_id in self._stop_ids and self._matcher.consume_token(token_id)
        return self._matcher.try_consume_tokens([token_id]) == 1

    def validate_tokens(self, token_ids: list[int]) -> int:
        return int(self._matcher.validate_tokens(token_ids)) if token_ids else 0

    def rollback(self, n: int) -> None:
        if n:
            self._matcher.rollback(n)

    def jump_forward(self, max_chars: int | None = None) -> str:
        if not self.can_jump_forward:
            return ""
        text = _utf8_prefix(self._matcher.compute_ff_bytes())
        return text if max_chars is None else text[: max(max_chars, 0)]

    def is_terminated(self) -> bool:
        return bool(self._matcher.is_stopped())


class LLGuidanceEngine:
    """Compiles constraints for one tokenizer with llguidance. The tokenizer bridge is built on
    first use (about a second for a 150k vocabulary), so models that never need it pay
    nothing."""

    name = "llguidance"

    def __init__(self, hf_tokenizer: Any, vocab_size: int, stop_token_ids: list[int],
                 limits: llguidance.LLParserLimits | None = None):  # fmt: skip
        self.vocab_size = vocab_size
        self._hf_tokenizer = hf_tokenizer
        self._stop_ids = list(stop_token_ids)
        self._limits = limits
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()

    @classmethod
    def for_tokenizer(cls, tokenizer: llguidance.LLTokenizer, vocab_size: int) -> (
        LLGuidanceEngine
    ):
        """An engine over a ready ``LLTokenizer`` (tests build one on a toy vocabulary)."""
        engine = cls(None, vocab_size, [])
        engine._tokenizer = tokenizer
        return engine

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._tokenizer is None:
                import llguidance.hf

                self._tokenizer = llguidance.hf.from_tokenizer(
                    self._hf_tokenizer, n_vocab=self.vocab_size, eos_token=self._stop_ids
                )
            return self._tokenizer

    def json_object(self) -> CompiledConstraint:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            {"type": "object"}, defaults=cast("Any", COMPACT_JSON)
        )
        return self._compiled(grammar, {"type": "object"}, jump_forward=True)

    def regex(self, constraint: Regex) -> CompiledConstraint:
        grammar = llguidance.LLMatcher.grammar_from_regex(constraint.pattern)
        return self._compiled(grammar, None, jump_forward=True)

    def schema(self, constraint: JsonSchema, jump_forward: bool, *, lenient: bool = False) -> (
        CompiledConstraint
    ):
        """Strict first; with ``lenient``, a schema using keywords llguidance does not
        implement compiles without them (an incomplete grammar)."""
        closed = close_objects(constraint.schema)
        complete = not uses_one_of(closed)
        try:
            grammar = self._json_grammar(closed, lenient=False)
            return self._compiled(grammar, constraint.schema, jump_forward=jump_forward,
                                  complete=complete)  # fmt: skip
        except EngineCompileError as exc:
            if not (lenient and UNIMPLEMENTED in exc.message):
                raise
        grammar = self._json_grammar(closed, lenient=True)
        return self._compiled(grammar, constraint.schema, jump_forward=jump_forward,
                              complete=False)  # fmt: skip

    def tools(self, constraint: ToolCalls, jump_forward: bool) -> CompiledConstraint:
        grammar = llguidance.LLMatcher.grammar_from_lark(tool_call_lark(constraint))
        complete = not any(uses_one_of(t.parameters) for t in constraint.tools)
        return self._compiled(grammar, None, jump_forward=jump_forward, complete=complete)

    def _json_grammar(self, schema: Any, *, lenient: bool) -> str:
        options = json_options(COMPACT_JSON, lenient=lenient)
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                schema_object(schema), defaults=cast("Any", options)
            )
            return str(grammar)
        except ValueError as exc:
            raise EngineCompileError(self.name, str(exc).splitlines()[0]) from None

    def _compiled(self, grammar: str, schema: Any, *, jump_forward: bool,
                  complete: bool = True) -> CompiledConstraint:  # fmt: skip
        """Build the template matcher: llguidance compiles here and reports errors as state."""
        template = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0, limits=self._limits)
        if template.is_error():
            raise EngineCompileError(self.name, _error_line(template.get_error()))
        vocab, stops = self.vocab_size, frozenset(self.tokenizer.eos_tokens)
        return CompiledConstraint(
            "llguidance",
            lambda _: LLGuidanceState(template, vocab, jump_forward, stops),
            schema,
            # No size API: the grammar text stands in (lexer states grow lazily, per request).
            memory_bytes=len(grammar) + len(json.dumps(schema) if schema is not None else ""),
            complete=complete,
            jump_forward=jump_forward,
        )


def uses_one_of(schema: Any) -> bool:
    """Whether ``schema`` has a ``oneOf`` (compiled as ``anyOf``: exclusivity checked after)."""
    return "oneOf" in schema_keywords(schema)


def _error_line(message: str) -> str:
    """llguidance's error without its parser-state dump."""
    return message.strip().splitlines()[0] if message.strip() else "llguidance error"


def _utf8_prefix(data: bytes) -> str:
    """The longest prefix of ``data`` that is whole UTF-8 (forced bytes can end mid-character)."""
    for cut in range(len(data), max(len(data) - 4, -1), -1):
        try:
            return data[:cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
    return data.decode("utf-8", errors="ignore")
