"""Grammar building and the compile cache on a toy vocabulary: no model needed."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import xgrammar as xgr

from decoding.constraint import (
    GrammarEngine,
    JsonObject,
    JsonSchema,
    NoConstraint,
    Regex,
    ToolCalls,
    ToolSpec,
)
from decoding.grammar import CompiledConstraint, GrammarCompiler
from decoding.grammar_compile import GrammarLimits
from schemas.errors import (
    InvalidRequestError,
    SchemaTooComplexError,
    UnsatisfiableSchemaError,
    UnsupportedSchemaError,
)
from tests.unit.decoding.toy_grammar import ENGINES, VOCAB, tools_accept, toy_compiler

WEATHER = ToolSpec(
    "get_weather",
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
     "additionalProperties": False},
)  # fmt: skip
TIME = ToolSpec("get_time", {"type": "object", "properties": {"tz": {"type": "string"}}})

CALL = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
TAGGED = f"<tool_call>\n{CALL}\n</tool_call>"
CALL_TIME = '{"name": "get_time", "arguments": {"tz": "UTC"}}'
TAGGED_TIME = f"<tool_call>\n{CALL_TIME}\n</tool_call>"


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> GrammarEngine:
    """Every test taking it runs once per grammar engine."""
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def compiler(engine: GrammarEngine) -> Iterator[GrammarCompiler]:
    compiler = toy_compiler(engine, cache_size=2)
    yield compiler
    compiler.close()


# (mode, parallel, text, accepted, why)
TOOL_CASES = [
    ("auto", True, TAGGED, True, "tagged call"),
    ("auto", True, CALL, True, "bare call: small models drop the tags"),
    ("auto", True, "It is sunny.", True, "auto allows plain text"),
    ("auto", True, f"```json\n{CALL}\n```", True, "fenced call, as coder models write it"),
    ("auto", True, '```json\n{"name": "nope", "arguments": {}}\n```', False,
     "a leading fence is always a constrained call"),
    ("auto", True, f"Let me check. {TAGGED}", True, "text then a constrained call"),
    ("auto", True, '{"name": "nope", "arguments": {}}', False, "name must be an offered tool"),
    ("auto", True, '{"name": "get_weather", "arguments": {"city": 3}}', False, "args typed"),
    ("auto", True, '<tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call>', False,
     "a leading tag is always a constrained call"),
    ("auto", True, "x " + TAGGED.replace('"Paris"', "1"), False,
     "a call inside text is still constrained"),
    ("required", True, "It is sunny.", False, "required forbids text"),
    ("required", True, f"{TAGGED}\n{TAGGED_TIME}", True, "parallel calls"),
    ("required", False, f"{TAGGED}\n{TAGGED_TIME}", False, "parallel_tool_calls=false: one"),
    ("required", True, '{"name": "get_weather", "arguments": {"city": "P", "x": 1}}', False,
     "additionalProperties false holds inside calls"),
    ("auto", True, "```python\nprint(1)\n```", True, "a code answer is text, not a call"),
    ("auto", True, "```\nfoo", False, "a fence without a language could hide a call: refused"),
    ("auto", True, "[1, 2]", False, "a leading [ is always an array of calls"),
    ("auto", True, " It is sunny.", False, "text starts with a visible character"),
    ("auto", False, f"```json\n{CALL}\n{CALL_TIME}\n```", False, "one fence, one call"),
    ("auto", False, f"[{CALL}, {CALL_TIME}]", False, "one array, one call"),
    ("auto", False, f"[{CALL}]", True, "an array of one call"),
    ("required", True, '```json\n{"name": "get_weather", "arguments": {}}\n```', False,
     "calls in a fence keep their schema"),
    ("required", True, '[{"name": "nope", "arguments": {}}]', False, "arrays hold offered tools"),
]  # fmt: skip

# Every form the grammar allows for the same two calls (parsed alike in test_text_units).
MULTI_CALL_FORMS = {
    "tagged blocks": f"{TAGGED}\n{TAGGED_TIME}",
    "bare, one per line": f"{CALL}\n{CALL_TIME}",
    "one fence, one per line": f"```json\n{CALL}\n{CALL_TIME}\n```",
    "a fence per call": f"```json\n{CALL}\n```\n```json\n{CALL_TIME}\n```",
    "array": f"[{CALL}, {CALL_TIME}]",
    "array in a fence": f"```json\n[{CALL}, {CALL_TIME}]\n```",
}


@pytest.mark.parametrize("mode", ["auto", "required"])
@pytest.mark.parametrize("form", sorted(MULTI_CALL_FORMS))
def test_every_multi_call_form_is_accepted_only_with_parallel_calls(
    engine: GrammarEngine, mode: str, form: str
) -> None:
    text = MULTI_CALL_FORMS[form]
    parallel = ToolCalls((WEATHER, TIME), mode=mode, parallel=True)  # type: ignore[arg-type]
    single = ToolCalls((WEATHER, TIME), mode=mode, parallel=False)  # type: ignore[arg-type]
    assert tools_accept(engine, parallel, text), form
    assert not tools_accept(engine, single, text), form


@pytest.mark.parametrize(("mode", "parallel", "text", "accepted", "why"), TOOL_CASES)
def test_tool_grammar(
    engine: GrammarEngine, mode: str, parallel: bool, text: str, accepted: bool, why: str
) -> None:
    constraint = ToolCalls((WEATHER, TIME), mode=mode, parallel=parallel)  # type: ignore[arg-type]
    assert tools_accept(engine, constraint, text) is accepted, why


def test_named_tool_choice_allows_only_that_tool(engine: GrammarEngine) -> None:
    named = ToolCalls((TIME,), mode="named")
    assert tools_accept(engine, named, TAGGED_TIME)
    assert not tools_accept(engine, named, TAGGED)


def test_tools_with_final_response_format(engine: GrammarEngine) -> None:
    """Agents SDK shape: a tagged call, or the final JSON answer; no free text."""
    final = JsonSchema({"type": "object", "properties": {"answer": {"type": "string"}},
                        "required": ["answer"]})  # fmt: skip
    constraint = ToolCalls((WEATHER,), mode="auto", final=final)
    assert tools_accept(engine, constraint, TAGGED)
    assert tools_accept(engine, constraint, '{"answer": "sunny"}')
    assert not tools_accept(engine, constraint, '{"other": 1}')
    assert not tools_accept(engine, constraint, "It is sunny.")


def test_compile_cache_hits_on_equivalent_schema(compiler: GrammarCompiler) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "title": "T"}
    same_but_annotated = {**schema, "description": "annotations do not change the grammar"}
    first = compiler.compile(JsonSchema(schema))
    second = compiler.compile(JsonSchema(same_but_annotated))
    assert first is second
    assert (compiler.hits, compiler.misses) == (1, 1)


def test_compile_cache_is_lru_bounded(compiler: GrammarCompiler) -> None:
    a, b, c = ({"type": "integer", "maximum": i} for i in range(3))
    first = compiler.compile(JsonSchema(a))
    compiler.compile(JsonSchema(b))
    compiler.compile(JsonSchema(a))  # a is now most recent
    compiler.compile(JsonSchema(c))  # evicts b
    assert compiler.compile(JsonSchema(a)) is first
    misses = compiler.misses
    compiler.compile(JsonSchema(b))
    assert compiler.misses == misses + 1


def test_undeclared_properties_are_never_generated(compiler: GrammarCompiler) -> None:
    """Both strict and non-strict requests compile to the same grammar without extra keys."""
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    compiled = compiler.compile(JsonSchema(schema, strict=False))
    assert compiled is compiler.compile(JsonSchema(schema, strict=True))
    state = compiler.new_state(compiled)  # type: ignore[arg-type]
    extra = [VOCAB.index(c) for c in '{"b']
    assert state.validate_tokens(extra) == 2  # `{` and `"` pass; key `b` is undeclared


def test_schema_needing_undeclared_properties_still_compiles(compiler: GrammarCompiler) -> None:
    """Strict mode would forbid the extra key that minProperties requires; fall back to
    plain JSON-Schema semantics instead of calling a satisfiable schema unsatisfiable.
    llguidance cannot enforce minProperties over optional keys: a 400 naming it, and ``auto``
    compiles the schema with xgrammar instead."""
    schema = JsonSchema(
        {"type": "object", "properties": {"a": {"type": "integer"}}, "minProperties": 2}
    )
    if compiler.default_engine == "llguidance":
        with pytest.raises(UnsupportedSchemaError, match="'minProperties'"):
            compiler.compile(schema)
        compiled = compiler.compile(schema, engine="auto")
        assert compiled is not None
        assert compiled.engine == "xgrammar"
        assert "llguidance" in compiled.fallback_from
    else:
        compiled = compiler.compile(schema)
    assert compiled is not None
    state = compiler.new_state(compiled)
    assert state.validate_tokens([VOCAB.index(c) for c in '{"a": 1, "b": 2}']) == 16


def test_no_constraint_compiles_to_nothing(compiler: GrammarCompiler) -> None:
    assert compiler.compile(NoConstraint()) is None


def test_json_object_matcher_walks_and_rolls_back(compiler: GrammarCompiler) -> None:
    compiled = compiler.compile(JsonObject())
    assert compiled is not None
    state = compiler.new_state(compiled)
    ids = [VOCAB.index(c) for c in '{"a": 1}']  # compact separators
    assert state.validate_tokens(ids) == len(ids)  # does not advance
    assert state.validate_tokens([VOCAB.index("}"), VOCAB.index("{")]) == 0
    for token in ids[:3]:
        assert state.accept(token)
    state.rollback(2)
    assert state.validate_tokens(ids[1:]) == len(ids) - 1
    assert state.jump_forward() == ""


def test_jump_forward_string_for_forced_text(compiler: GrammarCompiler) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
              "additionalProperties": False}  # fmt: skip
    compiled = compiler.compile(JsonSchema(schema, strict=True))
    assert compiled is not None
    assert compiler.new_state(compiled).jump_forward() == '{"city": "'


# (schema, error class, words the message must contain)
BAD_SCHEMAS = [
    ({"type": "array", "enum": ["a", "b"]}, UnsatisfiableSchemaError, ["enum", "array"]),
    ({"type": "integer", "minimum": 5, "maximum": 2}, UnsatisfiableSchemaError, ["minimum"]),
    ({"enum": []}, UnsatisfiableSchemaError, ["enum"]),
    ({"type": "object", "required": ["a"], "additionalProperties": False},
     UnsatisfiableSchemaError, ["'a'"]),
    ({"$ref": "https://example.com/s.json"}, UnsupportedSchemaError, ["$ref"]),
    ({"type": "strin"}, InvalidRequestError, ["invalid JSON schema"]),
    ({"type": "object", "properties": []}, InvalidRequestError, ["properties"]),
]  # fmt: skip


@pytest.mark.parametrize(("schema", "error", "words"), BAD_SCHEMAS)
def test_bad_schemas_get_clear_400s(
    compiler: GrammarCompiler, schema: dict[str, object], error: type[Exception], words: list[str]
) -> None:
    with pytest.raises(error) as info:
        compiler.compile(JsonSchema(schema))
    exc = info.value
    assert getattr(exc, "status", None) == 400
    assert getattr(exc, "param", None) == "response_format"
    for word in words:
        assert word in str(exc)


def test_bad_tool_parameters_name_the_tool(compiler: GrammarCompiler) -> None:
    bad = ToolSpec("f", {"type": "array", "enum": ["x"]})
    with pytest.raises(UnsatisfiableSchemaError) as info:
        compiler.compile(ToolCalls((WEATHER, bad)))
    assert info.value.param == "tools.1.function.parameters"


# ---- bounded work: endless and oversized schemas, forced text, compile deadline -----------------

ISSUE_SCHEMA = {
    "$defs": {"node": {"type": "object", "properties": {"child": {"$ref": "#/$defs/node"}},
                       "required": ["child"]}},
    "$ref": "#/$defs/node",
}  # fmt: skip


def test_issue_schema_is_refused_before_any_compile(compiler: GrammarCompiler) -> None:
    with pytest.raises(UnsatisfiableSchemaError) as info:
        compiler.compile(JsonSchema(ISSUE_SCHEMA))
    assert info.value.param == "response_format"
    assert info.value.message == (
        "the JSON schema cannot be satisfied: #: no finite value satisfies it: "
        "$ref '#/$defs/node' -> required property 'child' leads back to itself, "
        "so every value would nest without end"
    )
    assert compiler.stats().misses == 0  # nothing reached the compile pool


def test_endless_tool_parameters_name_the_tool(compiler: GrammarCompiler) -> None:
    with pytest.raises(UnsatisfiableSchemaError) as info:
        compiler.compile(ToolCalls((WEATHER, ToolSpec("loop", ISSUE_SCHEMA))), param="tools")
    assert info.value.param == "tools.1.function.parameters"


@pytest.mark.parametrize(
    ("schema", "accepted"),
    [
        ({"type": "object", "properties": {"child": {"$ref": "#"}}}, '{"child": {}}'),
        ({"type": "object", "properties": {"c": {"anyOf": [{"$ref": "#"}, {"type": "null"}]}},
          "required": ["c"]}, '{"c": {"c": null}}'),
        ({"type": "array", "items": {"$ref": "#"}}, "[[], [[]]]"),
    ],
)  # fmt: skip
def test_satisfiable_recursive_schemas_compile_and_work(
    compiler: GrammarCompiler, schema: dict[str, object], accepted: str
) -> None:
    compiled = compiler.compile(JsonSchema(schema))
    assert compiled is not None
    state = compiler.new_state(compiled)
    ids = [VOCAB.index(c) for c in accepted]
    assert state.validate_tokens(ids) == len(ids)


@pytest.mark.parametrize(
    ("constraint", "words"),
    [
        (JsonSchema({"type": "array", "items": {"const": "ab"}, "minItems": 100_000}),
         ["the JSON schema is too large to enforce: 'minItems' is 100000 at #"]),
        (JsonSchema({"type": "string", "minLength": 20_000}), ["'minLength' is 20000"]),
        (JsonSchema({"type": "string", "pattern": "^(a{1000}){1000}$"}),
         ["expands to 1000000 repeated characters"]),
        (Regex("(a{1000}){1000}"), ["the regex expands to 1000000 repeated characters"]),
    ],
)  # fmt: skip
def test_oversized_schemas_are_refused_naming_the_keyword(
    compiler: GrammarCompiler, constraint: JsonSchema | Regex, words: list[str]
) -> None:
    with pytest.raises(SchemaTooComplexError) as info:
        compiler.compile(constraint)
    assert info.value.param == "response_format"
    assert info.value.code == "schema_too_complex"
    for word in words:
        assert word in info.value.message


def test_deep_schema_is_refused_with_the_depth_limit() -> None:
    info = xgr.TokenizerInfo(VOCAB, vocab_type=xgr.VocabType.RAW, stop_token_ids=[0])
    compiler = GrammarCompiler(info, limits=GrammarLimits(max_schema_depth=8))
    schema: dict[str, object] = {"type": "integer"}
    for _ in range(10_000):
        schema = {"type": "array", "items": schema}
    with pytest.raises(SchemaTooComplexError, match="deeper than 8 levels") as error:
        compiler.compile(JsonSchema(schema))
    assert error.value.param == "response_format"


def test_forced_text_is_capped(compiler: GrammarCompiler) -> None:
    schema = {"type": "array", "items": {"const": "ab"}, "minItems": 1000}
    compiled = compiler.compile(JsonSchema(schema))
    assert compiled is not None
    assert compiled.jump_forward
    state = compiler.new_state(compiled)
    assert state.jump_forward(max_chars=12) == '["ab", "ab",'
    assert len(state.jump_forward()) == 1 + 1000 * 4 + 999 * 2


def test_recursive_schema_with_long_forced_parts_decodes_without_jump_forward(
    compiler: GrammarCompiler,
) -> None:
    tail = {"type": "object", "required": ["t"],
            "properties": {"c": {"$ref": "#"}, "t": {"const": "x" * 300}}}  # fmt: skip
    compiled = compiler.compile(JsonSchema(tail))
    assert compiled is not None
    assert not compiled.jump_forward  # its forced text could repeat once per nesting level
    assert compiler.new_state(compiled).jump_forward() == ""
    short = {"type": "object", "properties": {"c": {"$ref": "#"}, "t": {"const": "x"}},
             "required": ["t"]}  # fmt: skip
    compiled = compiler.compile(JsonSchema(short))
    assert compiled is not None
    assert compiled.jump_forward


def test_cache_counts_grammar_bytes(compiler: GrammarCompiler) -> None:
    compiled = compiler.compile(JsonSchema({"type": "integer"}))
    assert compiled is not None
    stats = compiler.stats()
    assert stats.bytes == compiled.memory_bytes
    assert stats.bytes > 0


def test_compile_timeout_names_the_deadline_and_setting() -> None:
    info = xgr.TokenizerInfo(VOCAB, vocab_type=xgr.VocabType.RAW, stop_token_ids=[0])
    compiler = GrammarCompiler(info, limits=GrammarLimits(compile_timeout_s=2.5))
    error = compiler._timeout_error("tools")
    assert (error.param, error.code) == ("tools", "schema_too_complex")
    assert error.message.startswith(
        "the grammar for tools did not compile within 2.5 s (limits.grammar_compile_timeout_s)"
    )


def test_huge_enum_compiles_in_time_or_gets_a_400_and_does_not_block_others() -> None:
    """50,000 enum values: the real compiler, on its own pool, next to a small compile."""
    info = xgr.TokenizerInfo(VOCAB, vocab_type=xgr.VocabType.RAW, stop_token_ids=[0])
    compiler = GrammarCompiler(info)
    enum = JsonSchema({"type": "string", "enum": [f"value-{i}" for i in range(50_000)]})
    outcome: list[object] = []

    def big() -> None:
        try:
            outcome.append(compiler.compile(enum))
        except SchemaTooComplexError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=big)
    thread.start()
    small_schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    small = compiler.compile(JsonSchema(small_schema))
    assert small is not None
    assert compiler.new_state(small).validate_tokens([VOCAB.index(c) for c in '{"a": 1}']) == 8
    thread.join(60)
    compiler.close()
    (result,) = outcome
    if isinstance(result, SchemaTooComplexError):
        assert result.param == "response_format"
        assert "did not compile within 10 s" in result.message
    else:
        assert isinstance(result, CompiledConstraint)
        state = compiler.new_state(result)
        ids = [VOCAB.index(c) for c in '"value-49999"']
        assert state.validate_tokens(ids) == len(ids)


async def test_compile_async_shares_the_cache(compiler: GrammarCompiler) -> None:
    schema = JsonSchema({"type": "object", "properties": {"a": {"type": "integer"}}})
    first = await compiler.compile_async(schema)
    assert first is not None
    assert compiler.compile(schema) is first
    assert await compiler.compile_async(NoConstraint()) is None
    with pytest.raises(UnsatisfiableSchemaError):
        await compiler.compile_async(JsonSchema(ISSUE_SCHEMA))
    assert (compiler.hits, compiler.misses) == (1, 1)
