"""JSON-schema utilities shared by every layer: canonical form and cache key, meta-schema check,
keywords the grammar cannot enforce, and validation of generated instances.

Pure functions over plain dicts; no grammar engine and no model here.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Any

import jsonschema
from jsonschema.exceptions import SchemaError
from jsonschema.validators import validator_for

from schemas.errors import InvalidRequestError, UnsupportedSchemaError

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


def iter_subschemas(schema: Any, path: str = "#") -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``(json-pointer, subschema)`` for ``schema`` and every schema nested in it."""
    if not isinstance(schema, dict):
        return
    yield path, schema
    for key in _SUBSCHEMA:
        if key in schema:
            value = schema[key]
            if isinstance(value, list):  # draft-4 tuple form of "items"
                for i, item in enumerate(value):
                    yield from iter_subschemas(item, f"{path}/{key}/{i}")
            else:
                yield from iter_subschemas(value, f"{path}/{key}")
    for key in _SUBSCHEMA_MAP:
        value = schema.get(key)
        if isinstance(value, dict):
            for name, sub in value.items():
                yield from iter_subschemas(sub, f"{path}/{key}/{name}")
    for key in _SUBSCHEMA_LIST:
        value = schema.get(key)
        if isinstance(value, list):
            for i, sub in enumerate(value):
                yield from iter_subschemas(sub, f"{path}/{key}/{i}")


def canonical_schema(schema: Any) -> Any:
    """``schema`` without annotation keywords, keeping key order (the grammar follows it).

    >>> canonical_schema({"title": "T", "properties": {"title": {"type": "string"}}})
    {'properties': {'title': {'type': 'string'}}}
    """
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in _ANNOTATIONS:
            continue
        if key in _SUBSCHEMA_MAP and isinstance(value, dict):
            out[key] = {name: canonical_schema(sub) for name, sub in value.items()}
        elif key in _SUBSCHEMA_LIST and isinstance(value, list):
            out[key] = [canonical_schema(sub) for sub in value]
        elif key in _SUBSCHEMA:
            out[key] = (
                [canonical_schema(v) for v in value]
                if isinstance(value, list)
                else canonical_schema(value)
            )
        else:
            out[key] = value
    return out


def schema_key(kind: str, schema: Any, **options: Any) -> str:
    """Stable cache key for compiling ``schema`` as ``kind`` with ``options``."""
    payload = json.dumps(
        [kind, canonical_schema(schema), sorted(options.items())],
        separators=(",", ":"),
        ensure_ascii=False,
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def check_schema(schema: Any, param: str) -> None:
    """Raise a 400 unless ``schema`` is a valid JSON schema we can resolve locally."""
    if not isinstance(schema, dict | bool):
        raise InvalidRequestError("a JSON schema must be an object or a boolean", param=param)
    if isinstance(schema, bool):
        return
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


def keywords_checked_after(schema: Any) -> list[str]:
    """The keywords in ``schema`` that decoding cannot enforce (sorted, unique)."""
    found = {key for _, sub in iter_subschemas(schema) for key in sub}
    return sorted(found & VALIDATED_AFTER_GENERATION)


def validation_errors(instance: Any, schema: Any, limit: int = 5) -> list[str]:
    """Why ``instance`` fails ``schema`` (empty list when valid).

    Uses the draft named by ``$schema`` (2020-12 when absent) with format checking on, so a
    ``"format": "email"`` string that is not an e-mail address counts as invalid.
    """
    if isinstance(schema, bool):
        return [] if schema else ["the schema 'false' accepts nothing"]
    cls = validator_for(schema, default=jsonschema.Draft202012Validator)
    validator = cls(schema, format_checker=cls.FORMAT_CHECKER)
    errors = []
    for err in validator.iter_errors(instance):
        where = "/".join(str(p) for p in err.absolute_path) or "(root)"
        errors.append(f"{where}: {err.message}")
        if len(errors) >= limit:
            break
    return errors


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


_MUST_HOLD_STEPS = frozenset({"properties", "items", "prefixItems", "allOf"})


def _must_hold(pointer: str) -> bool:
    """Whether the subschema at ``pointer`` is reached only through keywords whose subschemas
    constrain an instance whenever that part of it is present (no alternatives, no negation)."""
    parts = pointer.split("/")[1:]
    i = 0
    while i < len(parts):
        step = parts[i]
        if step not in _MUST_HOLD_STEPS:
            return False
        i += 1 if step == "items" else 2  # properties/<name>, prefixItems/<i>, allOf/<i>
    return True


def unsatisfiable_reason(schema: Any) -> str | None:
    """Why no instance can satisfy ``schema``, for the contradictions seen in real schemas.

    Checks the root and the subschemas an instance may have to satisfy (``properties``,
    ``items``, ``prefixItems``, ``allOf``) for ``enum``/``const`` values that their ``type``
    excludes (e.g. an ``enum`` of strings on an ``array`` type, found in real tool definitions),
    an empty ``enum``, lower bounds above upper bounds, and ``required`` properties that
    ``additionalProperties: false`` forbids. A dead branch of ``anyOf``/``oneOf``, a ``not`` or
    an unused definition leaves the schema satisfiable and is not reported. Returns ``None``
    when nothing is found (the schema may still be unsatisfiable in ways this does not detect;
    decoding then stops at the first step with no allowed token).

    >>> unsatisfiable_reason({"type": "array", "enum": ["a", "b"]})
    "#: no value of 'enum' has type 'array'"
    """
    for pointer, sub in iter_subschemas(schema):
        if not _must_hold(pointer):
            continue
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
