"""JSON-schema utilities shared by every layer: canonical form and cache key, meta-schema check,
keywords the grammar cannot enforce, satisfiability, size bounds, and validation of generated
instances.

Pure functions over plain dicts; no grammar engine and no model here. Nothing here recurses on
the schema's nesting (walks use explicit stacks; the meta-schema check and validation run only
below ``DEFAULT_MAX_DEPTH`` levels), so a 10,000-level schema is a 400, never a RecursionError.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import jsonschema
from jsonschema.exceptions import SchemaError
from jsonschema.validators import validator_for

from schemas.errors import InvalidRequestError, SchemaTooComplexError, UnsupportedSchemaError
from schemas.json_limits import compact_json
from schemas.schema_shape import schema_shape

# Deepest JSON nesting (objects and arrays) accepted in a schema or validated in an instance;
# the gateway's ``limits.max_json_depth`` has the same default.
DEFAULT_MAX_DEPTH = 64

# Keywords whose value is a single subschema / a map of name → subschema / a list of subschemas.
_SUBSCHEMA = (
    "items", "additionalProperties", "not", "if", "then", "else", "contains", "propertyNames",
    "unevaluatedItems", "unevaluatedProperties", "additionalItems", "contentSchema",
)  # fmt: skip
_SUBSCHEMA_MAP = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SUBSCHEMA_LIST = ("anyOf", "oneOf", "allOf", "prefixItems")

# Annotations: they never change which instances are valid, so they are dropped from the cache key.
_ANNOTATIONS = frozenset(
    {"title", "description", "examples", "$comment", "default", "deprecated", "readOnly",
     "writeOnly", "$id", "$anchor"}
)  # fmt: skip

# Keywords the grammar engine does not enforce while decoding (checked here on 2026-11-25 with
# xgrammar 0.2.8: it accepts instances that break them). Output under such a schema is still
# shaped by the rest of the schema and is validated after generation; it is never reported valid
# unless that check passes.
VALIDATED_AFTER_GENERATION = frozenset(
    {"uniqueItems", "contains", "minContains", "maxContains", "not", "if", "then", "else",
     "dependentRequired", "dependentSchemas", "dependencies", "oneOf"}
)  # fmt: skip


# ---- bounded walks ------------------------------------------------------------------------------


def json_depth(value: Any, stop_above: int | None = None) -> int:
    """Nesting depth of objects and arrays in ``value`` (a scalar is 0, ``{}`` is 1), found
    without recursion; with ``stop_above`` the walk ends as soon as the depth exceeds it."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list | tuple):
            children = item
        else:
            continue
        depth += 1
        if depth > deepest:
            deepest = depth
            if stop_above is not None and deepest > stop_above:
                return deepest
        stack.extend((child, depth) for child in children if isinstance(child, dict | list))
    return deepest


def check_depth(value: Any, param: str | None, max_depth: int = DEFAULT_MAX_DEPTH) -> None:
    """A 400 when ``value`` nests deeper than ``max_depth``: deeper schemas would exhaust the
    recursion of the meta-schema check, the validator and the grammar compiler."""
    if json_depth(value, stop_above=max_depth) > max_depth:
        raise SchemaTooComplexError(
            f"the JSON schema is nested deeper than {max_depth} levels "
            f"(limit {max_depth}, limits.max_json_depth)",
            param=param,
        )


def _children(schema: dict[str, Any], path: str) -> list[tuple[str, Any]]:
    """``(pointer, subschema)`` for the subschemas directly inside ``schema``, in key order."""
    out: list[tuple[str, Any]] = []
    for key in _SUBSCHEMA:
        if key in schema:
            value = schema[key]
            if isinstance(value, list):  # draft-4 tuple form of "items"
                out.extend((f"{path}/{key}/{i}", item) for i, item in enumerate(value))
            else:
                out.append((f"{path}/{key}", value))
    for key in _SUBSCHEMA_MAP:
        value = schema.get(key)
        if isinstance(value, dict):
            out.extend((f"{path}/{key}/{name}", sub) for name, sub in value.items())
    for key in _SUBSCHEMA_LIST:
        value = schema.get(key)
        if isinstance(value, list):
            out.extend((f"{path}/{key}/{i}", sub) for i, sub in enumerate(value))
    return out


