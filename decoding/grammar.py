"""Guided decoding with xgrammar: compile a ``Constraint`` once per canonical schema (LRU) and give
each request its own matcher with the interface speculation needs (accept, validate without
advancing, rollback, jump-forward, bitmask).

Schemas xgrammar cannot compile are converted to a regex by outlines-core and compiled as that;
if neither works the request fails with a 400 naming the keyword. Nothing ever runs unconstrained
in place of a constraint.

Every compile is bounded (``decoding.grammar_compile``): checks that fail fast run first on the
caller's thread (nesting depth, meta-schema, contradictions, subschemas with only endless
values, size keywords), then the native compile runs on a dedicated pool with a deadline.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
import xgrammar as xgr

from decoding.constraint import Constraint, JsonObject, JsonSchema, NoConstraint, Regex, ToolCalls
from decoding.grammar_compile import CacheStats, CompileCache, GrammarLimits, shared_cache
from decoding.tool_grammar import tool_call_structural_tag
from schemas.errors import (
    InvalidRequestError,
    SchemaTooComplexError,
    UnsatisfiableSchemaError,
    UnsupportedSchemaError,
)
from schemas.jsonschema_utils import (
    DEFAULT_MAX_DEPTH,
    check_depth,
    check_schema,
    contradiction_reason,
    schema_key,
    unsatisfiable_reason,
)
from schemas.schema_bounds import pattern_repeat, size_limit_reason
from schemas.schema_shape import schema_shape

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
    """A compiled grammar plus what is needed to check its output afterwards.

    ``jump_forward`` is False for a recursive schema whose recursive part forces long text:
    that text can repeat once per nesting level the model opened, so it is left to the
    per-token mask, which the token budget bounds. ``source_bytes`` is the schema's size,
    kept with the grammar and counted against the cache's byte budget."""

    grammar: xgr.CompiledGrammar
    engine: str  # "xgrammar" or "outlines-regex"
    schema: Any  # the JSON schema to validate output against (None for regex / tool calls)
    jump_forward: bool = True
    source_bytes: int = 0

    @property
    def memory_bytes(self) -> int:
        return int(self.grammar.memory_size_bytes) + self.source_bytes


class GrammarState:
    """Per-request matcher. Every method is cheap except ``fill_bitmask``."""

    def __init__(self, compiled: CompiledConstraint, vocab_size: int):
        self._matcher = xgr.GrammarMatcher(
            compiled.grammar, max_rollback_tokens=MAX_ROLLBACK_TOKENS
        )
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        self.can_jump_forward = compiled.jump_forward

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

    def jump_forward(self, max_chars: int | None = None) -> str:
        """Text the grammar forces next ('' when the next character is not fixed), at most
        ``max_chars`` of it. xgrammar finds the whole forced text; the schema checks bound it
        (no endless subschemas, bounded size keywords and shortest values)."""
        if not self.can_jump_forward:
            return ""
        text = str(self._matcher.find_jump_forward_string())
        return text if max_chars is None else text[: max(max_chars, 0)]

    def is_terminated(self) -> bool:
        return bool(self._matcher.is_terminated())


_PREFIXES = itertools.count()


def _memory_bytes(compiled: CompiledConstraint) -> int:
    return compiled.memory_bytes


def shared_grammar_cache(limits: GrammarLimits) -> CompileCache[CompiledConstraint]:
    """The process's compile pool and byte-bounded cache for ``limits`` (shared by models)."""
    return shared_cache(limits, _memory_bytes)


