"""Schema rewrites that let a grammar enforce more, with the same valid instances *as the
grammar generates them* (objects never carry undeclared properties there).

* ``close_objects``: an object that declares properties gets ``additionalProperties: false``,
  as xgrammar's strict mode does, so small models cannot invent keys until max_tokens.
* ``enforceable``: a property whose schema is ``false`` or ``{"not": {}}`` is simply never
  generated, ``dependentRequired`` on a few keys becomes an ``anyOf`` of the allowed key sets,
  and a ``oneOf`` of constants becomes the ``enum`` of values in exactly one branch; grammars
  ignore these otherwise (``oneOf`` is read as ``anyOf``), and the output would fail validation.

Pure functions over JSON values (inputs are never modified); the original schema is still the
one outputs are validated against.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from typing import Any

from schemas.jsonschema_utils import schema_keywords

# dependentRequired on more trigger keys than this stays a post-generation check: the anyOf
# grows as 2**keys.
MAX_DEPENDENT_KEYS = 3

_SCHEMA_MAPS = ("properties", "$defs", "definitions")
_SCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems")
_SCHEMA_VALUES = ("items", "additionalProperties")


def _walk(schema: Any, visit: Callable[[dict[str, Any]], dict[str, Any]]) -> Any:
    """A copy of ``schema`` with ``visit`` applied to every object subschema reached through
    properties, items, definitions and anyOf/oneOf (bottom-up). Conditional and negated
    subschemas (``not``, ``if``/``then``/``else``, ``allOf``) are left as they are: closing
    or pruning them would change what they mean."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {k: _walk(v, visit) for k, v in out[key].items()}
    for key in _SCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [_walk(v, visit) for v in out[key]]
    for key in _SCHEMA_VALUES:
        if isinstance(out.get(key), dict):
            out[key] = _walk(out[key], visit)
    return visit(out)


def _open_by_choice(node: dict[str, Any]) -> bool:
    """Whether ``node`` says something about undeclared properties itself."""
    return any(
        k in node for k in ("additionalProperties", "unevaluatedProperties", "patternProperties")
    )


def schema_object(schema: Any) -> Any:
    """A boolean schema as the object schema with the same instances (``true`` → ``{}``,
    ``false`` → ``{"not": {}}``), for compilers that take objects only; others unchanged."""
    if isinstance(schema, bool):
        return {} if schema else {"not": {}}
    return schema


def close_objects(schema: Any) -> Any:
    """``schema`` with every object that declares properties, and says nothing about others,
    closed (unless ``minProperties`` or ``required`` needs keys it does not declare). A schema
    using ``allOf`` is returned unchanged: its branches' properties add up."""
    if "allOf" in schema_keywords(schema):
        return schema

    def close(node: dict[str, Any]) -> dict[str, Any]:
        props = node.get("properties")
        if not isinstance(props, dict) or not props or _open_by_choice(node):
            return node
        min_props = node.get("minProperties")
        if isinstance(min_props, int) and min_props > len(props):
            return node
        required = node.get("required")
        if isinstance(required, list) and set(required) - set(props):
            return node  # it requires a key it does not declare: closing would forbid it
        return {**node, "additionalProperties": False}

    return _walk(copy.deepcopy(schema), close)


def _forbidden(sub: Any) -> bool:
    return sub is False or sub == {"not": {}}


def _closed(node: dict[str, Any]) -> bool:
    """Grammars never generate undeclared properties of ``node``."""
    extra = node.get("additionalProperties", False)
    return extra is False and "patternProperties" not in node


def _drop_forbidden(node: dict[str, Any]) -> dict[str, Any]:
    props = node.get("properties")
    if not isinstance(props, dict) or not _closed(node):
        return node
    forbidden = {k for k, v in props.items() if _forbidden(v)}
    if not forbidden or forbidden & set(node.get("required", ())):
        return node  # a required forbidden property: the checks report it unsatisfiable
    return {**node, "properties": {k: v for k, v in props.items() if k not in forbidden}}


