"""Guided-decoding benchmark, side by side in one process (``slmgate bench grammar``):

1. per-token decode time, unconstrained vs constrained, same prompts (overhead ratio);
2. compile success and compile time p50/p95 over every shared JSONSchemaBench subset;
3. validity of generated instances on a fixed sample of schemas.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from decoding.constraint import JsonSchema, NoConstraint
from decoding.grammar import GrammarCompiler
from decoding.models import ModelSpec, load_engine
from decoding.types import GenerationRequest, SamplingParams
from schemas.errors import InvalidRequestError, UnsatisfiableSchemaError, UnsupportedSchemaError
from schemas.jsonschema_utils import validation_errors

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "jsonschemabench"


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in [0, 100]); 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def load_subsets(root: Path) -> dict[str, list[tuple[str, Any]]]:
    subsets = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(folder.glob("*.json"))
        subsets[folder.name] = [(f.name, json.loads(f.read_text())) for f in files]
    return subsets


def sample_schemas(subsets: dict[str, list[tuple[str, Any]]], n: int, seed: int = 0) -> list[
    tuple[str, Any]
]:
    """A fixed sample of ``n`` schemas, drawn round-robin over subsets with a seeded RNG."""
    rng = random.Random(seed)
    pools = {k: rng.sample(v, len(v)) for k, v in subsets.items()}
    out: list[tuple[str, Any]] = []
    while len(out) < n and any(pools.values()):
        for name, pool in pools.items():
            if pool and len(out) < n:
                fname, schema = pool.pop()
                out.append((f"{name}/{fname}", schema))
    return out


def bench_compile(compiler: GrammarCompiler, subsets: dict[str, list[tuple[str, Any]]],
                  limit: int | None) -> dict[str, dict[str, Any]]:  # fmt: skip
    rows = {}
    for name, schemas in subsets.items():
        counts = {"compiled": 0, "unsupported": 0, "unsatisfiable": 0, "invalid": 0, "other": 0}
        times: list[float] = []
        for _, schema in schemas[:limit]:
            started = time.perf_counter()
            try:
                compiler._compile_uncached(JsonSchema(schema), "response_format")
                counts["compiled"] += 1
                times.append((time.perf_counter() - started) * 1e3)
            except UnsupportedSchemaError:
                counts["unsupported"] += 1
            except UnsatisfiableSchemaError:
                counts["unsatisfiable"] += 1
            except InvalidRequestError:
                counts["invalid"] += 1
            except Exception:
                counts["other"] += 1
        total = sum(counts.values())
        rows[name] = {**counts, "total": total,
                      "success_rate": counts["compiled"] / total if total else 0.0,
                      "compile_ms_p50": percentile(times, 50),
                      "compile_ms_p95": percentile(times, 95)}  # fmt: skip
    return rows


def _prompt(schema: Any) -> tuple[dict[str, Any], ...]:
    text = f"Produce one JSON instance of this schema:\n{json.dumps(schema)}"
    return ({"role": "user", "content": text},)


def bench_decode(engine: Any, schemas: list[tuple[str, Any]], max_tokens: int) -> dict[str, Any]:
    """Interleaved per prompt so drift hits both arms alike."""
    plain: list[float] = []
    constrained: list[float] = []
    forced = produced = 0
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    for _, schema in schemas:
        for constraint, bucket in ((NoConstraint(), plain), (JsonSchema(schema), constrained)):
            req = GenerationRequest(_prompt(schema), params, constraint)
            engine.complete_sync(req)  # same prompt prefilled once before timing: cache-warm
            started = time.perf_counter()
            choice = engine.complete_sync(req).choices[0]
            elapsed = time.perf_counter() - started
            if choice.token_ids:
                bucket.append(elapsed * 1e3 / len(choice.token_ids))
            if isinstance(constraint, JsonSchema):
                forced += sum(e.forced for e in choice.events)
                produced += len(choice.events)
    p, c = statistics.median(plain), statistics.median(constrained)
    return {"prompts": len(schemas), "ms_per_token_unconstrained": p,
            "ms_per_token_constrained": c, "overhead_ratio": c / p,
            "forced_token_share": forced / produced if produced else 0.0}  # fmt: skip


def bench_validity(engine: Any, schemas: list[tuple[str, Any]], max_tokens: int) -> dict[str, Any]:
    counts = {"valid": 0, "invalid": 0, "truncated": 0, "refused": 0}
    failures = []
    for name, schema in schemas:
        req = GenerationRequest(_prompt(schema), SamplingParams(temperature=0,
                                max_tokens=max_tokens), JsonSchema(schema))  # fmt: skip
        try:
            choice = engine.complete_sync(req).choices[0]
        except InvalidRequestError as exc:
            counts["refused"] += 1
            failures.append((name, f"refused: {exc.code}"))
            continue
        if choice.finish_reason == "length":
            counts["truncated"] += 1
            continue
        errors = validation_errors(json.loads(choice.text), schema)
        counts["valid" if not errors else "invalid"] += 1
        if errors:
            failures.append((name, errors[0]))
    finished = counts["valid"] + counts["invalid"]
    return {**counts, "valid_rate_of_finished": counts["valid"] / finished if finished else 0.0,
            "failures": failures}  # fmt: skip


def machine() -> dict[str, Any]:
    cpu = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                    if line.startswith("model name")), cpu)  # fmt: skip
    return {"cpu": cpu, "cores": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version()}  # fmt: skip


def format_table(result: dict[str, Any]) -> str:
    lines = [f"machine: {result['machine']}", f"model: {result['model']} ({result['dtype']})"]
    if "compile" in result:
        lines.append("\n| subset | schemas | compiled | unsupported | unsatisfiable | invalid | "
                     "other | success | p50 ms | p95 ms |")  # fmt: skip
        lines.append("|---|---|---|---|---|---|---|---|---|---|")
        for name, r in result["compile"].items():
            lines.append(f"| {name} | {r['total']} | {r['compiled']} | {r['unsupported']} | "
                         f"{r['unsatisfiable']} | {r['invalid']} | {r['other']} | "
                         f"{r['success_rate']:.1%} | {r['compile_ms_p50']:.1f} | "
                         f"{r['compile_ms_p95']:.1f} |")  # fmt: skip
    if "decode" in result:
        d = result["decode"]
        lines.append(f"\ndecode ({d['prompts']} prompts, median ms/token): unconstrained "
                     f"{d['ms_per_token_unconstrained']:.1f}, constrained "
                     f"{d['ms_per_token_constrained']:.1f}, overhead x{d['overhead_ratio']:.2f}, "
                     f"grammar-forced tokens {d['forced_token_share']:.0%}")  # fmt: skip
    if "validity" in result:
        v = result["validity"]
        lines.append(f"\nvalidity: valid {v['valid']}, invalid {v['invalid']}, truncated "
                     f"{v['truncated']}, refused {v['refused']} -> "
                     f"{v['valid_rate_of_finished']:.0%} of finished outputs valid")  # fmt: skip
        lines.extend(f"  - {name}: {err}" for name, err in v["failures"][:10])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slmgate bench grammar", description=__doc__)
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--compile-limit", type=int, default=None, help="schemas per subset")
    parser.add_argument("--validity-sample", type=int, default=20)
    parser.add_argument("--validity-tokens", type=int, default=256)
    parser.add_argument("--skip-decode", action="store_true")
    parser.add_argument("--skip-compile", action="store_true")
    parser.add_argument("--skip-validity", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="write all numbers here")
    args = parser.parse_args(argv)

    engine = load_engine(ModelSpec("bench", args.model, dtype=args.dtype))
    subsets = load_subsets(args.data)
    result: dict[str, Any] = {"machine": machine(), "model": args.model,
                              "dtype": engine.info.dtype}  # fmt: skip
    if not args.skip_compile:
        result["compile"] = bench_compile(engine.grammars, subsets, args.compile_limit)
    if not args.skip_decode:
        decode_set = sample_schemas({k: v for k, v in subsets.items() if k == "Glaiveai2K"},
                                    args.prompts, seed=1)  # fmt: skip
        result["decode"] = bench_decode(engine, decode_set, args.decode_tokens)
    if not args.skip_validity:
        result["validity"] = bench_validity(
            engine, sample_schemas(subsets, args.validity_sample, seed=2), args.validity_tokens
        )
    print(format_table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    engine.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
