"""What each built-in tier costs to run here (``slmgate bench tiers``): load time, resident
memory, prefill and decode speed of one stream.

Each model is measured in its own child process, so its memory is its own: load time is
``load_engine`` from the converted cache (run once before to convert; conversion is reported
by the first load, not here), memory is the process's resident set after loading minus before,
and speed is a greedy single-stream answer (no speculation, no grammar) to a fixed prompt, the
median of ``--repeats`` runs after one warm-up: prefill tokens/s = prompt tokens / time to the
first token, decode tokens/s = tokens after the first / the time they took.

    python -m benchmarks.tiers_bench --json tiers.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_SOURCES = (
    "builtin:smollm2-135m-instruct",
    "builtin:qwen2.5-coder-0.5b-instruct",
    "builtin:qwen2.5-coder-1.5b-instruct",
)
PROMPT = (
    "Write a Python function that parses an ISO 8601 date string and returns the weekday "
    "name, with a docstring and two examples."
)


def rss_mib() -> float:
    """This process's resident memory in MiB (Linux ``/proc``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(source: str, max_tokens: int, repeats: int, dtype: str) -> dict[str, Any]:
    """Load ``source`` and time greedy answers; runs in the child process."""
    import torch

    from decoding.models import ModelSpec, load_engine
    from decoding.types import GenerationRequest, SamplingParams, TokenEvent

    before = rss_mib()
    started = time.perf_counter()
    engine = load_engine(ModelSpec("m", source, dtype=dtype, batching=False), warmup=False)
    load_s = time.perf_counter() - started
    memory = rss_mib() - before
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    req = GenerationRequest(
        ({"role": "user", "content": PROMPT},), params=params, speculation="none"
    )
    runs: list[tuple[float, float, int, int]] = []
    for i in range(repeats + 1):  # the first run warms up and is not counted
        t0 = time.perf_counter()
        first: float | None = None
        tokens, prompt_tokens = 0, 0
        for event in engine.generate_sync(req):
            if isinstance(event, TokenEvent):
                tokens += 1
                first = first or time.perf_counter()
            else:
                prompt_tokens = event.prompt_tokens
        end = time.perf_counter()
        if i and first is not None and tokens > 1:
            runs.append((first - t0, end - first, tokens, prompt_tokens))
    ttft = statistics.median(r[0] for r in runs)
    return {
        "source": source,
        "dtype": dtype,
        "load_s": load_s,
        "rss_mib": memory,
        "prompt_tokens": runs[0][3],
        "completion_tokens": statistics.median(r[2] for r in runs),
        "ttft_s": ttft,
        "prefill_tok_s": runs[0][3] / ttft,
        "decode_tok_s": statistics.median((r[2] - 1) / r[1] for r in runs),
        "threads": torch.get_num_threads(),
    }


def render(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| tier model | load s | memory MiB | prompt tok | TTFT s | prefill tok/s | decode tok/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['source'].removeprefix('builtin:')} | {r['load_s']:.1f} | {r['rss_mib']:.0f} "
            f"| {r['prompt_tokens']} | {r['ttft_s']:.2f} | {r['prefill_tok_s']:.0f} "
            f"| {r['decode_tok_s']:.1f} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="slmgate bench tiers", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--sources", default=",".join(DEFAULT_SOURCES), help="comma-separated")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # the child's model
    args = p.parse_args(argv)
    if args.repeats < 1 or args.max_tokens < 2:
        p.error("--repeats >= 1 and --max-tokens >= 2")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one, args.max_tokens, args.repeats, args.dtype)))
        return 0
    rows = []
    for source in (s.strip() for s in args.sources.split(",") if s.strip()):
        child = [sys.executable, "-m", "benchmarks.tiers_bench", "--one", source,
                 "--max-tokens", str(args.max_tokens), "--repeats", str(args.repeats),
                 "--dtype", args.dtype]  # fmt: skip
        out = subprocess.run(child, check=True, capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parents[1])  # fmt: skip
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"measured {source}", file=sys.stderr)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    print(f"Built-in tiers on {machine}, greedy, {args.max_tokens} tokens, median of "
          f"{args.repeats}")  # fmt: skip
    print(render(rows))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
