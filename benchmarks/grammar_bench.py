"""Guided-decoding benchmark, side by side in one process (``slmgate bench grammar``), for each
grammar engine setting (``--engines``, default xgrammar, llguidance and auto):

1. decode: per-token decode time unconstrained and with each engine on the same prompts
   (greedy, interleaved per prompt so machine drift hits every arm alike), the ratios, the
   share of tokens the grammar forced, and the time to compute one token mask (each arm's
   output replayed through a fresh matcher, model excluded);
2. compile: success, timeouts and compile-time p50/p95/max over every schema of every
   JSONSchemaBench subset, each compile from scratch under the request deadline, per engine,
   and whether ``auto`` compiles at least the union of the named engines
   (``benchmarks.grammar_compile_bench``);
3. validity: on a fixed, seeded sample of schemas, generate greedily per engine and validate
   the instance (``jsonschema`` with format checking, draft taken from ``$schema``); then the
   same requests with ``strict: true`` through the router, as a caller receives them
   (``benchmarks.grammar_decode_bench``).

Prints a table, and ``--json PATH`` writes every number. Compile-only runs load just the
tokenizer when the model is already converted in the cache.

    python -m benchmarks.grammar_bench --prompts 8 --compile-limit 100 --json out.json
"""

from __future__ import annotations

import argparse
import json
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from benchmarks.grammar_compile_bench import OUTCOMES, bench_compile, compile_report, compile_table
from benchmarks.grammar_data import (
    SUBSETS,
    Named,
    default_data_dir,
    format_table,
    keyword_of,
    load_subsets,
    prompt_for,
    sample_schemas,
)
from benchmarks.grammar_decode_bench import (
    bench_decode,
    bench_validity,
    decode_table,
    pick_compilable,
    validity_table,
)
from benchmarks.host import host_info
from router.stats import percentile

if TYPE_CHECKING:
    from decoding.constraint import GrammarEngine
    from decoding.engine import EmbeddedEngine
    from decoding.grammar import GrammarCompiler

__all__ = [
    "OUTCOMES", "SUBSETS", "Named", "bench_compile", "compile_table", "default_data_dir",
    "format_table", "keyword_of", "load_subsets", "main", "percentile", "prompt_for",
    "sample_schemas",
]  # fmt: skip

DEFAULT_MODEL = "builtin:smollm2-135m-instruct"
DECODE_SUBSETS = ("Glaiveai2K", "Github_easy")
ENGINES = ("xgrammar", "llguidance", "auto")


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
        "llguidance": _package_version("llguidance"),
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
        description="Guided decoding side by side, per grammar engine: decode overhead and "
        "mask time, compile rate/time per JSONSchemaBench subset, validity of generated "
        "instances (raw and strict through the router).",
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
    p.add_argument(
        "--engines",
        default=",".join(ENGINES),
        help="comma-separated grammar_engine settings to compare (default: all three)",
    )
    p.add_argument("--prompts", type=int, default=8, help="decode: prompts (default 8)")
    p.add_argument("--decode-tokens", type=int, default=64, help="decode: max_tokens (64)")
    p.add_argument(
        "--compile-limit",
        type=int,
        default=None,
        help="compile: first N schemas per subset (default all)",
    )
    p.add_argument(
        "--compile-deadline",
        type=float,
        default=None,
        help="compile: seconds a request waits (default limits.grammar_compile_timeout_s; "
        "0: no deadline)",
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
    p.add_argument("--skip-strict", action="store_true", help="validity: no router/strict arm")
    p.add_argument("--json", type=Path, default=None, help="write all numbers to this file")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def parse_engines(text: str) -> tuple[GrammarEngine, ...]:
    from decoding.engine_choice import parse_grammar_engine

    try:
        return tuple(parse_grammar_engine(e.strip()) for e in text.split(",") if e.strip())
    except Exception as exc:
        raise SystemExit(f"--engines: {exc}") from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for flag in ("prompts", "decode_tokens", "validity_sample", "validity_tokens"):
        if getattr(args, flag) < 0:
            raise SystemExit(f"--{flag.replace('_', '-')} must be >= 0")
    if args.compile_limit is not None and args.compile_limit < 0:
        raise SystemExit("--compile-limit must be >= 0")
    engines = parse_engines(args.engines)
    if not engines:
        raise SystemExit("--engines: name at least one engine")
    run_decode = not args.skip_decode and args.prompts > 0
    run_validity = not args.skip_validity and args.validity_sample > 0
    run_compile = not args.skip_compile

    from decoding.grammar_compile import GrammarLimits
    from decoding.models import ModelSpec

    deadline = args.compile_deadline
    if deadline is None:
        deadline = GrammarLimits().compile_timeout_s
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
        "engines": list(engines),
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
            chosen = pick_compilable(engine, candidates, args.prompts, engines)
            say(f"decode: {len(chosen)} prompts, max_tokens {args.decode_tokens}, "
                f"arms unconstrained + {', '.join(engines)}…")  # fmt: skip
            result["decode"] = bench_decode(engine, chosen, args.decode_tokens, engines)
        if run_compile and compiler is not None:
            result["compile_deadline_s"] = deadline or None
            result["compile"] = {}
            for grammar_engine in engines:
                say(f"compile [{grammar_engine}]: {', '.join(subsets)} "
                    f"(limit {args.compile_limit or 'none'})…")  # fmt: skip
                result["compile"][grammar_engine] = bench_compile(
                    compiler, subsets, args.compile_limit, progress=not args.quiet,
                    engine=grammar_engine, deadline_s=deadline or None,
                )  # fmt: skip
        if run_validity and engine is not None:
            chosen = sample_schemas(subsets, args.validity_sample, seed=args.seed + 1)
            say(f"validity: {len(chosen)} schemas, max_tokens {args.validity_tokens}…")
            result["validity"] = bench_validity(
                engine, chosen, args.validity_tokens, engines, strict=not args.skip_strict
            )
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
        f"torch {m['torch']}, xgrammar {m['xgrammar']}, llguidance {m.get('llguidance')}",
        f"model: {result['model']} ({m['dtype']} on {m['device']})",
    ]
    if "decode" in result:
        d = result["decode"]
        lines += [
            "",
            f"(1) decode: {d['prompts']} prompts, greedy, max_tokens {d['max_tokens']}, "
            "arms interleaved per prompt; mask time replayed without the model",
            decode_table(d),
        ]
    if "compile" in result:
        lines += compile_report(result["compile"], result.get("compile_deadline_s"))
    if "validity" in result:
        v = result["validity"]
        lines += [
            "",
            f"(3) validity: {v['sampled']} schemas, greedy, max_tokens {v['max_tokens']}",
            validity_table(v),
        ]
    lines += ["", f"elapsed: {result['elapsed_s']} s"]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
