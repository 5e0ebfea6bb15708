"""Guided-decoding benchmark, side by side in one process (``slmgate bench grammar``).

1. decode: per-token decode time without and with a JSON-schema constraint on the same prompts
   (greedy, interleaved per prompt so machine drift hits both arms alike), the overhead ratio and
   the share of tokens the grammar forced;
2. compile: success rate and compile-time p50/p95 over every schema of every JSONSchemaBench
   subset, each compile bypassing the grammar cache, with failures split by kind;
3. validity: on a fixed, seeded sample of schemas, generate greedily and validate the instance
   (``jsonschema`` with format checking, draft taken from ``$schema``).

Prints a table, and ``--json PATH`` writes every number. Compile-only runs load just the
tokenizer when the model is already converted in the cache.

    python -m benchmarks.grammar_bench --prompts 8 --compile-limit 100 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from benchmarks.host import host_info
from router.stats import percentile

if TYPE_CHECKING:
    from decoding.engine import EmbeddedEngine
    from decoding.grammar import GrammarCompiler

DEFAULT_MODEL = "builtin:smollm2-135m-instruct"
SUBSETS = ("Github_trivial", "Github_easy", "Glaiveai2K", "Snowplow", "WashingtonPost")
DECODE_SUBSETS = ("Glaiveai2K", "Github_easy")
OUTCOMES = ("compiled", "unsupported", "unsatisfiable", "invalid", "other")
PROMPT = "Produce a JSON object for this schema: {schema}"

Schema = dict[str, Any] | bool
Named = tuple[str, Schema]  # ("Subset/file.json", schema)


# ---- pure helpers (unit-tested) ---------------------------------------------------------------


def default_data_dir() -> Path:
    """``$SLMGATE_BENCH_DATA``, else ``shared/data/jsonschemabench`` in or beside the checkout."""
    env = os.environ.get("SLMGATE_BENCH_DATA")
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    candidates = [p / "shared" / "data" / "jsonschemabench" for p in here.parents[1:3]]
    return next((c for c in candidates if c.is_dir()), candidates[-1])


def load_subsets(root: Path, names: tuple[str, ...] | None = None) -> dict[str, list[Named]]:
    """``{subset: [(subset/file, schema), ...]}`` sorted by file name (a stable order)."""
    if not root.is_dir():
        raise FileNotFoundError(f"no JSONSchemaBench data at {root} (see --data)")
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    out: dict[str, list[Named]] = {}
    for folder in folders:
        if names is not None and folder.name not in names:
            continue
        files = sorted(folder.glob("*.json"))
        out[folder.name] = [(f"{folder.name}/{f.name}", json.loads(f.read_text())) for f in files]
    return out


def sample_schemas(subsets: dict[str, list[Named]], n: int, seed: int = 0) -> list[Named]:
    """A fixed sample of up to ``n`` schemas: each subset shuffled with one seeded RNG (subsets
    in name order), then drawn round-robin so every subset is represented."""
    rng = random.Random(seed)
    pools = {name: rng.sample(items, len(items)) for name, items in sorted(subsets.items())}
    out: list[Named] = []
    while len(out) < n and any(pools.values()):
        for pool in pools.values():
            if pool and len(out) < n:
                out.append(pool.pop(0))
    return out


def format_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A plain aligned text table: text left-aligned, numbers right-aligned, ``None`` as "-"."""

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.2f}"
        return str(value)

    texts = [[cell(v) for v in row] for row in rows]
    numeric = [
        all(isinstance(row[i], int | float) or row[i] is None for row in rows) and bool(rows)
        for i in range(len(headers))
    ]
    widths = [max([len(h)] + [len(r[i]) for r in texts]) for i, h in enumerate(headers)]

    def line(values: list[str]) -> str:
        cols = zip(values, widths, numeric, strict=True)
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in cols).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), sep, *(line(t) for t in texts)])


