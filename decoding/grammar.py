"""Guided decoding: compile a ``Constraint`` once per canonical schema and engine setting (a
bounded cache) and give each request its own matcher with the interface speculation needs
(``decoding.grammar_state``).

Two engines sit behind that interface, xgrammar and llguidance, chosen per request by
``grammar_engine`` (``decoding.engine_choice``): ``auto`` tries them in an order that depends on
the constraint and falls back to the next on a compile error; outlines-core's regex is the last
resort for JSON schemas. If nothing compiles, the request fails with a 400 naming the keyword.
Nothing ever runs unconstrained in place of a constraint.

Every compile is bounded (``decoding.grammar_compile``): checks that fail fast run first on the
caller's thread (nesting depth, meta-schema, contradictions, subschemas with only endless
values, size keywords), then the engines run on a dedicated pool with one deadline for all.
Schemas are first rewritten so the grammar enforces what it can (``schemas.schema_rewrite``).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import re
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import xgrammar as xgr

from decoding.constraint import (
    Constraint,
    JsonObject,
    JsonSchema,
    NoConstraint,
    Regex,
    ToolCalls,
)
from decoding.engine_choice import Step, engine_order
from decoding.grammar_compile import CacheStats, CompileCache, GrammarLimits, shared_cache
from decoding.grammar_state import CompiledConstraint, GrammarEngine, GrammarState
from decoding.llguidance_engine import LLGuidanceEngine
from decoding.tool_grammar import tool_call_structural_tag
from decoding.xgrammar_engine import EngineCompileError, XGrammarEngine
from schemas.errors import (
    InvalidRequestError,
    SchemaTooComplexError,
    SlmgateError,
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
from schemas.schema_rewrite import enforceable
from schemas.schema_shape import schema_shape

__all__ = ["CompiledConstraint", "GrammarCompiler", "GrammarState", "check_usable",
           "shared_grammar_cache"]  # fmt: skip

log = logging.getLogger(__name__)

# Engine messages that mean "no value satisfies this schema" rather than "cannot handle it".
_UNSATISFIABLE = re.compile(
    r"must not be empty|greater than|less than|no valid|unsatisfiable|cannot be satisfied|"
    r"minItems.*maxItems|minLength.*maxLength|minProperties.*maxProperties",
    re.IGNORECASE,
)
# Keywords named in error messages when a schema cannot be compiled by any engine.
_KNOWN_KEYWORDS = (
    "$ref", "patternProperties", "propertyNames", "pattern", "format", "multipleOf",
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minItems", "maxItems",
    "minLength", "maxLength", "minProperties", "maxProperties", "enum", "const", "prefixItems",
    "allOf", "anyOf", "oneOf", "not", "if", "unevaluatedProperties", "additionalProperties",
)  # fmt: skip


_PREFIXES = itertools.count()


def _memory_bytes(compiled: CompiledConstraint) -> int:
    return compiled.memory_bytes


def shared_grammar_cache(limits: GrammarLimits) -> CompileCache[CompiledConstraint]:
    """The process's compile pool and byte-bounded cache for ``limits`` (shared by models)."""
    return shared_cache(limits, _memory_bytes)


