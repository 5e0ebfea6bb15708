"""The shape of a JSON schema's values: which parts can produce a finite value, the shortest
text of each, and where recursion is. A schema whose every value nests without end (an object
that requires a child of its own type) would make constrained decoding emit forced text forever,
so such schemas are refused before any grammar is compiled.

A fixpoint over a graph of productions built from local ``$ref``s, required properties,
``minItems``/``prefixItems``, ``minProperties`` and ``allOf``/``anyOf``/``oneOf``; no recursion on
the schema's nesting.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Any, TypeGuard
from urllib.parse import unquote

from schemas.json_limits import compact_json

_INF = float("inf")
_SATURATE = 10**15  # sizes are capped here; only comparisons against limits far below matter
_ALL_TYPES = ("null", "boolean", "integer", "number", "string", "array", "object")
# Keywords that make xgrammar treat a schema without "type" as an object / an array.
_OBJECT_HINTS = ("properties", "additionalProperties", "unevaluatedProperties")
_ARRAY_HINTS = ("items", "prefixItems", "unevaluatedItems")
# Shortest compact JSON text of a value of each scalar type.
_SCALAR_CHARS = {"null": 4, "boolean": 4, "integer": 1, "number": 1}


@dataclass(frozen=True, slots=True)
class SchemaShape:
    """What the fixpoint analysis of ``schema_shape`` found.

    ``endless``: why a subschema a value can enter has only endless values (None: none has).
    ``min_chars``: characters in the root's shortest compact value, estimated (None: no
    finite value). ``largest_min_chars`` / ``largest_at``: the longest such over the
    subschemas a value can enter, and where: what a grammar can force inside one subschema.
    ``recursive_min_chars``: the same over subschemas on a ``$ref`` cycle (0: not recursive);
    text forced while closing a recursion can repeat that much once per level.
    """

    endless: str | None = None
    min_chars: int | None = 0
    largest_min_chars: int = 0
    largest_at: str = "#"
    recursive_min_chars: int = 0


@dataclass(slots=True)
class _Production:
    """One way to build a value of ``node``: ``const`` characters plus ``args`` (child node,
    weight, label) combined by sum (sizes add up) or max (all must hold)."""

    node: int
    const: int
    args: list[tuple[int, int, str]]
    combine: str = "sum"  # "sum" | "max"


@dataclass(slots=True)
class _Graph:
    """Subschemas (and helper nodes for alternatives) as a grammar of size productions."""

    root: Any
    # Where each node's subschema is: (parent schema node, step) or (-1, absolute pointer);
    # None for a helper node. Pointers are spelled out only for messages.
    places: list[tuple[int, str] | None] = field(default_factory=list)
    productions: list[_Production] = field(default_factory=list)
    edges: list[list[int]] = field(default_factory=list)  # every child a value can enter
    _ids: dict[int, int] = field(default_factory=dict)
    _todo: list[tuple[int, Any]] = field(default_factory=list)

    def node(self, place: tuple[int, str] | None) -> int:
        self.places.append(place)
        self.edges.append([])
        return len(self.places) - 1

    def schema(self, sub: Any, place: tuple[int, str]) -> int:
        """The node of subschema ``sub`` (one per object, built once)."""
        found = self._ids.get(id(sub))
        if found is not None:
            return found
        node = self.node(place)
        self._ids[id(sub)] = node
        self._todo.append((node, sub))
        return node

    def pointer(self, node: int) -> str:
        """The JSON pointer of a schema node (the first way it was reached)."""
        steps: list[str] = []
        place = self.places[node]
        while place is not None:
            parent, step = place
            steps.append(step)
            if parent < 0:
                break
            place = self.places[parent]
        return "/".join(reversed(steps))

    def produce(self, node: int, const: int, args: list[tuple[int, int, str]],
                combine: str = "sum") -> None:  # fmt: skip
        self.productions.append(_Production(node, const, args, combine))
        self.edges[node].extend(child for child, _, _ in args)

    def build(self) -> None:
        self.schema(self.root, (-1, "#"))
        while self._todo:
            self._expand(*self._todo.pop())

    def _expand(self, node: int, sub: Any) -> None:
        if sub is False:
            return  # no production: no value at all
        if not isinstance(sub, dict):  # ``true`` (or not a schema): any value, e.g. ``null``
            self.produce(node, 4, [])
            return
        parts: list[tuple[int, int, str]] = []
        ref = sub.get("$ref")
        if isinstance(ref, str):
            target = _resolve(self.root, ref)
            if target is not _MISSING:
                parts.append((self.schema(target, (-1, ref)), 1, f"$ref {ref!r}"))
        for i, part in enumerate(_list(sub.get("allOf"))):
            parts.append((self.schema(part, (node, f"allOf/{i}")), 1, f"allOf/{i}"))
        for key in ("anyOf", "oneOf"):
            options = _list(sub.get(key))
            if options:
                alternatives = self.node(None)
                for i, option in enumerate(options):
                    child = self.schema(option, (node, f"{key}/{i}"))
                    self.produce(alternatives, 0, [(child, 1, f"{key}/{i}")], "max")
                parts.append((alternatives, 1, key))
        parts.append((self._typed(sub, node), 1, "type"))
        self.produce(node, 0, parts, "max")

    def _typed(self, sub: dict[str, Any], at: int) -> int:  # ``at``: the schema's node
        """A helper node: the shortest value of each type ``sub`` allows, or its literals."""
        node = self.node(None)
        optional = self._optional_children(sub, at)
        self.edges[node].extend(optional)
        if "const" in sub or "enum" in sub:
            values = [sub["const"]] if "const" in sub else _list(sub.get("enum"))
            if values:
                self.produce(node, min(len(compact_json(v)) for v in values), [])
            return node
        for kind in _types(sub):
            if kind in _SCALAR_CHARS:
                self.produce(node, _SCALAR_CHARS[kind], [])
            elif kind == "string":
                self.produce(node, 2 + _count(sub.get("minLength")), [])
            elif kind == "array":
                self._array(node, sub, at)
            elif kind == "object":
                self._object(node, sub, at)
        return node

    def _array(self, node: int, sub: dict[str, Any], at: int) -> None:
        need = _count(sub.get("minItems"))
        items = sub.get("items")
        prefix = _list(sub.get("prefixItems"))
        rest: Any = sub.get("unevaluatedItems", True) if items is None else items
        rest_at = (at, "items" if items is not None else "unevaluatedItems")
        if isinstance(items, list):  # draft 4: "items" as a tuple, then "additionalItems"
            prefix, rest = items, sub.get("additionalItems", True)
            rest_at = (at, "additionalItems")
        args: list[tuple[int, int, str]] = []
        for i, item in enumerate(prefix[:need]):
            args.append((self.schema(item, (at, f"prefixItems/{i}")), 1, f"prefixItems/{i}"))
        if need > len(prefix):
            if rest is False:
                return  # more items needed than allowed
            args.append((self.schema(rest, rest_at), need - len(prefix), f"minItems {need}"))
        self.produce(node, 2 + max(need - 1, 0), args)

    def _object(self, node: int, sub: dict[str, Any], at: int) -> None:
        declared = sub.get("properties")
        properties: dict[str, Any] = declared if isinstance(declared, dict) else {}
        required = [r for r in _list(sub.get("required")) if isinstance(r, str)]
        args: list[tuple[int, int, str]] = []
        const = 2 + max(len(required) - 1, 0)
        for name in dict.fromkeys(required):
            const += len(compact_json(name)) + 1
            if name in properties:
                child = self.schema(properties[name], (at, f"properties/{name}"))
            else:
                extra = sub.get("additionalProperties", sub.get("unevaluatedProperties", True))
                child = self.schema(extra, (at, "additionalProperties"))
            args.append((child, 1, f"required property {name!r}"))
        extra_needed = _count(sub.get("minProperties")) - len(required)
        if extra_needed > 0:  # properties beyond the required ones, each `,"":<value>`
            extra_node = self._extra_property(sub, at, set(required))
            if extra_node is None:
                return  # no other property is allowed
            const += extra_needed * 4
            args.append((extra_node, extra_needed, f"minProperties {extra_needed + len(required)}"))
        self.produce(node, const, args)

    def _extra_property(self, sub: dict[str, Any], at: int, required: set[str]) -> int | None:
        """A helper node for the value of one more property: an optional declared one, a
        pattern property or an additional one (None when none is allowed)."""
        options: list[int] = []
        declared = sub.get("properties")
        if isinstance(declared, dict):
            options += [self.schema(s, (at, f"properties/{n}"))
                        for n, s in declared.items() if n not in required]  # fmt: skip
        patterns = sub.get("patternProperties")
        if isinstance(patterns, dict):
            options += [self.schema(s, (at, f"patternProperties/{n}")) for n, s in patterns.items()]
        extra = sub.get("additionalProperties", sub.get("unevaluatedProperties", True))
        if extra is not False:
            options.append(self.schema(extra, (at, "additionalProperties")))
        if not options:
            return None
        node = self.node(None)
        for option in options:
            self.produce(node, 0, [(option, 1, "a property")], "max")
        return node

    def _optional_children(self, sub: dict[str, Any], at: int) -> list[int]:
        """Nodes of the subschemas a value may enter without having to (optional properties,
        extra items, ...): they must not be endless either."""
        out: list[int] = []
        for key in ("properties", "patternProperties"):
            value = sub.get(key)
            if isinstance(value, dict):
                out += [self.schema(s, (at, f"{key}/{n}")) for n, s in value.items()]
        for key in ("additionalProperties", "unevaluatedProperties", "additionalItems",
                    "unevaluatedItems"):  # fmt: skip
            if isinstance(sub.get(key), dict):
                out.append(self.schema(sub[key], (at, key)))
        items = sub.get("items")
        if isinstance(items, dict):
            out.append(self.schema(items, (at, "items")))
        for key, seq in (("items", items), ("prefixItems", sub.get("prefixItems"))):
            if isinstance(seq, list):
                out += [self.schema(s, (at, f"{key}/{i}")) for i, s in enumerate(seq)]
        return out


_MISSING = object()


def _is_number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _count(value: Any) -> int:
    """A size keyword's value as a non-negative int (anything else counts as 0)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0
    return int(min(max(value, 0), _SATURATE))