def keyword_of(message: str) -> str:
    """The keyword an ``UnsupportedSchemaError`` message names ("(unknown)" when none)."""
    match = re.search(r"keyword '([^']+)'", message)
    return match.group(1) if match else "(unknown)"


def prompt_for(schema: Schema) -> tuple[dict[str, Any], ...]:
    return ({"role": "user", "content": PROMPT.format(schema=json.dumps(schema))},)


# ---- (2) compile ------------------------------------------------------------------------------


@dataclass
class CompileStats:
    counts: Counter[str] = field(default_factory=Counter)
    times_ms: list[float] = field(default_factory=list)  # successful compiles only
    engines: Counter[str] = field(default_factory=Counter)  # xgrammar / outlines-regex
    unsupported_keywords: Counter[str] = field(default_factory=Counter)
    other_errors: Counter[str] = field(default_factory=Counter)
    slowest: tuple[str, float] | None = None  # (schema name, ms) of the slowest compile

    def summary(self) -> dict[str, Any]:
        total = sum(self.counts.values())
        return {
            "total": total,
            **{k: self.counts[k] for k in OUTCOMES},
            "success_rate": self.counts["compiled"] / total if total else None,
            "compile_ms_p50": percentile(self.times_ms, 50),
            "compile_ms_p95": percentile(self.times_ms, 95),
            "compile_ms_max": max(self.times_ms, default=None),
            "slowest": None if self.slowest is None else list(self.slowest),
            "engines": dict(self.engines),
            "unsupported_keywords": dict(self.unsupported_keywords.most_common()),
            "other_errors": dict(self.other_errors.most_common(5)),
        }


def compile_one(
    compiler: GrammarCompiler, schema: Schema, stats: CompileStats, name: str = ""
) -> None:
    """Compile ``schema`` with a fresh cache key (``_compile_uncached``) and record the outcome."""
    from decoding.constraint import JsonSchema
    from schemas.errors import (
        InvalidRequestError,
        UnsatisfiableSchemaError,
        UnsupportedSchemaError,
    )

    started = time.perf_counter()
    try:
        compiled = compiler._compile_uncached(JsonSchema(schema), "response_format")
    except UnsupportedSchemaError as exc:
        stats.counts["unsupported"] += 1
        stats.unsupported_keywords[keyword_of(exc.message)] += 1
    except UnsatisfiableSchemaError:
        stats.counts["unsatisfiable"] += 1
    except InvalidRequestError:
        stats.counts["invalid"] += 1
    except Exception as exc:
        stats.counts["other"] += 1
        stats.other_errors[f"{type(exc).__name__}: {str(exc)[:80]}"] += 1
    else:
        elapsed_ms = (time.perf_counter() - started) * 1e3
        stats.times_ms.append(elapsed_ms)
        if stats.slowest is None or elapsed_ms > stats.slowest[1]:
            stats.slowest = (name, elapsed_ms)
        stats.counts["compiled"] += 1
        stats.engines[compiled.engine] += 1


def bench_compile(
    compiler: GrammarCompiler,
    subsets: dict[str, list[Named]],
    limit: int | None,
    progress: bool = False,
) -> dict[str, dict[str, Any]]:
    """Per subset: outcome counts and compile-time percentiles; plus an ``ALL`` row."""
    everything = CompileStats()
    rows: dict[str, dict[str, Any]] = {}
    for name, items in subsets.items():
        stats = CompileStats()
        started = time.perf_counter()
        for schema_name, schema in items[:limit]:
            compile_one(compiler, schema, stats, schema_name)
        for attr in ("counts", "engines", "unsupported_keywords", "other_errors"):
            getattr(everything, attr).update(getattr(stats, attr))
        everything.times_ms.extend(stats.times_ms)
        if stats.slowest and (not everything.slowest or stats.slowest[1] > everything.slowest[1]):
            everything.slowest = stats.slowest
        rows[name] = stats.summary()
        if progress:
            print(
                f"  compiled {name}: {len(items[:limit])} schemas in "
                f"{time.perf_counter() - started:.1f} s",
                flush=True,
            )
    rows["ALL"] = everything.summary()
    return rows