def iter_subschemas(schema: Any, path: str = "#") -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``(json-pointer, subschema)`` for ``schema`` and every schema nested in it
    (pre-order, without recursion)."""
    stack: list[tuple[str, Any]] = [(path, schema)]
    while stack:
        pointer, sub = stack.pop()
        if not isinstance(sub, dict):
            continue
        yield pointer, sub
        stack.extend(reversed(_children(sub, pointer)))


def canonical_schema(schema: Any) -> Any:
    """``schema`` without annotation keywords, keeping key order (the grammar follows it).
    Built with an explicit stack, so any depth is fine.

    >>> canonical_schema({"title": "T", "properties": {"title": {"type": "string"}}})
    {'properties': {'title': {'type': 'string'}}}
    """
    if not isinstance(schema, dict):
        return schema
    root: dict[str, Any] = {}
    stack: list[tuple[dict[str, Any], dict[str, Any]]] = [(schema, root)]

    def slot(sub: Any) -> Any:
        if not isinstance(sub, dict):
            return sub
        out: dict[str, Any] = {}
        stack.append((sub, out))
        return out

    while stack:
        source, target = stack.pop()
        for key, value in source.items():
            if key in _ANNOTATIONS:
                continue
            if key in _SUBSCHEMA_MAP and isinstance(value, dict):
                target[key] = {name: slot(sub) for name, sub in value.items()}
            elif key in _SUBSCHEMA_LIST and isinstance(value, list):
                target[key] = [slot(sub) for sub in value]
            elif key in _SUBSCHEMA:
                target[key] = [slot(v) for v in value] if isinstance(value, list) else slot(value)
            else:
                target[key] = value
    return root


def schema_key(kind: str, schema: Any, **options: Any) -> str:
    """Stable cache key for compiling ``schema`` as ``kind`` with ``options`` (any depth)."""
    payload = compact_json([kind, canonical_schema(schema), sorted(options.items())])
    return hashlib.sha256(payload.encode()).hexdigest()


def check_schema(schema: Any, param: str, max_depth: int = DEFAULT_MAX_DEPTH) -> None:
    """Raise a 400 unless ``schema`` is a valid JSON schema we can resolve locally, nested at
    most ``max_depth`` levels (checked first: the meta-schema check recurses)."""
    if not isinstance(schema, dict | bool):
        raise InvalidRequestError("a JSON schema must be an object or a boolean", param=param)
    if isinstance(schema, bool):
        return
    check_depth(schema, param, max_depth)
    cls = validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(root)"
        raise InvalidRequestError(
            f"invalid JSON schema at {where}: {exc.message}", param=param
        ) from None
    for pointer, sub in iter_subschemas(schema):
        ref = sub.get("$ref")
        if isinstance(ref, str) and not ref.startswith("#"):
            raise UnsupportedSchemaError(
                f"unsupported JSON schema keyword '$ref' at {pointer}: only local references "
                f"('#/...') are supported, got {ref!r}",
                param=param,
            )


def schema_keywords(schema: Any) -> set[str]:
    """Every keyword used by ``schema`` or a schema nested in it (not property names)."""
    return {key for _, sub in iter_subschemas(schema) for key in sub}


def keywords_checked_after(schema: Any) -> list[str]:
    """The keywords in ``schema`` that decoding cannot enforce (sorted, unique)."""
    return sorted(schema_keywords(schema) & VALIDATED_AFTER_GENERATION)


def validation_errors(
    instance: Any, schema: Any, limit: int = 5, max_depth: int = DEFAULT_MAX_DEPTH
) -> list[str]:
    """Why ``instance`` fails ``schema`` (empty list when valid).

    Uses the draft named by ``$schema`` (2020-12 when absent) with format checking on, so a
    ``"format": "email"`` string that is not an e-mail address counts as invalid. An instance
    or schema nested deeper than ``max_depth``, or a schema that refers to itself without end,
    is reported as an error instead of exhausting the validator's recursion.
    """
    if isinstance(schema, bool):
        return [] if schema else ["the schema 'false' accepts nothing"]
    if json_depth(instance, stop_above=max_depth) > max_depth:
        return [f"(root): the value is nested deeper than {max_depth} levels"]
    if json_depth(schema, stop_above=max_depth) > max_depth:
        return [f"(root): the schema is nested deeper than {max_depth} levels"]
    cls = validator_for(schema, default=jsonschema.Draft202012Validator)
    validator = cls(schema, format_checker=cls.FORMAT_CHECKER)
    errors = []
    try:
        for err in validator.iter_errors(instance):
            where = "/".join(str(p) for p in err.absolute_path) or "(root)"
            errors.append(f"{where}: {err.message}")
            if len(errors) >= limit:
                break
    except RecursionError:
        return ["(root): the schema refers to itself without end; the value cannot be checked"]
    return errors


# ---- contradictions -----------------------------------------------------------------------------


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "integer" if value.is_integer() else "number"
    if value is None:
        return "null"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _type_allows(declared: Any, value: Any) -> bool:
    types = [declared] if isinstance(declared, str) else list(declared)
    actual = _json_type(value)
    return actual in types or (actual == "integer" and "number" in types)


_BOUNDS = (
    ("minimum", "maximum"), ("minLength", "maxLength"), ("minItems", "maxItems"),
    ("minProperties", "maxProperties"), ("exclusiveMinimum", "maximum"),
    ("minimum", "exclusiveMaximum"),
)  # fmt: skip


def _must_hold(schema: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(pointer, subschema)`` for the root and the subschemas reached only through keywords
    that constrain a value whenever that part of it is present (``items``, ``properties``,
    ``allOf``, ``prefixItems``: no alternatives, no negation), pre-order, without recursion."""
    stack: list[tuple[str, Any]] = [("#", schema)]
    while stack:
        pointer, sub = stack.pop()
        if not isinstance(sub, dict):
            continue
        yield pointer, sub
        children: list[tuple[str, Any]] = []
        if isinstance(sub.get("items"), dict):
            children.append((f"{pointer}/items", sub["items"]))
        if isinstance(sub.get("properties"), dict):
            children += [(f"{pointer}/properties/{n}", s) for n, s in sub["properties"].items()]
        for key in ("allOf", "prefixItems"):
            if isinstance(sub.get(key), list):
                children += [(f"{pointer}/{key}/{i}", s) for i, s in enumerate(sub[key])]
        stack.extend(reversed(children))


