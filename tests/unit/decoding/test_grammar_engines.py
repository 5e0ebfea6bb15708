"""The two grammar engines side by side on toy vocabularies: which one ``auto`` picks, what each
enforces after the schema rewrites, the matcher contract both keep, and one compile per schema
under concurrent requests."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from decoding.constraint import (
    GrammarEngine,
    JsonObject,
    JsonSchema,
    NoConstraint,
    Regex,
    ToolCalls,
    ToolSpec,
)
from decoding.engine_choice import engine_order, parse_grammar_engine
from decoding.grammar import GrammarCompiler
from decoding.grammar_compile import GrammarLimits
from decoding.llguidance_engine import _utf8_prefix
from schemas.errors import InvalidRequestError, SchemaTooComplexError, UnsupportedSchemaError
from tests.unit.decoding.toy_grammar import CHARS, ENGINES, toy_compiler

SCHEMA = JsonSchema({"type": "object", "properties": {"a": {"type": "integer"}}})
TOOLS = ToolCalls((ToolSpec("f"),))


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> GrammarEngine:
    return request.param  # type: ignore[no-any-return]


def accepts(compiler: GrammarCompiler, constraint: Any, text: str,
            engine: GrammarEngine | None = None) -> bool:  # fmt: skip
    """Whether ``text`` followed by end-of-text is a complete output (``CHARS`` vocabulary)."""
    compiled = compiler.compile(constraint, engine=engine)
    assert compiled is not None
    state = compiler.new_state(compiled)
    ids = [CHARS.index(c) for c in text] + [0]
    return state.validate_tokens(ids) == len(ids)


# ---- which engine ------------------------------------------------------------------------------


def test_auto_order_per_constraint() -> None:
    assert engine_order(SCHEMA, "auto") == ("llguidance", "xgrammar", "outlines-regex")
    assert engine_order(TOOLS, "auto") == ("xgrammar", "llguidance")
    assert engine_order(Regex("a+"), "auto") == ("xgrammar", "llguidance")
    assert engine_order(JsonObject(), "auto") == ("xgrammar", "llguidance")
    assert engine_order(SCHEMA, "xgrammar") == ("xgrammar", "outlines-regex")
    assert engine_order(TOOLS, "xgrammar") == ("xgrammar",)
    assert engine_order(SCHEMA, "llguidance") == ("llguidance-lenient",)
    assert engine_order(TOOLS, "llguidance") == ("llguidance",)


def test_grammar_engine_setting_is_checked() -> None:
    assert parse_grammar_engine("llguidance") == "llguidance"
    with pytest.raises(InvalidRequestError, match="grammar_engine must be one of auto") as info:
        parse_grammar_engine("outlines")
    assert info.value.param == "grammar_engine"


def test_auto_compiles_json_with_llguidance_and_tools_with_xgrammar() -> None:
    compiler = toy_compiler("auto")
    schema = compiler.compile(SCHEMA)
    tools = compiler.compile(TOOLS)
    assert schema is not None
    assert tools is not None
    assert (schema.engine, tools.engine) == ("llguidance", "xgrammar")
    assert schema.fallback_from == ""
    assert compiler.compile(NoConstraint()) is None


def test_auto_falls_back_to_xgrammar_for_what_llguidance_refuses() -> None:
    """llguidance refuses uniqueItems; xgrammar compiles it, leaving it to the check after
    generation (an incomplete grammar, so strict outputs are checked whole)."""
    compiler = toy_compiler("auto")
    compiled = compiler.compile(JsonSchema({"type": "array", "uniqueItems": True}))
    assert compiled is not None
    assert compiled.engine == "xgrammar"
    assert not compiled.complete
    assert "Unimplemented keys" in compiled.fallback_from


def test_named_llguidance_compiles_unimplemented_keywords_leniently() -> None:
    compiled = toy_compiler("llguidance").compile(JsonSchema({"type": "array", "not": {}}))
    assert compiled is not None
    assert (compiled.engine, compiled.complete) == ("llguidance", False)


def test_each_engine_setting_is_cached_apart() -> None:
    compiler = toy_compiler("auto")
    by_auto = compiler.compile(SCHEMA)
    by_xgrammar = compiler.compile(SCHEMA, engine="xgrammar")
    assert by_auto is not None
    assert by_xgrammar is not None
    assert (by_auto.engine, by_xgrammar.engine) == ("llguidance", "xgrammar")
    assert compiler.compile(SCHEMA, engine="auto") is by_auto
    assert (compiler.hits, compiler.misses) == (1, 2)


def test_a_schema_no_engine_compiles_names_every_engine() -> None:
    with pytest.raises(UnsupportedSchemaError) as info:
        toy_compiler("llguidance").compile(
            JsonSchema({"type": "object", "properties": {"a": {}}, "minProperties": 2})
        )
    assert "llguidance (min/maxProperties" in info.value.message


def test_a_bad_regex_is_a_400_from_either_engine(engine: GrammarEngine) -> None:
    with pytest.raises(InvalidRequestError, match="invalid regex") as info:
        toy_compiler(engine).compile(Regex("(unclosed"), param="regex")
    assert info.value.param == "regex"


# ---- what each engine enforces ------------------------------------------------------------------


@pytest.mark.parametrize("forbidden", [False, {"not": {}}])
def test_a_forbidden_property_is_never_generated(engine: GrammarEngine, forbidden: Any) -> None:
    properties = {"a": forbidden, "b": {"type": "integer"}}
    schema = JsonSchema({"type": "object", "properties": properties})
    compiler = toy_compiler(engine, CHARS)
    assert accepts(compiler, schema, '{"b": 1}')
    assert not accepts(compiler, schema, '{"a": 1}')
    compiled = compiler.compile(schema)
    assert compiled is not None
    assert compiled.complete  # the rewrite made it enforceable: nothing left to check after


def test_dependent_required_is_enforced_by_the_grammar(engine: GrammarEngine) -> None:
    schema = JsonSchema({
        "type": "object", "dependentRequired": {"a": ["b"]},
        "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
    })  # fmt: skip
    compiler = toy_compiler(engine, CHARS)
    assert accepts(compiler, schema, '{"a": 1, "b": 2}')
    assert accepts(compiler, schema, '{"b": 2}')
    assert accepts(compiler, schema, "{}")
    assert not accepts(compiler, schema, '{"a": 1}')


def test_all_of_is_enforced_by_llguidance_only() -> None:
    """xgrammar ignores allOf beyond its first branch: its grammar is marked incomplete, so the
    output is checked after generation; llguidance merges the branches."""
    schema = JsonSchema({"allOf": [
        {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
        {"required": ["b"], "properties": {"b": {"type": "integer"}}},
    ]})  # fmt: skip
    llg, xgr = toy_compiler("llguidance", CHARS), toy_compiler("xgrammar", CHARS)
    assert not accepts(llg, schema, '{"a": 1}')
    assert accepts(llg, schema, '{"a": 1, "b": 2}')
    compiled = xgr.compile(schema)
    assert compiled is not None
    assert not compiled.complete


def test_objects_are_closed_alike_so_no_engine_invents_keys(engine: GrammarEngine) -> None:
    compiler = toy_compiler(engine, CHARS)
    assert not accepts(compiler, SCHEMA, '{"zz": 1}')
    assert accepts(compiler, SCHEMA, '{"a": 1}')


# ---- the matcher contract ----------------------------------------------------------------------


def test_a_refused_token_leaves_the_matcher_usable(engine: GrammarEngine) -> None:
    """xgrammar's accept_token refuses and keeps its state; llguidance would enter a sticky
    error state, so its adapter tries the token first."""
    compiler = toy_compiler(engine, CHARS)
    compiled = compiler.compile(SCHEMA)
    assert compiled is not None
    state = compiler.new_state(compiled)
    assert not state.accept(CHARS.index("x"))
    for ch in '{"a": 7}':
        assert state.accept(CHARS.index(ch)), ch
    assert state.accept(0)
    assert state.is_terminated()


def test_rollback_restores_the_allowed_tokens(engine: GrammarEngine) -> None:
    compiler = toy_compiler(engine, CHARS)
    compiled = compiler.compile(SCHEMA)
    assert compiled is not None
    state = compiler.new_state(compiled)
    before = state.fill_bitmask().clone()
    for ch in '{"a':
        assert state.accept(CHARS.index(ch))
    assert not bool((state.fill_bitmask() == before).all())
    state.rollback(3)
    assert bool((state.fill_bitmask() == before).all())


def test_two_states_of_one_grammar_are_independent(engine: GrammarEngine) -> None:
    compiler = toy_compiler(engine, CHARS)
    compiled = compiler.compile(SCHEMA)
    assert compiled is not None
    one, two = compiler.new_state(compiled), compiler.new_state(compiled)
    assert one.accept(CHARS.index("{"))
    assert two.validate_tokens([CHARS.index(c) for c in '{"a": 1}']) == 8


def test_forced_bytes_cut_mid_character_keep_the_whole_characters() -> None:
    assert _utf8_prefix("é!".encode()[:1]) == ""
    assert _utf8_prefix("aé".encode()[:2]) == "a"
    assert _utf8_prefix(b"abc") == "abc"


# ---- bounded, shared compiles -------------------------------------------------------------------


def test_eight_concurrent_requests_for_one_schema_compile_it_once(engine: GrammarEngine) -> None:
    compiler = toy_compiler(engine)
    schema = JsonSchema({"type": "object", "properties": {f"k{i}": {"type": "string"}
                                                          for i in range(40)}})  # fmt: skip
    results: list[Any] = []
    barrier = threading.Barrier(8)

    def ask() -> None:
        barrier.wait()
        results.append(compiler.compile(schema))

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 8
    assert all(r is results[0] for r in results)
    stats = compiler.stats()
    assert stats.misses == 1
    assert stats.hits + stats.shared == 7


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "string", "pattern": "^(a+)+(b+)+(c+)+(d+)+(e+)+$"},  # catastrophic backtracking
        {"type": "string", "enum": [f"v{i}" for i in range(20_000)]},
        {"anyOf": [{"type": "object", "properties": {f"p{i}": {"$ref": "#"}}} for i in range(50)]},
    ],
)
def test_pathological_schemas_compile_or_get_a_400_within_the_deadline(
    engine: GrammarEngine, schema: dict[str, Any]
) -> None:
    compiler = toy_compiler(engine, limits=GrammarLimits(compile_timeout_s=3))
    started = time.perf_counter()
    outcome: object
    try:
        outcome = compiler.compile(JsonSchema(schema))
    except SchemaTooComplexError as exc:
        outcome = exc.message
    assert time.perf_counter() - started < 3 + 2  # the deadline, plus the checks before it
    assert outcome is not None
    if isinstance(outcome, str):
        assert "limits.grammar_compile_timeout_s" in outcome
    compiler.close()


def test_xgrammar_marks_what_it_warns_it_ignores_as_checked_after() -> None:
    from decoding.xgrammar_engine import unenforced_keywords

    assert unenforced_keywords({"type": "string", "pattern": "^a+$"}) == set()
    assert unenforced_keywords({"type": "string", "pattern": "^a+$", "maxLength": 3}) == {
        "minLength/maxLength beside pattern"}  # fmt: skip
    assert unenforced_keywords({"type": "number", "multipleOf": 0.5}) == {"multipleOf on numbers"}
    assert unenforced_keywords({"type": "integer", "multipleOf": 3}) == set()
    assert unenforced_keywords({"items": {"uniqueItems": True}, "allOf": []}) == {
        "uniqueItems", "allOf"}  # fmt: skip


def test_one_of_compiles_as_any_of_with_exclusivity_checked_after(engine: GrammarEngine) -> None:
    schema = JsonSchema({"oneOf": [{"type": "integer"}, {"type": "string"}]})
    compiled = toy_compiler(engine).compile(schema)
    assert compiled is not None
    assert compiled.engine == engine
    assert not compiled.complete
