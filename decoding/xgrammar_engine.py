"""xgrammar behind ``GrammarState``: JSON schemas (strict mode first), regexes and the tool-call
structural tag, plus outlines-core's regex for schemas xgrammar cannot compile.

xgrammar ignores some keywords without a word (``not``, ``if``/``then``, ``uniqueItems``,
``contains``, ``dependentRequired``, ``oneOf`` exclusivity, ``allOf`` beyond its first
branch); a grammar for a schema using them is marked incomplete, and its output is checked
after generation.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

import torch
import xgrammar as xgr

from decoding.constraint import JsonSchema, Regex, ToolCalls
from decoding.grammar_state import MAX_ROLLBACK_TOKENS, CompiledConstraint
from decoding.tool_grammar import tool_call_structural_tag
from schemas.jsonschema_utils import VALIDATED_AFTER_GENERATION, iter_subschemas

log = logging.getLogger(__name__)

# Keywords xgrammar 0.2.8 accepts but does not enforce beyond VALIDATED_AFTER_GENERATION
# (measured on a toy vocabulary: an instance breaking them is accepted; xgrammar's own warnings
# name more, see ``unenforced_keywords``).
XGRAMMAR_IGNORES = frozenset({"allOf"})


class EngineCompileError(Exception):
    """An engine could not compile a constraint; ``message`` is its own first line."""

    def __init__(self, engine: str, message: str):
        super().__init__(f"{engine}: {message}")
        self.engine = engine
        self.message = message


class XGrammarState:
    """``GrammarState`` over an ``xgr.GrammarMatcher``."""

    def __init__(self, grammar: xgr.CompiledGrammar, vocab_size: int, jump_forward: bool):
        self._matcher = xgr.GrammarMatcher(grammar, max_rollback_tokens=MAX_ROLLBACK_TOKENS)
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        self.can_jump_forward = jump_forward

    def fill_bitmask(self) -> torch.Tensor:
        self._matcher.fill_next_token_bitmask(self.bitmask, 0)
        return self.bitmask

    def accept(self, token_id: int) -> bool:
        return bool(self._matcher.accept_token(token_id))

    def validate_tokens(self, token_ids: list[int]) -> int:
        accepted = 0
        for token in token_ids:
            if not self._matcher.accept_token(token):
                break
            accepted += 1
        if accepted:
            self._matcher.rollback(accepted)
        return accepted

    def rollback(self, n: int) -> None:
        if n:
            self._matcher.rollback(n)

    def jump_forward(self, max_chars: int | None = None) -> str:
        """xgrammar finds the whole forced text; the schema checks bound it (no endless
        subschemas, bounded size keywords and shortest values)."""
        if not self.can_jump_forward:
            return ""
        text = str(self._matcher.find_jump_forward_string())
        return text if max_chars is None else text[: max(max_chars, 0)]

    def is_terminated(self) -> bool:
        return bool(self._matcher.is_terminated())


class XGrammarEngine:
    """Compiles constraints for one tokenizer with xgrammar (no cache: the caller keeps one)."""

    name = "xgrammar"

    def __init__(self, tokenizer_info: xgr.TokenizerInfo, max_threads: int = 2):
        self.tokenizer_info = tokenizer_info
        self.vocab_size = int(tokenizer_info.vocab_size)
        self._compiler = xgr.GrammarCompiler(
            tokenizer_info, max_threads=max_threads, cache_enabled=False
        )

    def _compiled(self, grammar: xgr.CompiledGrammar, schema: Any, *, complete: bool = True,
                  jump_forward: bool = True, source_bytes: int = 0,
                  engine: str = "xgrammar") -> CompiledConstraint:  # fmt: skip
        vocab = self.vocab_size
        return CompiledConstraint(
            engine,  # type: ignore[arg-type]
            lambda _: XGrammarState(grammar, vocab, jump_forward),
            schema,
            int(grammar.memory_size_bytes) + source_bytes,
            complete=complete,
            jump_forward=jump_forward,
        )

    def json_object(self) -> CompiledConstraint:
        grammar = self._compiler.compile_json_schema(
            '{"type": "object"}', any_whitespace=False, strict_mode=False
        )
        return self._compiled(grammar, {"type": "object"})

    def regex(self, constraint: Regex) -> CompiledConstraint:
        try:
            grammar = self._compiler.compile_regex(constraint.pattern)
        except Exception as exc:
            raise EngineCompileError(self.name, first_line(exc)) from None
        return self._compiled(grammar, None, source_bytes=len(constraint.pattern))

    def schema(self, constraint: JsonSchema, jump_forward: bool) -> CompiledConstraint:
        """strict_mode first: never generate properties the schema does not declare (the output
        still validates; small models otherwise invent keys until max_tokens). A schema that
        needs undeclared properties (e.g. minProperties above the declared count) is
        satisfiable only without it."""
        text = json.dumps(constraint.schema)
        error = ""
        complete = not unenforced_keywords(constraint.schema)
        for strict_mode in (True, False):
            try:
                grammar = self._compiler.compile_json_schema(
                    text, any_whitespace=False, strict_mode=strict_mode
                )
                return self._compiled(
                    grammar, constraint.schema, complete=complete, jump_forward=jump_forward,
                    source_bytes=len(text),
                )
            except Exception as exc:
                error = error or first_line(exc)
        raise EngineCompileError(self.name, error)

    def schema_via_regex(self, constraint: JsonSchema, jump_forward: bool) -> CompiledConstraint:
        """outlines-core turns the schema into a regex, compiled by xgrammar: a last resort for
        schemas neither engine compiles directly."""
        from outlines_core.json_schema import build_regex_from_schema

        text = json.dumps(constraint.schema)
        try:
            grammar = self._compiler.compile_regex(build_regex_from_schema(text))
        except Exception as exc:
            raise EngineCompileError("outlines", first_line(exc)) from None
        return self._compiled(grammar, constraint.schema, complete=False,
                              jump_forward=jump_forward, source_bytes=len(text),
                              engine="outlines-regex")  # fmt: skip

    def tools(self, constraint: ToolCalls, jump_forward: bool) -> CompiledConstraint:
        text = json.dumps(tool_call_structural_tag(constraint))
        try:
            grammar = self._compiler.compile_structural_tag(text)
        except Exception as exc:
            raise EngineCompileError(self.name, first_line(exc)) from None
        complete = not any(unenforced_keywords(t.parameters) for t in constraint.tools)
        return self._compiled(grammar, None, complete=complete, jump_forward=jump_forward,
                              source_bytes=len(text))  # fmt: skip


def unenforced_keywords(schema: Any) -> set[str]:
    """The keywords of ``schema`` an xgrammar grammar lets through unchecked: those it cannot
    express, and the combinations it warns it ignores (length bounds beside a ``pattern``,
    ``multipleOf`` on non-integers)."""
    found: set[str] = set()
    for _, sub in iter_subschemas(schema):
        keys = set(sub)
        found |= keys & (VALIDATED_AFTER_GENERATION | XGRAMMAR_IGNORES)
        if "pattern" in keys and keys & {"minLength", "maxLength"}:
            found.add("minLength/maxLength beside pattern")
        if "multipleOf" in keys and sub.get("type") != "integer":
            found.add("multipleOf on numbers")
    return found


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    # xgrammar prefixes messages with "[time] /path/file.cc:line: "
    text = re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", text)
    return text.splitlines()[0] if text else type(exc).__name__