def compile_table(rows: dict[str, dict[str, Any]]) -> str:
    headers = [
        "subset",
        "schemas",
        "compiled",
        "unsupp",
        "unsat",
        "invalid",
        "other",
        "success%",
        "p50 ms",
        "p95 ms",
        "via outlines",
    ]
    body = [
        [
            name,
            r["total"],
            r["compiled"],
            r["unsupported"],
            r["unsatisfiable"],
            r["invalid"],
            r["other"],
            None if r["success_rate"] is None else 100 * r["success_rate"],
            r["compile_ms_p50"],
            r["compile_ms_p95"],
            r["engines"].get("outlines-regex", 0),
        ]
        for name, r in rows.items()
    ]
    return format_table(headers, body)


# ---- (1) decode -------------------------------------------------------------------------------


def _timed_generate(engine: EmbeddedEngine, request: Any) -> dict[str, Any]:
    """Decode time per token after the first one (prefill, prompt rendering and grammar
    compilation excluded): wall time from the first token event to the finish event divided by
    the tokens emitted after the first."""
    from decoding.backend import FinishEvent

    first = end = None
    tokens = forced = 0
    finish = "stop"
    for event in engine.generate_sync(request):
        now = time.perf_counter()
        if isinstance(event, FinishEvent):
            end, finish = now, event.reason
            continue
        tokens += 1
        forced += int(event.forced)
        if first is None:
            first = now
    ms = None
    if first is not None and end is not None and tokens > 1:
        ms = (end - first) * 1e3 / (tokens - 1)
    return {"tokens": tokens, "forced": forced, "ms_per_token": ms, "finish": finish}


def pick_compilable(engine: EmbeddedEngine, candidates: list[Named], n: int) -> list[Named]:
    """The first ``n`` candidates whose grammar compiles (compiled into the engine's cache, so
    the timed runs do not include compilation)."""
    from decoding.constraint import JsonSchema
    from schemas.errors import InvalidRequestError

    chosen: list[Named] = []
    for name, schema in candidates:
        if len(chosen) >= n:
            break
        try:
            engine.grammars.compile(JsonSchema(schema))
        except InvalidRequestError:
            continue
        chosen.append((name, schema))
    return chosen


def bench_decode(engine: EmbeddedEngine, schemas: list[Named], max_tokens: int) -> dict[str, Any]:
    from decoding.constraint import Constraint, JsonSchema, NoConstraint
    from decoding.types import GenerationRequest, SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    per_prompt: list[dict[str, Any]] = []
    for name, schema in schemas:
        row: dict[str, Any] = {"schema": name}
        # Interleaved per prompt; the order alternates so neither arm always runs second.
        arms: list[tuple[str, Constraint]] = [
            ("unconstrained", NoConstraint()),
            ("constrained", JsonSchema(schema)),
        ]
        if len(per_prompt) % 2:
            arms.reverse()
        for arm, constraint in arms:
            row[arm] = _timed_generate(
                engine, GenerationRequest(prompt_for(schema), params, constraint)
            )
        per_prompt.append(row)

    def median_of(arm: str) -> float | None:
        values = [r[arm]["ms_per_token"] for r in per_prompt if r[arm]["ms_per_token"] is not None]
        return statistics.median(values) if values else None

    plain, constrained = median_of("unconstrained"), median_of("constrained")
    tokens = sum(r["constrained"]["tokens"] for r in per_prompt)
    forced = sum(r["constrained"]["forced"] for r in per_prompt)
    return {
        "prompts": len(per_prompt),
        "max_tokens": max_tokens,
        "ms_per_token_unconstrained": plain,
        "ms_per_token_constrained": constrained,
        "overhead_ratio": constrained / plain if plain and constrained else None,
        "tokens_unconstrained": sum(r["unconstrained"]["tokens"] for r in per_prompt),
        "tokens_constrained": tokens,
        "forced_token_share": forced / tokens if tokens else None,
        "per_prompt": per_prompt,
    }