class GrammarCompiler:
    """Compiles constraints for one tokenizer, caching compiled grammars by canonical key.

    ``cache`` is the pool and cache to use (``shared_grammar_cache(limits)`` shares them
    between models); without one the compiler gets its own. ``cache_size`` overrides
    ``limits.cache_entries``."""

    def __init__(self, tokenizer_info: xgr.TokenizerInfo, cache_size: int | None = None,
                 max_threads: int = 2, limits: GrammarLimits | None = None,
                 cache: CompileCache[CompiledConstraint] | None = None):  # fmt: skip
        limits = limits or GrammarLimits()
        if cache_size is not None:
            limits = replace(limits, cache_entries=cache_size)
        self.limits = limits
        self.tokenizer_info = tokenizer_info
        self.vocab_size = int(tokenizer_info.vocab_size)
        self._compiler = xgr.GrammarCompiler(
            self.tokenizer_info, max_threads=max_threads, cache_enabled=False
        )
        self._owns_cache = cache is None
        self._cache = cache if cache is not None else CompileCache(limits, _memory_bytes)
        self._prefix = f"{next(_PREFIXES)}:"  # compiled grammars belong to one tokenizer

    @classmethod
    def for_hf_tokenizer(cls, tokenizer: Any, vocab_size: int, stop_token_ids: list[int],
                         cache_size: int | None = None, limits: GrammarLimits | None = None,
                         cache: CompileCache[CompiledConstraint] | None = None,
                         ) -> GrammarCompiler:  # fmt: skip
        """Compiler for a Hugging Face tokenizer; ``vocab_size`` is the model's logits width."""
        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids
        )
        return cls(info, cache_size=cache_size, limits=limits, cache=cache)

    @property
    def hits(self) -> int:
        return self._cache.stats().hits

    @property
    def misses(self) -> int:
        return self._cache.stats().misses

    def stats(self) -> CacheStats:
        """Cache hits, misses, bytes and entries (of the shared cache when shared)."""
        return self._cache.stats()

    def compile(self, constraint: Constraint, param: str = "response_format") -> (
        CompiledConstraint | None
    ):
        """Compile ``constraint`` (``None`` for no constraint), waiting at most
        ``limits.compile_timeout_s``. Raises a 400 for bad or too complex schemas."""
        if isinstance(constraint, NoConstraint):
            return None
        return self._cache.get(
            self._key(constraint, param),
            lambda: self._prepare(constraint, param),
            lambda: self._timeout_error(param),
        )

    async def compile_async(self, constraint: Constraint, param: str = "response_format") -> (
        CompiledConstraint | None
    ):
        """``compile`` for the event loop: checks run on a worker thread, the wait holds none."""
        if isinstance(constraint, NoConstraint):
            return None
        key = await asyncio.to_thread(self._key, constraint, param)  # linear in the schema
        return await self._cache.get_async(
            key,
            lambda: self._prepare(constraint, param),
            lambda: self._timeout_error(param),
        )

    def new_state(self, compiled: CompiledConstraint) -> GrammarState:
        return GrammarState(compiled, self.vocab_size)

    def close(self) -> None:
        """Stop this compiler's own pool (a shared one stays for the other models)."""
        if self._owns_cache:
            self._cache.close()

    def _compile_uncached(self, constraint: Constraint, param: str) -> CompiledConstraint:
        """Check and compile on this thread, bypassing pool and cache (benchmarks time this)."""
        return self._prepare(constraint, param)()

    # ---- checks on the caller's thread ---------------------------------------------------------

    def _key(self, constraint: Constraint, param: str) -> str:
        """The cache key, after the depth check every later step relies on."""
        depth = self.limits.max_schema_depth
        if isinstance(constraint, JsonSchema):
            check_depth(constraint.schema, param, depth)
        elif isinstance(constraint, ToolCalls):
            for i, tool in enumerate(constraint.tools):
                check_depth(tool.parameters, tool.param(i), depth)
            if isinstance(constraint.final, JsonSchema):
                check_depth(constraint.final.schema, "response_format", depth)
        return self._prefix + _cache_key(constraint)

    def _prepare(self, constraint: Constraint, param: str) -> Callable[[], CompiledConstraint]:
        """Check ``constraint`` (400s, in milliseconds) and return its compile for the pool."""
        if isinstance(constraint, JsonObject):
            return self._compile_json_object
        if isinstance(constraint, JsonSchema):
            jump = self._check_schema(constraint.schema, param)
            return lambda: self._compile_schema(constraint, param, jump)
        if isinstance(constraint, ToolCalls):
            checks = [self._check_schema(t.parameters, t.param(i))
                      for i, t in enumerate(constraint.tools)]  # fmt: skip
            if isinstance(constraint.final, JsonSchema):
                checks.append(self._check_schema(constraint.final.schema, "response_format"))
            return lambda: self._compile_tools(constraint, all(checks))
        if isinstance(constraint, Regex):
            repeat = pattern_repeat(constraint.pattern)
            if repeat > self.limits.max_repeat:
                raise SchemaTooComplexError(
                    f"the regex expands to {repeat} repeated characters; grammars here "
                    f"enforce at most {self.limits.max_repeat}",
                    param=param,
                )
            return lambda: self._compile_regex(constraint, param)
        raise TypeError(f"unknown constraint {constraint!r}")

    def _check_schema(self, schema: Any, param: str) -> bool:
        """A 400 unless ``schema`` is valid, satisfiable by a finite value and within the
        size bounds; returns whether jump-forward is safe for it."""
        limits = self.limits
        check_schema(schema, param, limits.max_schema_depth)
        shape = schema_shape(schema)
        reason = contradiction_reason(schema) or shape.endless
        if reason is not None:
            raise UnsatisfiableSchemaError(
                f"the JSON schema cannot be satisfied: {reason}", param=param
            )
        too_big = size_limit_reason(
            schema,
            max_repeat=limits.max_repeat,
            max_min_repeat=limits.max_min_repeat,
            max_forced_chars=limits.max_forced_chars,
            shape=shape,
        )
        if too_big is not None:
            raise SchemaTooComplexError(
                f"the JSON schema is too large to enforce: {too_big}", param=param
            )
        return shape.recursive_min_chars <= limits.recursive_jump_forward_chars

    def _timeout_error(self, param: str) -> SchemaTooComplexError:
        seconds = f"{self.limits.compile_timeout_s:g}"
        return SchemaTooComplexError(
            f"the grammar for {param} did not compile within {seconds} s "
            "(limits.grammar_compile_timeout_s); simplify the schema, or retry later: the "
            "compile goes on in the background and its result is cached",
            param=param,
        )

    # ---- compiles on the pool ------------------------------------------------------------------

    def _compile_json_object(self) -> CompiledConstraint:
        grammar = self._compiler.compile_json_schema(
            '{"type": "object"}', any_whitespace=False, strict_mode=False
        )
        return CompiledConstraint(grammar, "xgrammar", {"type": "object"})

    def _compile_regex(self, constraint: Regex, param: str) -> CompiledConstraint:
        try:
            grammar = self._compiler.compile_regex(constraint.pattern)
        except Exception as exc:
            raise InvalidRequestError(f"invalid regex: {exc}", param=param) from None
        return CompiledConstraint(grammar, "xgrammar", None, source_bytes=len(constraint.pattern))

    def _compile_schema(self, constraint: JsonSchema, param: str, jump_forward: bool) -> (
        CompiledConstraint
    ):
        schema = constraint.schema
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
                return CompiledConstraint(grammar, "xgrammar", schema, jump_forward, len(text))
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
        return CompiledConstraint(grammar, "outlines-regex", schema, jump_forward, len(text))

    def _compile_tools(self, constraint: ToolCalls, jump_forward: bool) -> CompiledConstraint:
        text = json.dumps(tool_call_structural_tag(constraint))
        try:
            grammar = self._compiler.compile_structural_tag(text)
        except Exception as exc:
            message = _first_line(exc)
            cls = UnsatisfiableSchemaError if _UNSATISFIABLE.search(message) else (
                UnsupportedSchemaError
            )
            raise cls(f"cannot build the tool-call grammar: {message}", param="tools") from None
        return CompiledConstraint(grammar, "xgrammar", None, jump_forward, len(text))


def check_usable(schema: Any, param: str, max_depth: int = DEFAULT_MAX_DEPTH) -> None:
    """A valid, locally resolvable schema that a finite value satisfies, or a 400 saying what
    is wrong (for any backend; grammar size bounds are the compiler's own)."""
    check_schema(schema, param, max_depth)
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