def unsatisfiable_reason(schema: Any) -> str | None:
    """Why no instance can satisfy ``schema``, for the contradictions seen in real schemas.

    Checks the root and the subschemas an instance may have to satisfy (``properties``,
    ``items``, ``prefixItems``, ``allOf``) for ``enum``/``const`` values that their ``type``
    excludes (e.g. an ``enum`` of strings on an ``array`` type, found in real tool definitions),
    an empty ``enum``, lower bounds above upper bounds, and ``required`` properties that
    ``additionalProperties: false`` forbids. Then, over every subschema a generated value can
    enter (through ``$ref`` too), one that only endless values satisfy: a required property,
    ``minItems`` item or ``allOf`` part that leads back to itself (``schema_shape``). Such a
    subschema would make constrained decoding force text without end. A dead branch of
    ``anyOf``/``oneOf``, a ``not`` or an unused definition leaves the schema satisfiable and is
    not reported. Returns ``None`` when nothing is found (the schema may still be unsatisfiable
    in ways this does not detect; decoding then stops at the first step with no allowed token).

    >>> unsatisfiable_reason({"type": "array", "enum": ["a", "b"]})
    "#: no value of 'enum' has type 'array'"
    """
    return contradiction_reason(schema) or schema_shape(schema).endless


def contradiction_reason(schema: Any) -> str | None:
    """The first local contradiction ``unsatisfiable_reason`` looks for (no recursion
    analysis)."""
    for pointer, sub in _must_hold(schema):
        declared = sub.get("type")
        if "enum" in sub and isinstance(sub["enum"], list):
            if not sub["enum"]:
                return f"{pointer}: 'enum' is empty"
            if declared is not None and not any(_type_allows(declared, v) for v in sub["enum"]):
                return f"{pointer}: no value of 'enum' has type {declared!r}"
        if "const" in sub and declared is not None and not _type_allows(declared, sub["const"]):
            return f"{pointer}: 'const' does not have type {declared!r}"
        for low, high in _BOUNDS:
            lo, hi = sub.get(low), sub.get(high)
            if isinstance(lo, int | float) and isinstance(hi, int | float):
                strict = low.startswith("exclusive") or high.startswith("exclusive")
                if lo > hi or (strict and lo == hi):
                    return f"{pointer}: '{low}' ({lo}) exceeds '{high}' ({hi})"
        if sub.get("additionalProperties") is False and isinstance(sub.get("required"), list):
            declared_props = set(sub.get("properties", {}))
            patterns = sub.get("patternProperties")
            missing = [r for r in sub["required"] if r not in declared_props]
            if missing and not patterns:
                return (
                    f"{pointer}: required property {missing[0]!r} is forbidden by "
                    "'additionalProperties: false'"
                )
    return None
