"""The issue's out-of-memory schema and its siblings, through the real compile and matcher path
in a subprocess limited to 3 GB of address space: each gets its 400 (or a bounded jump-forward)
and the process survives. Before the checks, the issue's schema alone raised std::bad_alloc
within seconds under this limit (and grew a server to ~22 GB without one)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[3]
LIMIT_BYTES = 3 * 2**30

NODE = {"type": "object", "properties": {"child": {"$ref": "#/$defs/node"}}, "required": ["child"]}

CASES: dict[str, Any] = {
    "issue": {"$defs": {"node": NODE}, "$ref": "#/$defs/node"},
    "array_min_items": {"type": "array", "items": {"$ref": "#"}, "minItems": 1},
    "all_of": {"allOf": [{"$ref": "#"}]},
    "typeless_root": {"properties": {"c": {"$ref": "#"}}, "required": ["c"]},
    "endless_branch": {"anyOf": [{"$ref": "#/$defs/node"}, {"type": "null"}],
                       "$defs": {"node": NODE}},
    # Satisfiable but with huge forced text or matcher state (bad_alloc / 11 GB unchecked):
    "min_items_const": {"type": "array", "items": {"const": "ab"}, "minItems": 100_000},
    "min_length": {"type": "string", "minLength": 20_000},
    "nested_repeat_pattern": {"type": "string", "pattern": "^(a{10000}){1000}$"},
    # Within the bounds: compiles, and the forced text comes back capped.
    "bounded_forced_text": {"type": "array", "items": {"const": "ab"}, "minItems": 1000},
}  # fmt: skip

SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
    import xgrammar as xgr
    from decoding.constraint import JsonSchema
    from decoding.grammar import GrammarCompiler
    from schemas.errors import SlmgateError

    vocab = ["</s>", *list('{{}}[]":, abcdefghijklmnopqrstuvwxyz0123456789_-.\\n<>/')]
    info = xgr.TokenizerInfo(vocab, vocab_type=xgr.VocabType.RAW, stop_token_ids=[0])
    compiler = GrammarCompiler(info)
    out = {{}}
    for name, schema in json.loads(sys.stdin.read()).items():
        try:
            compiled = compiler.compile(JsonSchema(schema))
            state = compiler.new_state(compiled)
            out[name] = ["compiled", state.jump_forward(max_chars=16)]
        except SlmgateError as exc:
            out[name] = [type(exc).__name__, exc.param]
    print(json.dumps(out))
    """
).format(limit=LIMIT_BYTES)


def test_endless_and_oversized_schemas_fail_fast_under_a_memory_limit() -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        input=json.dumps(CASES),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    unsatisfiable = ["UnsatisfiableSchemaError", "response_format"]
    too_complex = ["SchemaTooComplexError", "response_format"]
    assert results == {
        "issue": unsatisfiable,
        "array_min_items": unsatisfiable,
        "all_of": unsatisfiable,
        "typeless_root": unsatisfiable,
        "endless_branch": unsatisfiable,
        "min_items_const": too_complex,
        "min_length": too_complex,
        "nested_repeat_pattern": too_complex,
        "bounded_forced_text": ["compiled", '["ab", "ab", "ab'],
    }
