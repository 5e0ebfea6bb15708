"""Schema canonicalisation, cache keys, satisfiability and validation."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.errors import InvalidRequestError, SchemaTooComplexError, UnsupportedSchemaError
from schemas.jsonschema_utils import (
    canonical_schema,
    check_depth,
    check_schema,
    iter_subschemas,
    json_depth,
    keywords_checked_after,
    schema_key,
    unsatisfiable_reason,
    validation_errors,
)
from schemas.schema_bounds import pattern_repeat, size_limit_reason
from schemas.schema_shape import SchemaShape, schema_shape


def test_canonical_drops_annotations_but_not_property_names() -> None:
    schema = {
        "title": "Doc",
        "description": "d",
        "type": "object",
        "properties": {"title": {"type": "string", "description": "x"}, "default": {}},
        "anyOf": [{"examples": [1], "type": "object"}],
    }
    assert canonical_schema(schema) == {
        "type": "object",
        "properties": {"title": {"type": "string"}, "default": {}},
        "anyOf": [{"type": "object"}],
    }


def test_key_keeps_property_order() -> None:
    """The grammar emits properties in declared order, so order is part of the key."""
    ab: dict[str, Any] = {"properties": {"a": {}, "b": {}}}
    ba: dict[str, Any] = {"properties": {"b": {}, "a": {}}}
    assert schema_key("json_schema", ab) != schema_key("json_schema", ba)
    assert schema_key("json_schema", ab) == schema_key("json_schema", {**ab, "title": "t"})
    assert schema_key("json_schema", ab, strict=True) != schema_key("json_schema", ab)


@pytest.mark.parametrize(
    ("schema", "reason_part"),
    [
        ({"type": "array", "enum": ["a"]}, "enum"),
        ({"properties": {"x": {"type": "string", "const": 1}}}, "#/properties/x"),
        ({"type": "string", "minLength": 3, "maxLength": 2}, "minLength"),
        ({"type": "number", "exclusiveMinimum": 1, "maximum": 1}, "exclusiveMinimum"),
        ({"items": {"enum": []}}, "#/items"),
        ({"allOf": [{"properties": {"a": {"type": "array", "enum": [1]}}}]},
         "#/allOf/0/properties/a"),
        ({"type": "object", "required": ["a"], "additionalProperties": False}, "'a'"),
    ],
)
def test_unsatisfiable(schema: dict[str, Any], reason_part: str) -> None:
    reason = unsatisfiable_reason(schema)
    assert reason is not None
    assert reason_part in reason


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "number", "enum": [1, 2.5]},
        {"type": ["string", "null"], "enum": [None]},
        {"type": "integer", "minimum": 1, "maximum": 1},
        {"type": "object", "required": ["a"], "properties": {"a": {}},
         "additionalProperties": False},
        # a dead alternative leaves the other one
        {"oneOf": [{"type": "string"}, {"type": "array", "enum": ["a"]}]},
        {"not": {"enum": []}},
        {"$defs": {"unused": {"type": "integer", "minimum": 3, "maximum": 1}}},
    ],
)
def test_satisfiable(schema: dict[str, Any]) -> None:
    assert unsatisfiable_reason(schema) is None


def test_check_schema_errors() -> None:
    with pytest.raises(InvalidRequestError, match="invalid JSON schema") as info:
        check_schema({"type": 5}, "response_format")
    assert info.value.param == "response_format"
    with pytest.raises(UnsupportedSchemaError, match=r"\$ref"):
        check_schema({"items": {"$ref": "other.json#/x"}}, "tools")
    check_schema({"$defs": {"a": {"type": "string"}}, "$ref": "#/$defs/a"}, "p")


def test_keywords_checked_after() -> None:
    schema = {"type": "array", "uniqueItems": True, "items": {"not": {"type": "null"}}}
    assert keywords_checked_after(schema) == ["not", "uniqueItems"]


def test_validation_uses_schema_draft_and_formats() -> None:
    draft7 = {"$schema": "http://json-schema.org/draft-07/schema#", "type": "string",
              "format": "date"}  # fmt: skip
    assert validation_errors("2024-02-30", draft7)
    assert validation_errors("2024-02-29", draft7) == []


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner,
                                                                  max_size=3),
    max_leaves=8,
)  # fmt: skip


@given(json_values)
def test_const_of_any_value_is_satisfiable_and_validates(value: Any) -> None:
    schema = {"const": value}
    assert unsatisfiable_reason(schema) is None
    assert validation_errors(value, schema) == []


# ---- endless schemas: refused up front; satisfiable recursion still passes ----------------------

NODE = {"type": "object", "properties": {"child": {"$ref": "#/$defs/node"}}, "required": ["child"]}
ISSUE_SCHEMA = {"$defs": {"node": NODE}, "$ref": "#/$defs/node"}

# (name, schema, where the endless subschema is, the words that explain it)
ENDLESS = [
    ("issue: required self-reference", ISSUE_SCHEMA, "#", ["required property 'child'"]),
    ("array minItems recursion", {"type": "array", "items": {"$ref": "#"}, "minItems": 1},
     "#", ["minItems 1", "$ref '#'"]),
    ("allOf recursion", {"allOf": [{"$ref": "#"}]}, "#", ["allOf/0"]),
    ("mutual recursion A -> B -> A",
     {"$defs": {"a": {"type": "object", "properties": {"b": {"$ref": "#/$defs/b"}},
                      "required": ["b"]},
                "b": {"type": "object", "properties": {"a": {"$ref": "#/$defs/a"}},
                      "required": ["a"]}},
      "$ref": "#/$defs/a"},
     "#", ["required property 'b'", "required property 'a'"]),
    ("root # recursion", {"type": "object", "properties": {"c": {"$ref": "#"}}, "required": ["c"]},
     "#", ["required property 'c'"]),
    ("no type, object keywords (xgrammar reads an object)",
     {"properties": {"c": {"$ref": "#"}}, "required": ["c"]}, "#", ["required property 'c'"]),
    ("prefixItems under minItems", {"type": "array", "prefixItems": [{"$ref": "#"}], "minItems": 1},
     "#", ["prefixItems/0"]),
    ("definitions (draft 7)",
     {"definitions": {"n": {"type": "array", "items": {"$ref": "#/definitions/n"},
                            "minItems": 2}},
      "$ref": "#/definitions/n"},
     "#", ["minItems 2"]),
    ("pure self-reference", {"$ref": "#"}, "#", ["$ref '#'"]),
    ("reference loop through definitions",
     {"$defs": {"x": {"$ref": "#/$defs/x"}}, "$ref": "#/$defs/x"}, "#", ["$ref '#/$defs/x'"]),
    ("minProperties only a recursive property can fill",
     {"type": "object", "additionalProperties": {"$ref": "#"}, "minProperties": 1},
     "#", ["minProperties 1"]),
    ("endless branch a value can enter",
     {"anyOf": [{"$ref": "#/$defs/node"}, {"type": "null"}], "$defs": {"node": NODE}},
     "#/anyOf/0", ["required property 'child'"]),
    ("endless optional property",
     {"type": "object", "properties": {"x": {"$ref": "#/$defs/node"}}, "$defs": {"node": NODE}},
     "#/properties/x", ["required property 'child'"]),
    ("every branch endless",
     {"$defs": {"n": {"type": "object", "properties": {"c": {"anyOf": [{"$ref": "#/$defs/n"},
                                                                   {"$ref": "#/$defs/n"}]}},
                      "required": ["c"]}},
      "$ref": "#/$defs/n"},
     "#", ["required property 'c'"]),
]  # fmt: skip


@pytest.mark.parametrize(("name", "schema", "where", "words"), ENDLESS, ids=[e[0] for e in ENDLESS])
def test_endless_schemas_are_unsatisfiable(
    name: str, schema: dict[str, Any], where: str, words: list[str]
) -> None:
    reason = unsatisfiable_reason(schema)
    assert reason is not None, name
    assert reason.startswith(f"{where}: no finite value satisfies it: "), reason
    assert reason.endswith("leads back to itself, so every value would nest without end")
    for word in words:
        assert word in reason


SATISFIABLE_RECURSIVE = [
    ("optional child", {"type": "object", "properties": {"child": {"$ref": "#"}}}, 2),
    ("anyOf with a null branch",
     {"type": "object", "properties": {"child": {"anyOf": [{"$ref": "#"}, {"type": "null"}]}},
      "required": ["child"]}, len('{"child":null}')),
    ("array without minItems", {"type": "array", "items": {"$ref": "#"}}, 2),
    ("tree", {"type": "object", "required": ["name", "children"],
              "properties": {"name": {"type": "string"},
                             "children": {"type": "array", "items": {"$ref": "#"}}}},
     len('{"name":"","children":[]}')),
    ("mutual recursion with an exit",
     {"$defs": {"a": {"type": "object", "properties": {"b": {"$ref": "#/$defs/b"}},
                      "required": ["b"]},
                "b": {"anyOf": [{"$ref": "#/$defs/a"}, {"type": "integer"}]}},
      "$ref": "#/$defs/a"}, len('{"b":0}')),
    ("a dead 'false' branch is not endless",
     {"type": "object", "properties": {"x": False}}, 2),
]  # fmt: skip


@pytest.mark.parametrize(("name", "schema", "chars"), SATISFIABLE_RECURSIVE,
                         ids=[s[0] for s in SATISFIABLE_RECURSIVE])  # fmt: skip
def test_satisfiable_recursive_schemas_pass(name: str, schema: dict[str, Any], chars: int) -> None:
    assert unsatisfiable_reason(schema) is None
    shape = schema_shape(schema)
    assert (shape.endless, shape.min_chars) == (None, chars)


def test_shape_sizes_and_recursion() -> None:
    three_ints = {"type": "array", "minItems": 3, "items": {"type": "integer"}}
    flat = {"type": "object", "required": ["a", "b"],
            "properties": {"a": {"const": "xyz"}, "b": three_ints}}  # fmt: skip
    shape = schema_shape(flat)
    assert shape == SchemaShape(None, len('{"a":"xyz","b":[0,0,0]}'), 23, "#", 0)
    long_tail = {"type": "object", "required": ["t"],
                 "properties": {"c": {"$ref": "#"}, "t": {"const": "x" * 500}}}  # fmt: skip
    assert schema_shape(long_tail).recursive_min_chars == len('{"t":""}') + 500


# ---- size bounds --------------------------------------------------------------------------------

BOUNDS: dict[str, Any] = {
    "max_repeat": 100_000, "max_min_repeat": 1_000, "max_forced_chars": 1_000_000
}  # fmt: skip


@pytest.mark.parametrize(
    ("schema", "words"),
    [
        ({"type": "array", "items": {"const": "ab"}, "minItems": 100_000},
         ["'minItems' is 100000 at #", "at most 1000 for minItems, minLength, minProperties"]),
        ({"type": "string", "minLength": 1001}, ["'minLength' is 1001"]),
        ({"type": "object", "minProperties": 5000}, ["'minProperties' is 5000"]),
        ({"type": "string", "maxLength": 10**6}, ["'maxLength' is 1000000",
                                                   "at most 100000 for maxItems"]),
        ({"properties": {"a": {"type": "array", "maxItems": 10**9}}},
         ["'maxItems' is 1000000000 at #/properties/a"]),
        ({"type": "string", "pattern": "^(a{1000}){1000}$"},
         ["'pattern' '^(a{1000}){1000}$' at # expands to 1000000 repeated characters"]),
        ({"type": "object", "patternProperties": {"^x{200000}$": {}}}, ["'patternProperties'"]),
        ({"type": "array", "minItems": 1000,
          "items": {"type": "array", "minItems": 1000, "items": {"type": "integer"}}},
         ["the shortest value # allows is", "force at most 1000000 in one piece"]),
    ],
)  # fmt: skip
def test_size_limits(schema: dict[str, Any], words: list[str]) -> None:
    reason = size_limit_reason(schema, **BOUNDS)
    assert reason is not None
    for word in words:
        assert word in reason


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "string", "minLength": 1000, "maxLength": 100_000},
        {"type": "array", "minItems": 1000, "maxItems": 100_000},
        {"type": "string", "pattern": r"^[A-Z]{3}-\d{4}$"},
        {"type": "string", "pattern": "^[a-z]{1,65535}$"},
        {"type": "string", "const": "x" * 10_000},
    ],
)
def test_size_limits_leave_real_schemas_alone(schema: dict[str, Any]) -> None:
    assert size_limit_reason(schema, **BOUNDS) is None


@pytest.mark.parametrize(
    ("pattern", "repeat"),
    [
        ("abc", 3),
        ("^a{5}$", 5),
        ("(ab|cde){2}", 6),
        ("(?:ab){3,}", 6),
        ("(?P<x>ab){2}[0-9]{1,4}", 8),
        (r"\d{3}\{7\}", 6),  # escaped braces are literal characters
        ("[{}]{2}", 2),
        ("a{1,}", 1),
        ("((a{10}){10}){10}", 1000),
        ("a{99999999999999999999}", 10**15),  # saturated
        ("(unbalanced", 10),
    ],
)
def test_pattern_repeat(pattern: str, repeat: int) -> None:
    assert pattern_repeat(pattern) == repeat


# ---- nothing recurses on the schema's depth -----------------------------------------------------


def nested(levels: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "integer"}
    for _ in range(levels):
        schema = {"type": "array", "items": schema}
    return schema


def test_deep_schemas_are_a_clean_400_everywhere() -> None:
    deep = nested(10_000)
    with pytest.raises(SchemaTooComplexError) as info:
        check_schema(deep, "response_format")
    assert info.value.param == "response_format"
    assert info.value.message == (
        "the JSON schema is nested deeper than 64 levels (limit 64, limits.max_json_depth)"
    )
    with pytest.raises(SchemaTooComplexError, match="deeper than 10 levels"):
        check_depth(nested(10), "p", max_depth=10)  # 11 objects, one inside the other
    check_depth(nested(9), "p", max_depth=10)
    # The walks are iterative: they finish on any depth.
    assert json_depth(deep) == 10_001
    assert len(schema_key("json_schema", deep)) == 64
    assert json_depth(canonical_schema(deep)) == 10_001
    assert sum(1 for _ in iter_subschemas(deep)) == 10_001
    assert unsatisfiable_reason(deep) is None
    assert keywords_checked_after(deep) == []
    assert size_limit_reason(deep, **BOUNDS) is None
    assert validation_errors([], deep) == [
        "(root): the schema is nested deeper than 64 levels"
    ]
    deep_value: Any = 1
    for _ in range(10_000):
        deep_value = [deep_value]
    too_deep = "(root): the value is nested deeper than 64 levels"
    assert validation_errors(deep_value, {}) == [too_deep]


def test_schema_key_is_unchanged_by_the_iterative_dump() -> None:
    schema = {"type": "object", "properties": {"é": {"enum": [1, 2.5, None, True, "x"]}}}
    payload = json.dumps(["json_schema", schema, []], separators=(",", ":"), ensure_ascii=False)
    assert schema_key("json_schema", schema) == hashlib.sha256(payload.encode()).hexdigest()


def test_validation_of_a_self_referring_schema_is_an_error_not_a_crash() -> None:
    assert validation_errors({}, {"allOf": [{"$ref": "#"}]}) == [
        "(root): the schema refers to itself without end; the value cannot be checked"
    ]