def _expand_dependent_required(node: dict[str, Any]) -> dict[str, Any]:
    deps = node.get("dependentRequired")
    props = node.get("properties")
    if not (isinstance(deps, dict) and isinstance(props, dict) and deps and _closed(node)):
        return node
    if len(deps) > MAX_DEPENDENT_KEYS or "anyOf" in node or "oneOf" in node:
        return node
    required = set(node.get("required", ()))
    base = {k: v for k, v in node.items() if k not in ("dependentRequired", "required")}
    branches: list[dict[str, Any]] = []
    for present in itertools.product((False, True), repeat=len(deps)):
        need, keys = set(required), dict(props)
        for (trigger, needed), on in zip(deps.items(), present, strict=True):
            if on:
                need |= {trigger, *needed}
            else:
                keys.pop(trigger, None)
        if not need <= set(keys) or any(not on and t in need for t, on in zip(deps, present,
                                                                              strict=True)):
            continue  # a key this branch forbids is required, or a needed key is undeclared
        branch: dict[str, Any] = {"properties": keys, "additionalProperties": False}
        if need:
            branch["required"] = sorted(need)
        branches.append(branch)
    if not branches:
        return node
    head = {k: v for k, v in base.items() if k not in ("properties", "additionalProperties")}
    return {**head, "anyOf": branches}


_ANNOTATIONS = frozenset({"title", "description", "$comment", "examples", "default"})


def _choices(branch: Any) -> list[Any] | None:
    """The values a ``{"const": v}`` or ``{"enum": [...]}`` branch allows (annotations aside),
    or None for any other branch."""
    if not isinstance(branch, dict) or set(branch) - _ANNOTATIONS - {"const", "enum"}:
        return None
    if len(set(branch) & {"const", "enum"}) != 1:
        return None
    values = [branch["const"]] if "const" in branch else branch["enum"]
    return values if isinstance(values, list) else None


def _exclusive_one_of(node: dict[str, Any]) -> dict[str, Any]:
    """``oneOf`` over constant branches allows the values in exactly one branch: an ``enum``
    the grammar enforces (grammars treat ``oneOf`` as ``anyOf``)."""
    branches = node.get("oneOf")
    if not isinstance(branches, list) or not branches or "enum" in node or "const" in node:
        return node
    per_branch = [_choices(b) for b in branches]
    if any(values is None for values in per_branch):
        return node
    seen: list[tuple[Any, int]] = []  # (value, branches holding it); values may be unhashable
    for values in per_branch:
        assert values is not None
        for value in _unique(values):
            for i, (known, n) in enumerate(seen):
                if _same(known, value):
                    seen[i] = (known, n + 1)
                    break
            else:
                seen.append((value, 1))
    exclusive = [value for value, n in seen if n == 1]
    if not exclusive:
        return node  # nothing is valid: the unsatisfiable check reports it
    return {**{k: v for k, v in node.items() if k != "oneOf"}, "enum": exclusive}


def _same(a: Any, b: Any) -> bool:
    """JSON equality (``1`` and ``true`` differ, ``1`` and ``1.0`` do not)."""
    return (type(a) is type(b) and a == b) or (
        isinstance(a, int | float) and isinstance(b, int | float)
        and not isinstance(a, bool) and not isinstance(b, bool) and a == b
    )


def _unique(values: list[Any]) -> list[Any]:
    out: list[Any] = []
    for value in values:
        if not any(_same(value, kept) for kept in out):
            out.append(value)
    return out


def enforceable(schema: Any) -> Any:
    """``schema`` rewritten so a grammar enforces forbidden properties, small
    ``dependentRequired`` maps and ``oneOf`` over constants (see the module docstring); other
    schemas come back equal."""

    def rewrite(node: dict[str, Any]) -> dict[str, Any]:
        return _exclusive_one_of(_expand_dependent_required(_drop_forbidden(node)))

    return _walk(copy.deepcopy(schema), rewrite)