def _types(sub: dict[str, Any]) -> list[str]:
    """The types a value of ``sub`` may have, as xgrammar reads it: a schema without ``type``
    is an object when it has object keywords, an array when it has array keywords."""
    declared = sub.get("type")
    if isinstance(declared, str):
        return [declared]
    if isinstance(declared, list) and declared:
        return [t for t in declared if isinstance(t, str)]
    hinted = [kind for kind, hints in (("object", _OBJECT_HINTS), ("array", _ARRAY_HINTS))
              if any(h in sub for h in hints)]  # fmt: skip
    return hinted or list(_ALL_TYPES)


def _resolve(root: Any, ref: str) -> Any:
    """The subschema a local ``$ref`` points to, or ``_MISSING``."""
    if ref == "#":
        return root
    if not ref.startswith("#/"):
        return _MISSING  # remote, or an anchor: xgrammar treats it as any value
    current = root
    for raw in ref[2:].split("/"):
        part = unquote(raw).replace("~1", "/").replace("~0", "~")
        if isinstance(current, dict) and part in current:
            current = current[part]
        elif isinstance(current, list) and part.isdigit() and int(part) < len(current):
            current = current[int(part)]
        else:
            return _MISSING
    return current if isinstance(current, dict | bool) else _MISSING


def _min_sizes(graph: _Graph) -> list[float]:
    """Least fixpoint: each node's shortest value in characters (inf: none is finite).

    Knuth's generalisation of Dijkstra's algorithm: every production is a sum or max of its
    arguments plus a constant, so it is at least each argument and the smallest pending
    value is final when popped. Linear in the productions up to the heap's log factor."""
    n = len(graph.places)
    value: list[float] = [_INF] * n
    done = [False] * n
    pending: list[int] = []
    users: list[list[int]] = [[] for _ in range(n)]
    heap: list[tuple[float, int]] = []
    for index, prod in enumerate(graph.productions):
        distinct = {child for child, _, _ in prod.args}
        pending.append(len(distinct))
        for child in distinct:
            users[child].append(index)
        if not distinct:
            heap.append((prod.const, prod.node))
    heapq.heapify(heap)
    while heap:
        size, node = heapq.heappop(heap)
        if done[node]:
            continue
        done[node], value[node] = True, size
        for index in users[node]:
            pending[index] -= 1
            if pending[index] == 0:
                prod = graph.productions[index]
                heapq.heappush(heap, (_evaluate(prod, value), prod.node))
    return value