class GrammarCompiler:
    """Compiles constraints for one tokenizer with either engine, caching compiled grammars by
    canonical key and engine setting.

    ``cache`` is the pool and cache to use (``shared_grammar_cache(limits)`` shares them
    between models); without one the compiler gets its own. ``cache_size`` overrides
    ``limits.cache_entries``. ``llguidance``: the llguidance engine for this tokenizer (None:
    xgrammar only). ``default_engine``: the setting for requests that name none."""

    def __init__(self, tokenizer_info: xgr.TokenizerInfo, cache_size: int | None = None,
                 max_threads: int = 2, limits: GrammarLimits | None = None,
                 cache: CompileCache[CompiledConstraint] | None = None,
                 llguidance: LLGuidanceEngine | None = None,
                 default_engine: GrammarEngine = "auto"):  # fmt: skip
        limits = limits or GrammarLimits()
        if cache_size is not None:
            limits = replace(limits, cache_entries=cache_size)
        self.limits = limits
        self.tokenizer_info = tokenizer_info
        self.vocab_size = int(tokenizer_info.vocab_size)
        self.default_engine: GrammarEngine = default_engine
        self._xgrammar = XGrammarEngine(tokenizer_info, max_threads=max_threads)
        self._llguidance = llguidance
        self._owns_cache = cache is None
        self._cache = cache if cache is not None else CompileCache(limits, _memory_bytes)
        self._prefix = f"{next(_PREFIXES)}:"  # compiled grammars belong to one tokenizer

    @classmethod
    def for_hf_tokenizer(cls, tokenizer: Any, vocab_size: int, stop_token_ids: list[int],
                         cache_size: int | None = None, limits: GrammarLimits | None = None,
                         cache: CompileCache[CompiledConstraint] | None = None,
                         default_engine: GrammarEngine = "auto") -> GrammarCompiler:  # fmt: skip
        """Compiler for a Hugging Face tokenizer; ``vocab_size`` is the model's logits width."""
        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids
        )
        llg = LLGuidanceEngine(tokenizer, vocab_size, stop_token_ids)
        return cls(info, cache_size=cache_size, limits=limits, cache=cache, llguidance=llg,
                   default_engine=default_engine)  # fmt: skip

    @property
    def hits(self) -> int:
        return self._cache.stats().hits

    @property
    def misses(self) -> int:
        return self._cache.stats().misses

    def stats(self) -> CacheStats:
        """Cache hits, misses, bytes and entries (of the shared cache when shared)."""
        return self._cache.stats()

    def compile(self, constraint: Constraint, param: str = "response_format",
                engine: GrammarEngine | None = None) -> CompiledConstraint | None:  # fmt: skip
        """Compile ``constraint`` (``None`` for no constraint) with ``engine`` (default: the
        compiler's), waiting at most ``limits.compile_timeout_s``. Raises a 400 for bad or too
        complex schemas."""
        if isinstance(constraint, NoConstraint):
            return None
        setting = engine or self.default_engine
        return self._cache.get(
            self._key(constraint, param, setting),
            lambda: self._prepare(constraint, param, setting),
            lambda: self._timeout_error(param),
        )

    async def compile_async(self, constraint: Constraint, param: str = "response_format",
                            engine: GrammarEngine | None = None) -> (
        CompiledConstraint | None
    ):  # fmt: skip
        """``compile`` for the event loop: checks run on a worker thread, the wait holds none."""
        if isinstance(constraint, NoConstraint):
            return None
        setting = engine or self.default_engine
        key = await asyncio.to_thread(self._key, constraint, param, setting)  # linear in schema
        return await self._cache.get_async(
            key,
            lambda: self._prepare(constraint, param, setting),
            lambda: self._timeout_error(param),
        )

    def new_state(self, compiled: CompiledConstraint) -> GrammarState:
        return compiled.new_state(self.vocab_size)

    def close(self) -> None:
        """Stop this compiler's own pool (a shared one stays for the other models)."""
        if self._owns_cache:
            self._cache.close()

    def _compile_uncached(self, constraint: Constraint, param: str,
                          engine: GrammarEngine | None = None) -> CompiledConstraint:  # fmt: skip
        """Check and compile on this thread, bypassing pool and cache (benchmarks time this)."""
        return self._prepare(constraint, param, engine or self.default_engine)()

    # ---- checks on the caller's thread ---------------------------------------------------------

    def _key(self, constraint: Constraint, param: str, setting: GrammarEngine) -> str:
        """The cache key, after the depth check every later step relies on."""
        depth = self.limits.max_schema_depth
        if isinstance(constraint, JsonSchema):
            check_depth(constraint.schema, param, depth)
        elif isinstance(constraint, ToolCalls):
            for i, tool in enumerate(constraint.tools):
                check_depth(tool.parameters, tool.param(i), depth)
            if isinstance(constraint.final, JsonSchema):
                check_depth(constraint.final.schema, "response_format", depth)
        return f"{self._prefix}{setting}:{_cache_key(constraint)}"

    def _prepare(self, constraint: Constraint, param: str, setting: GrammarEngine) -> (
        Callable[[], CompiledConstraint]
    ):
        """Check ``constraint`` (400s, in milliseconds) and return its compile for the pool."""
        rewritten: Constraint
        if isinstance(constraint, JsonSchema):
            jump = self._check_schema(constraint.schema, param)
            rewritten = replace(constraint, schema=enforceable(constraint.schema))
        elif isinstance(constraint, ToolCalls):
            checks = [self._check_schema(t.parameters, t.param(i))
                      for i, t in enumerate(constraint.tools)]  # fmt: skip
            if isinstance(constraint.final, JsonSchema):
                checks.append(self._check_schema(constraint.final.schema, "response_format"))
            jump = all(checks)
            rewritten = _enforceable_tools(constraint)
        elif isinstance(constraint, Regex):
            repeat = pattern_repeat(constraint.pattern)
            if repeat > self.limits.max_repeat:
                raise SchemaTooComplexError(
                    f"the regex expands to {repeat} repeated characters; grammars here "
                    f"enforce at most {self.limits.max_repeat}",
                    param=param,
                )
            jump, rewritten = True, constraint
        elif isinstance(constraint, JsonObject):
            jump, rewritten = True, constraint
        else:
            raise TypeError(f"unknown constraint {constraint!r}")
        steps = engine_order(constraint, setting)
        return lambda: self._compile_first(rewritten, constraint, steps, param, jump)

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

    def _compile_first(
        self, rewritten: Constraint, original: Constraint, steps: tuple[Step, ...], param: str,
        jump: bool,
    ) -> CompiledConstraint:
        """The first engine in ``steps`` that compiles ``rewritten``; outputs are validated
        against ``original``. Raises the 400 that fits every engine's failure."""
        errors: list[EngineCompileError] = []
        for step in steps:
            try:
                compiled = self._compile_with(step, rewritten, jump)
            except EngineCompileError as exc:
                errors.append(exc)
                continue
            if compiled is None:
                continue  # that engine is not available for this tokenizer
            why = "; ".join(str(e) for e in errors)
            if why:
                log.info("%s compiled %s after %s", compiled.engine, param, why)
            schema = original.schema if isinstance(original, JsonSchema) else compiled.schema
            return replace(compiled, schema=schema, fallback_from=why)
        raise _compile_error(original, param, errors)

    def _compile_with(self, step: Step, constraint: Constraint, jump: bool) -> (
        CompiledConstraint | None
    ):
        if step in ("llguidance", "llguidance-lenient"):
            llg = self._llguidance
            if llg is None:
                return None
            if isinstance(constraint, JsonSchema):
                return llg.schema(constraint, jump, lenient=step == "llguidance-lenient")
            if isinstance(constraint, ToolCalls):
                return llg.tools(constraint, jump)
            if isinstance(constraint, Regex):
                return llg.regex(constraint)
            return llg.json_object()
        xgr_engine = self._xgrammar
        if isinstance(constraint, JsonSchema):
            if step == "outlines-regex":
                return xgr_engine.schema_via_regex(constraint, jump)
            return xgr_engine.schema(constraint, jump)
        if isinstance(constraint, ToolCalls):
            return xgr_engine.tools(constraint, jump)
        if isinstance(constraint, Regex):
            return xgr_engine.regex(constraint)
        return xgr_engine.json_object()


