"""Schema rewrites for grammars: same valid instances among those a grammar generates (objects
without undeclared keys), checked against ``jsonschema`` over every key set."""

from __future__ import annotations

import copy
import itertools
from typing import Any

import pytest

from schemas.jsonschema_utils import validation_errors
from schemas.schema_rewrite import MAX_DEPENDENT_KEYS, close_objects, enforceable

KEYS = ("a", "b", "c", "d")


def objects(keys: tuple[str, ...] = KEYS) -> list[dict[str, int]]:
    """Every object over ``keys`` (values 1): what a closed grammar can generate."""
    return [{k: 1 for k in chosen} for r in range(len(keys) + 1)
            for chosen in itertools.combinations(keys, r)]  # fmt: skip


def same_instances(original: Any, rewritten: Any) -> None:
    """Over every key set, ``original`` and ``rewritten``, both as a grammar generates them
    (objects closed: undeclared keys never appear), accept the same instances."""
    as_generated, reference = close_objects(rewritten), close_objects(original)
    for instance in objects():
        expected = not validation_errors(instance, reference)
        assert (not validation_errors(instance, as_generated)) is expected, instance


def declared(**extra: Any) -> dict[str, Any]:
    return {"type": "object", "properties": {k: {"type": "integer"} for k in KEYS}, **extra}


@pytest.mark.parametrize(
    "deps",
    [
        {"a": ["b"]},
        {"a": ["b", "c"], "c": ["d"]},
        {"a": ["b"], "b": ["a"]},
        {"a": ["b"], "c": ["d"], "d": ["a"]},
    ],
)
def test_dependent_required_becomes_an_any_of_with_the_same_instances(deps: Any) -> None:
    schema = declared(dependentRequired=deps, additionalProperties=False)
    rewritten = enforceable(schema)
    assert "dependentRequired" not in str(rewritten)
    assert "anyOf" in rewritten
    same_instances(schema, rewritten)


def test_dependent_required_respects_required_keys() -> None:
    schema = declared(required=["a"], dependentRequired={"a": ["c"], "b": ["d"]})
    rewritten = enforceable(schema)
    same_instances(schema, rewritten)
    assert all("a" in branch["required"] for branch in rewritten["anyOf"])


def test_too_many_dependent_keys_or_an_open_object_stay_checked_after_generation() -> None:
    triggers = ("b", "c", "d", "e")[: MAX_DEPENDENT_KEYS + 1]
    many = declared(dependentRequired={k: ["a"] for k in triggers})
    assert enforceable(many) == many
    open_object = declared(dependentRequired={"a": ["b"]}, additionalProperties=True)
    assert enforceable(open_object) == open_object


@pytest.mark.parametrize("forbidden", [False, {"not": {}}])
def test_a_forbidden_property_is_dropped_from_a_closed_object(forbidden: Any) -> None:
    schema = {"type": "object", "properties": {"a": forbidden, "b": {"type": "integer"}}}
    rewritten = enforceable(schema)
    assert rewritten["properties"] == {"b": {"type": "integer"}}
    same_instances(schema, rewritten)


def test_a_forbidden_required_property_is_left_for_the_unsatisfiable_check() -> None:
    schema = {"type": "object", "properties": {"a": False}, "required": ["a"]}
    assert enforceable(schema) == schema


def test_rewrites_reach_nested_objects_and_never_modify_the_input() -> None:
    inner = declared(dependentRequired={"a": ["b"]})
    schema = {"type": "array", "items": inner, "$defs": {"x": {"properties": {"z": False}}}}
    before = copy.deepcopy(schema)
    rewritten = enforceable(schema)
    assert schema == before
    assert "anyOf" in rewritten["items"]
    assert rewritten["$defs"]["x"]["properties"] == {}


def test_close_objects_closes_what_declares_properties() -> None:
    schema = {
        "type": "object",
        "properties": {
            "a": {"type": "object", "properties": {"x": {}}},
            "free": {"type": "object"},
        },
        "$defs": {"d": {"properties": {"y": {}}, "patternProperties": {"^z": {}}}},
        "anyOf": [{"properties": {"q": {}}}],
    }
    closed = close_objects(schema)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["a"]["additionalProperties"] is False
    assert "additionalProperties" not in closed["properties"]["free"]  # declares nothing
    assert "additionalProperties" not in closed["$defs"]["d"]  # says something itself
    assert closed["anyOf"][0]["additionalProperties"] is False
    assert "additionalProperties" not in schema  # the input is untouched


def test_close_objects_leaves_all_of_and_min_properties_alone() -> None:
    with_all_of = {"allOf": [{"properties": {"a": {}}}, {"properties": {"b": {}}}]}
    assert close_objects(with_all_of) == with_all_of
    needs_more = {"properties": {"a": {}}, "minProperties": 2}
    assert close_objects(needs_more) == needs_more


@pytest.mark.parametrize(
    ("one_of", "enum"),
    [
        ([{"const": "a"}, {"enum": ["a", "b"]}, {"enum": ["c"], "title": "C"}], ["b", "c"]),
        ([{"const": 1}, {"const": 1.0}, {"const": True}], [True]),  # 1 == 1.0, true is not 1
        ([{"enum": [{"k": 1}, [1]]}, {"const": {"k": 1}}], [[1]]),
    ],
)
def test_one_of_constants_becomes_the_exclusive_values(one_of: list[Any], enum: list[Any]) -> None:
    schema = {"oneOf": one_of}
    rewritten = enforceable(schema)
    assert rewritten == {"enum": enum}
    candidates = [v for b in one_of for v in ([b["const"]] if "const" in b else b["enum"])]
    for value in [*candidates, "zzz", 2]:
        assert (not validation_errors(value, schema)) is (not validation_errors(value, rewritten))


def test_one_of_with_other_branches_or_no_exclusive_value_is_left_alone() -> None:
    mixed = {"oneOf": [{"const": "a"}, {"type": "string"}]}
    assert enforceable(mixed) == mixed
    overlapping = {"oneOf": [{"const": "a"}, {"enum": ["a"]}]}
    assert enforceable(overlapping) == overlapping


def test_close_objects_leaves_objects_requiring_undeclared_keys_open() -> None:
    schema = {"type": "object", "properties": {"a": {}}, "required": ["b"]}
    assert close_objects(schema) == schema