def _evaluate(prod: _Production, value: list[float]) -> float:
    if prod.combine == "max":
        return max((value[c] for c, _, _ in prod.args), default=0) + prod.const
    return min(prod.const + sum(value[c] * w for c, w, _ in prod.args), _SATURATE)


def _alive(graph: _Graph) -> list[bool]:
    """Greatest fixpoint: whether a node has any value at all, finite or endless (a node
    dies when every production has a dead argument)."""
    n = len(graph.places)
    live_prods = [0] * n
    users: list[list[int]] = [[] for _ in range(n)]
    for index, prod in enumerate(graph.productions):
        live_prods[prod.node] += 1
        for child in {c for c, _, _ in prod.args}:
            users[child].append(index)
    alive = [True] * n
    prod_dead = [False] * len(graph.productions)
    stack = [node for node in range(n) if live_prods[node] == 0]
    while stack:
        node = stack.pop()
        if not alive[node]:
            continue
        alive[node] = False
        for index in users[node]:
            if prod_dead[index]:
                continue
            prod_dead[index] = True
            owner = graph.productions[index].node
            live_prods[owner] -= 1
            if live_prods[owner] == 0:
                stack.append(owner)
    return alive


def _on_cycles(edges: list[list[int]]) -> list[bool]:
    """Which nodes lie on a cycle of ``edges`` (Tarjan's strongly connected components,
    iteratively)."""
    n = len(edges)
    index = [-1] * n
    low = [0] * n
    on_stack = [False] * n
    stack: list[int] = []
    cyclic = [False] * n
    counter = 0
    for start in range(n):
        if index[start] >= 0:
            continue
        work: list[tuple[int, int]] = [(start, 0)]
        while work:
            node, i = work.pop()
            if i == 0:
                index[node] = low[node] = counter
                counter += 1
                stack.append(node)
                on_stack[node] = True
            if i < len(edges[node]):
                work.append((node, i + 1))
                child = edges[node][i]
                if index[child] < 0:
                    work.append((child, 0))
                elif on_stack[child]:
                    low[node] = min(low[node], index[child])
                continue
            if work:  # ``node`` is finished: pass its low link up to its parent
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack[member] = False
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in edges[node]:
                    for member in component:
                        cyclic[member] = True
    return cyclic


