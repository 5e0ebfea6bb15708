"""Schema canonicalisation, cache keys, satisfiability and validation."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.errors import InvalidRequestError, UnsupportedSchemaError
from schemas.jsonschema_utils import (
    canonical_schema,
    check_schema,
    keywords_checked_after,
    schema_key,
    unsatisfiable_reason,
    validation_errors,
)


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
    ab = {"properties": {"a": {}, "b": {}}}
    ba = {"properties": {"b": {}, "a": {}}}
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