def _enforceable_tools(constraint: ToolCalls) -> ToolCalls:
    tools = tuple(replace(t, parameters=enforceable(t.parameters)) for t in constraint.tools)
    final = constraint.final
    if isinstance(final, JsonSchema):
        final = replace(final, schema=enforceable(final.schema))
    return replace(constraint, tools=tools, final=final)


def _compile_error(constraint: Constraint, param: str,
                   errors: list[EngineCompileError]) -> SlmgateError:  # fmt: skip
    """The 400 for a constraint no engine compiled."""
    said = "; ".join(f"{e.engine} ({e.message})" for e in errors) or "no engine available"
    unsatisfiable = next((e.message for e in errors if _UNSATISFIABLE.search(e.message)), None)
    if isinstance(constraint, Regex):
        return InvalidRequestError(f"invalid regex: {said}", param=param)
    if isinstance(constraint, ToolCalls):
        if unsatisfiable is not None:
            return UnsatisfiableSchemaError(
                f"cannot build the tool-call grammar: {unsatisfiable}", param="tools"
            )
        return UnsupportedSchemaError(f"cannot build the tool-call grammar: {said}",
                                      param="tools")  # fmt: skip
    if unsatisfiable is not None:
        return UnsatisfiableSchemaError(
            f"the JSON schema cannot be satisfied: {unsatisfiable}", param=param
        )
    schema = constraint.schema if isinstance(constraint, JsonSchema) else None
    keyword = _guess_keyword(schema, " ".join(e.message for e in errors))
    return UnsupportedSchemaError(
        f"unsupported JSON schema keyword '{keyword}': no grammar engine can enforce this "
        f"schema: {said}",
        param=param,
    )


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


def _guess_keyword(schema: Any, message: str) -> str:
    """The keyword most likely at fault: one the schema uses that an engine named, else the
    first the schema uses, else one an engine named."""
    text = json.dumps(schema)
    present = [k for k in _KNOWN_KEYWORDS if f'"{k}"' in text]
    named = [k for k in _KNOWN_KEYWORDS if k in message]
    both = [k for k in present if k in named]
    return next(iter(both or present or named), "(unknown)")