def schema_shape(schema: Any) -> SchemaShape:
    """Which subschemas have finite values, how long the shortest ones are, and where the
    schema recurses: one pass over the subschemas a value can enter from the root (through
    ``properties``, items, ``anyOf``/``oneOf``/``allOf`` and local ``$ref``; ``not``, ``if``
    and unused definitions are never entered).

    A required property, a ``minItems`` item, a ``prefixItems`` entry below ``minItems``, an
    ``allOf`` part and a ``$ref`` must all have a finite value for their subschema to have one
    (least fixpoint); an ``anyOf``/``oneOf`` needs one branch. A subschema that has values but
    no finite one (the greatest fixpoint keeps it, the least does not) is ``endless``. Reads
    schemas as xgrammar does: no ``type`` with object keywords means an object.
    """
    graph = _Graph(schema)
    graph.build()
    sizes = _min_sizes(graph)
    alive = _alive(graph)
    endless = None
    for node, place in enumerate(graph.places):
        if place is not None and alive[node] and sizes[node] == _INF:
            why = _why_endless(graph, sizes, alive, node)
            endless = f"{graph.pointer(node)}: no finite value satisfies it: {why}"
            break
    cyclic = _on_cycles(graph.edges)
    finite = [(int(s), n) for n, s in enumerate(sizes)
              if s != _INF and graph.places[n] is not None]  # fmt: skip
    largest, largest_node = max(finite, default=(0, 0), key=lambda pair: pair[0])
    recursive = max((int(sizes[n]) for n in range(len(sizes))
                     if cyclic[n] and sizes[n] != _INF), default=0)  # fmt: skip
    root = sizes[0]
    return SchemaShape(
        endless=endless,
        min_chars=None if root == _INF else int(root),
        largest_min_chars=largest,
        largest_at=graph.pointer(largest_node),
        recursive_min_chars=recursive,
    )


def _why_endless(graph: _Graph, sizes: list[float], alive: list[bool], node: int) -> str:
    """The parts of ``node`` that force one more level, e.g. "required property 'child' ->
    $ref '#/$defs/node' leads back to itself"."""
    path: list[str] = []
    seen = set()
    current = node
    while current not in seen and len(path) < 8:
        seen.add(current)
        step = next(
            ((child, label) for prod in graph.productions if prod.node == current
             for child, _, label in prod.args if alive[child] and sizes[child] == _INF),
            None,
        )  # fmt: skip
        if step is None:
            break
        current, label = step
        if label not in ("type", "anyOf", "oneOf"):
            path.append(label)
    chain = " -> ".join(dict.fromkeys(path)) or "its parts"
    return f"{chain} leads back to itself, so every value would nest without end"