def decode_table(d: dict[str, Any]) -> str:
    headers = ["arm", "prompts", "tokens", "median ms/token", "forced share"]
    rows = [
        [
            "unconstrained",
            d["prompts"],
            d["tokens_unconstrained"],
            d["ms_per_token_unconstrained"],
            None,
        ],
        [
            "constrained",
            d["prompts"],
            d["tokens_constrained"],
            d["ms_per_token_constrained"],
            d["forced_token_share"],
        ],
    ]
    ratio = d["overhead_ratio"]
    note = "-" if ratio is None else f"{ratio:.2f}x"
    return f"{format_table(headers, rows)}\noverhead (constrained / unconstrained): {note}"


# ---- (3) validity -----------------------------------------------------------------------------


def validity_one(engine: EmbeddedEngine, schema: Schema, max_tokens: int) -> dict[str, Any]:
    """One greedy generation: outcome valid / invalid / truncated / refused / skipped / error."""
    from decoding.constraint import JsonSchema
    from decoding.types import GenerationRequest, SamplingParams
    from schemas.errors import ContextLengthError, InvalidRequestError
    from schemas.jsonschema_utils import validation_errors

    request = GenerationRequest(
        prompt_for(schema), SamplingParams(temperature=0, max_tokens=max_tokens), JsonSchema(schema)
    )
    try:
        result = engine.complete_sync(request)
    except ContextLengthError:
        return {"outcome": "skipped", "detail": "prompt too long for the context"}
    except InvalidRequestError as exc:
        return {"outcome": "refused", "detail": f"{exc.code}: {exc.message[:120]}"}
    except Exception as exc:
        return {"outcome": "error", "detail": f"{type(exc).__name__}: {str(exc)[:120]}"}
    choice = result.choices[0]
    base = {"tokens": len(choice.token_ids), "text": choice.text[:300]}
    if choice.finish_reason == "length":
        return {"outcome": "truncated", "detail": f"hit max_tokens={max_tokens}", **base}
    try:
        instance = json.loads(choice.text)
    except json.JSONDecodeError as exc:
        return {"outcome": "invalid", "detail": f"not JSON: {exc.msg}", **base}
    errors = validation_errors(instance, schema)
    if errors:
        return {"outcome": "invalid", "detail": errors[0][:160], **base}
    return {"outcome": "valid", "detail": "", **base}


VALIDITY_OUTCOMES = ("valid", "invalid", "truncated", "refused", "skipped", "error")


def bench_validity(engine: EmbeddedEngine, schemas: list[Named], max_tokens: int) -> dict[str, Any]:
    samples = [
        {"schema": name, **validity_one(engine, schema, max_tokens)} for name, schema in schemas
    ]
    counts = Counter(s["outcome"] for s in samples)
    finished = counts["valid"] + counts["invalid"]
    return {
        "sampled": len(samples),
        "max_tokens": max_tokens,
        **{k: counts[k] for k in VALIDITY_OUTCOMES},
        "valid_rate": counts["valid"] / len(samples) if samples else None,
        "valid_rate_of_finished": counts["valid"] / finished if finished else None,
        "samples": samples,
    }


def validity_table(v: dict[str, Any]) -> str:
    headers = ["sampled", *VALIDITY_OUTCOMES, "valid% (all)", "valid% (finished)"]
    pct = [None if v[k] is None else 100 * v[k] for k in ("valid_rate", "valid_rate_of_finished")]
    lines = [format_table(headers, [[v["sampled"], *(v[k] for k in VALIDITY_OUTCOMES), *pct]])]
    for s in v["samples"]:
        if s["outcome"] != "valid":
            lines.append(f"  {s['outcome']:9s} {s['schema']}: {s['detail']}")
    return "\n".join(lines)


