"""Guided decoding with xgrammar: compile a ``Constraint`` once per canonical schema (LRU) and give
each request its own matcher with the interface speculation needs (accept, validate without
advancing, rollback, jump-forward, bitmask).

Schemas xgrammar cannot compile are converted to a regex by outlines-core and compiled as that;
if neither works the request fails with a 400 naming the keyword. Nothing ever runs unconstrained
in place of a constraint.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
import xgrammar as xgr

from decoding.constraint import Constraint, JsonObject, JsonSchema, NoConstraint, Regex, ToolCalls
from decoding.tool_grammar import tool_call_structural_tag
from schemas.errors import (
    InvalidRequestError,
    UnsatisfiableSchemaError,
    UnsupportedSchemaError,
)
from schemas.jsonschema_utils import (
    check_schema,
    schema_key,
    unsatisfiable_reason,
)

log = logging.getLogger(__name__)

# Rejected speculative drafts are rolled back through the matcher; this bounds how far.
MAX_ROLLBACK_TOKENS = 64

# xgrammar messages that mean "no value satisfies this schema" rather than "cannot handle it".
_UNSATISFIABLE = re.compile(
    r"must not be empty|greater than|less than|no valid|unsatisfiable|cannot be satisfied|"
    r"minItems.*maxItems|minLength.*maxLength|minProperties.*maxProperties",
    re.IGNORECASE,
)
# Keywords named in error messages when a schema cannot be compiled by either engine.
_KNOWN_KEYWORDS = (
    "$ref", "patternProperties", "propertyNames", "pattern", "format", "multipleOf",
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minItems", "maxItems",
    "minLength", "maxLength", "minProperties", "maxProperties", "enum", "const", "prefixItems",
    "allOf", "anyOf", "oneOf", "not", "if", "unevaluatedProperties", "additionalProperties",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class CompiledConstraint:
    """A compiled grammar plus what is needed to check its output afterwards."""

    grammar: xgr.CompiledGrammar
    engine: str  # "xgrammar" or "outlines-regex"
    schema: Any  # the JSON schema to validate output against (None for regex / tool calls)


class GrammarState:
    """Per-request matcher. Every method is cheap except ``fill_bitmask``."""

    def __init__(self, compiled: CompiledConstraint, vocab_size: int):
        self._matcher = xgr.GrammarMatcher(
            compiled.grammar, max_rollback_tokens=MAX_ROLLBACK_TOKENS
        )
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)

    def fill_bitmask(self) -> torch.Tensor:
        """Fill and return the packed bitmask of tokens allowed next."""
        self._matcher.fill_next_token_bitmask(self.bitmask, 0)
        return self.bitmask

    def accept(self, token_id: int) -> bool:
        return bool(self._matcher.accept_token(token_id))

    def validate_tokens(self, token_ids: list[int]) -> int:
        """How many leading tokens of ``token_ids`` the grammar accepts; the state is unchanged."""
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

    def jump_forward(self) -> str:
        """Text the grammar forces next ('' when the next character is not fixed)."""
        return str(self._matcher.find_jump_forward_string())

    def is_terminated(self) -> bool:
        return bool(self._matcher.is_terminated())


class GrammarCompiler:
    """Compiles constraints for one tokenizer, caching compiled grammars by canonical key."""

    def __init__(self, tokenizer_info: xgr.TokenizerInfo, cache_size: int = 256,
                 max_threads: int = 2):  # fmt: skip
        self.tokenizer_info = tokenizer_info
        self.vocab_size = int(tokenizer_info.vocab_size)
        self._compiler = xgr.GrammarCompiler(
            self.tokenizer_info, max_threads=max_threads, cache_enabled=False
        )
        self._cache: OrderedDict[str, CompiledConstraint] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @classmethod
    def for_hf_tokenizer(cls, tokenizer: Any, vocab_size: int, stop_token_ids: list[int],
                         cache_size: int = 256) -> GrammarCompiler:  # fmt: skip
        """Compiler for a Hugging Face tokenizer; ``vocab_size`` is the model's logits width."""
        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids
        )
        return cls(info, cache_size=cache_size)

    def compile(self, constraint: Constraint, param: str = "response_format") -> (
        CompiledConstraint | None
    ):
        """Compile ``constraint`` (``None`` for no constraint). Raises a 400 for bad schemas."""
        if isinstance(constraint, NoConstraint):
            return None
        key = _cache_key(constraint)
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                self.hits += 1
                return cached
        compiled = self._compile_uncached(constraint, param)
        with self._lock:
            self.misses += 1
            self._cache[key] = compiled
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled

    def new_state(self, compiled: CompiledConstraint) -> GrammarState:
        return GrammarState(compiled, self.vocab_size)

    def _compile_uncached(self, constraint: Constraint, param: str) -> CompiledConstraint:
        if isinstance(constraint, JsonObject):
            grammar = self._compiler.compile_json_schema(
                '{"type": "object"}', any_whitespace=False, strict_mode=False
            )
            return CompiledConstraint(grammar, "xgrammar", {"type": "object"})
        if isinstance(constraint, JsonSchema):
            return self._compile_schema(constraint, param)
        if isinstance(constraint, ToolCalls):
            return self._compile_tools(constraint)
        if isinstance(constraint, Regex):
            try:
                grammar = self._compiler.compile_regex(constraint.pattern)
            except Exception as exc:
                raise InvalidRequestError(f"invalid regex: {exc}", param=param) from None
            return CompiledConstraint(grammar, "xgrammar", None)
        raise TypeError(f"unknown constraint {constraint!r}")

    def _compile_schema(self, constraint: JsonSchema, param: str) -> CompiledConstraint:
        schema = constraint.schema
        check_usable(schema, param)
        text = json.dumps(schema)
        xgr_error = ""
        # strict_mode first: never generate properties the schema does not declare (the output
        # still validates; small models otherwise invent keys until max_tokens). A schema that
        # needs undeclared properties (e.g. minProperties above the declared count) is
        # satisfiable only without it.
        for strict_mode in (True, False):
            try:
                grammar = self._compiler.compile_json_schema(
                    text, any_whitespace=False, strict_mode=strict_mode
                )
                return CompiledConstraint(grammar, "xgrammar", schema)
            except Exception as exc:
                xgr_error = xgr_error or _first_line(exc)
        if _UNSATISFIABLE.search(xgr_error):
            raise UnsatisfiableSchemaError(
                f"the JSON schema cannot be satisfied: {xgr_error}", param=param
            )
        try:
            from outlines_core.json_schema import build_regex_from_schema

            grammar = self._compiler.compile_regex(build_regex_from_schema(text))
        except Exception as exc:
            keyword = _guess_keyword(schema, xgr_error + " " + _first_line(exc))
            raise UnsupportedSchemaError(
                f"unsupported JSON schema keyword '{keyword}': neither xgrammar ({xgr_error}) "
                f"nor outlines ({_first_line(exc)}) can enforce this schema",
                param=param,
            ) from None
        log.info("schema compiled through outlines-core's regex after xgrammar: %s", xgr_error)
        return CompiledConstraint(grammar, "outlines-regex", schema)

    def _compile_tools(self, constraint: ToolCalls) -> CompiledConstraint:
        for i, tool in enumerate(constraint.tools):
            check_usable(tool.parameters, f"tools.{i}.function.parameters")
        if isinstance(constraint.final, JsonSchema):
            check_usable(constraint.final.schema, "response_format")
        tag = tool_call_structural_tag(constraint)
        try:
            grammar = self._compiler.compile_structural_tag(json.dumps(tag))
        except Exception as exc:
            message = _first_line(exc)
            cls = UnsatisfiableSchemaError if _UNSATISFIABLE.search(message) else (
                UnsupportedSchemaError
            )
            raise cls(f"cannot build the tool-call grammar: {message}", param="tools") from None
        return CompiledConstraint(grammar, "xgrammar", None)


def check_usable(schema: Any, param: str) -> None:
    """A valid, locally resolvable, satisfiable schema, or a 400 saying what is wrong."""
    check_schema(schema, param)
    reason = unsatisfiable_reason(schema)
    if reason is not None:
        raise UnsatisfiableSchemaError(
            f"the JSON schema cannot be satisfied: {reason}", param=param
        )


def _cache_key(constraint: Constraint) -> str:
    if isinstance(constraint, JsonSchema):
        return schema_key("json_schema", constraint.schema)
    if isinstance(constraint, ToolCalls):
        return schema_key("tool_calls", tool_call_structural_tag(constraint))
    if isinstance(constraint, Regex):
        return schema_key("regex", constraint.pattern)
    return schema_key(constraint.kind, None)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    # xgrammar prefixes messages with "[time] /path/file.cc:line: "
    text = re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", text)
    return text.splitlines()[0] if text else type(exc).__name__


def _guess_keyword(schema: Any, message: str) -> str:
    for keyword in _KNOWN_KEYWORDS:
        if keyword in message:
            return keyword
    present = {k for k in _KNOWN_KEYWORDS if f'"{k}"' in json.dumps(schema)}
    return next((k for k in _KNOWN_KEYWORDS if k in present), "(unknown)")