# ---- machine and model loading ----------------------------------------------------------------


def _package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def machine_info(dtype: str, device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        **host_info(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "xgrammar": _package_version("xgrammar"),
        "transformers": _package_version("transformers"),
        "dtype": dtype,
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def resolve_model(name: str) -> str:
    """``builtin:…``, a bare builtin name (``smollm2-135m-instruct``) or a model directory."""
    from decoding.models import BUILTIN_SOURCES

    if not name.startswith("builtin:") and f"builtin:{name}" in BUILTIN_SOURCES:
        return f"builtin:{name}"
    return name


def tokenizer_compiler(source: str, cache_dir: Path | None) -> GrammarCompiler | None:
    """A grammar compiler built from the tokenizer alone (no weights loaded), or ``None`` when
    the model is a builtin not yet converted into the cache (then the engine load converts it)."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from decoding.engine import stop_token_ids
    from decoding.grammar import GrammarCompiler
    from decoding.loader import default_cache_dir
    from decoding.models import BUILTIN_SOURCES

    if source.startswith("builtin:"):
        directory = (cache_dir or default_cache_dir()) / "models" / BUILTIN_SOURCES[source].sha256
    else:
        directory = Path(source)
    if not (directory / "config.json").is_file():
        return None
    tokenizer = AutoTokenizer.from_pretrained(directory)
    config = AutoConfig.from_pretrained(directory)
    try:
        generation: Any = GenerationConfig.from_pretrained(directory)
    except OSError:  # no generation_config.json: the tokenizer's EOS only
        generation = SimpleNamespace(eos_token_id=None)
    stops = stop_token_ids(SimpleNamespace(generation_config=generation), tokenizer)
    return GrammarCompiler.for_hf_tokenizer(tokenizer, int(config.vocab_size), stops)


# ---- CLI --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="slmgate bench grammar",
        description="Guided decoding side by side: decode overhead, compile rate/time per "
        "JSONSchemaBench subset, validity of generated instances.",
    )
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="builtin name (builtin:smollm2-135m-instruct) or HF model directory",
    )
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="converted-weights cache (default $SLMGATE_CACHE or ~/.cache/slmgate)",
    )
    p.add_argument("--data", type=Path, default=None, help="JSONSchemaBench root (subset dirs)")
    p.add_argument("--prompts", type=int, default=8, help="decode: prompts (default 8)")
    p.add_argument("--decode-tokens", type=int, default=64, help="decode: max_tokens (64)")
    p.add_argument(
        "--compile-limit",
        type=int,
        default=None,
        help="compile: first N schemas per subset (default all)",
    )
    p.add_argument(
        "--validity-sample",
        type=int,
        default=20,
        help="validity: schemas sampled across subsets (default 20)",
    )
    p.add_argument("--validity-tokens", type=int, default=256, help="validity: max_tokens (256)")
    p.add_argument("--seed", type=int, default=0, help="schema sampling seed (default 0)")
    p.add_argument("--skip-decode", action="store_true")
    p.add_argument("--skip-compile", action="store_true")
    p.add_argument("--skip-validity", action="store_true")
    p.add_argument("--json", type=Path, default=None, help="write all numbers to this file")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for flag in ("prompts", "decode_tokens", "validity_sample", "validity_tokens"):
        if getattr(args, flag) < 0:
            raise SystemExit(f"--{flag.replace('_', '-')} must be >= 0")
    if args.compile_limit is not None and args.compile_limit < 0:
        raise SystemExit("--compile-limit must be >= 0")
    run_decode = not args.skip_decode and args.prompts > 0
    run_validity = not args.skip_validity and args.validity_sample > 0
    run_compile = not args.skip_compile

    from decoding.models import ModelSpec

    model = resolve_model(args.model)
    spec = ModelSpec("bench", model, dtype=args.dtype, device=args.device)
    data = args.data or default_data_dir()

    def say(message: str) -> None:
        if not args.quiet:
            print(message, flush=True)

    result: dict[str, Any] = {
        "model": model,
        "machine": machine_info(spec.resolved_dtype(), spec.resolved_device()),
        "data": str(data),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    started = time.perf_counter()

    engine: EmbeddedEngine | None = None
    compiler: GrammarCompiler | None = None
    if run_compile and not (run_decode or run_validity):
        compiler = tokenizer_compiler(model, args.cache_dir)
        if compiler is not None:
            say("compile only: loaded the tokenizer, not the model")
    if (run_decode or run_validity) or (run_compile and compiler is None):
        from decoding.models import load_engine

        say(f"loading {model} ({spec.resolved_dtype()}, {spec.resolved_device()})…")
        engine = load_engine(spec, cache_dir=args.cache_dir, warmup=True)
        compiler = engine.grammars
        result["machine"]["dtype"] = engine.info.dtype
        result["machine"]["device"] = engine.info.device

    try:
        subsets = load_subsets(data) if (run_compile or run_decode or run_validity) else {}
        if run_decode and engine is not None:
            pool = {k: v for k, v in subsets.items() if k in DECODE_SUBSETS}
            candidates = sample_schemas(pool, 4 * args.prompts + 8, seed=args.seed)
            chosen = pick_compilable(engine, candidates, args.prompts)
            say(f"decode: {len(chosen)} prompts, max_tokens {args.decode_tokens}…")
            result["decode"] = bench_decode(engine, chosen, args.decode_tokens)
        if run_compile and compiler is not None:
            say(f"compile: {', '.join(subsets)} (limit {args.compile_limit or 'none'})…")
            result["compile"] = bench_compile(
                compiler, subsets, args.compile_limit, progress=not args.quiet
            )
        if run_validity and engine is not None:
            chosen = sample_schemas(subsets, args.validity_sample, seed=args.seed + 1)
            say(f"validity: {len(chosen)} schemas, max_tokens {args.validity_tokens}…")
            result["validity"] = bench_validity(engine, chosen, args.validity_tokens)
    finally:
        if engine is not None:
            engine.close()
    result["elapsed_s"] = round(time.perf_counter() - started, 1)

    print(render_report(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=str))
        say(f"wrote {args.json}")
    return 0


def render_report(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        f"machine: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), "
        f"torch {m['torch']}, xgrammar {m['xgrammar']}",
        f"model: {result['model']} ({m['dtype']} on {m['device']})",
    ]
    if "decode" in result:
        d = result["decode"]
        lines += [
            "",
            f"(1) decode: greedy, max_tokens {d['max_tokens']}, interleaved per prompt",
            decode_table(d),
        ]
    if "compile" in result:
        lines += [
            "",
            "(2) compile: fresh cache key per schema; p50/p95 over compiled schemas",
            compile_table(result["compile"]),
        ]
        keywords = result["compile"]["ALL"]["unsupported_keywords"]
        if keywords:
            lines.append(
                "unsupported keywords: " + ", ".join(f"{k} {n}" for k, n in keywords.items())
            )
        slowest = result["compile"]["ALL"]["slowest"]
        if slowest:
            lines.append(f"slowest compile: {slowest[0]} ({slowest[1] / 1e3:.1f} s)")
        others = result["compile"]["ALL"]["other_errors"]
        lines += [f"other error: {e} (x{n})" for e, n in others.items()]
    if "validity" in result:
        v = result["validity"]
        lines += [
            "",
            f"(3) validity: greedy, max_tokens {v['max_tokens']}, fixed sample",
            validity_table(v),
        ]
    lines += ["", f"elapsed: {result['elapsed_s']} s"]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
