"""Speculation side by side on replayed agent traffic: plain vs suffix vs STAND vs both (vs Arctic).

Each request is a conversation prefix from a trace (tau-bench replay by default); the model
generates the next assistant turn greedily. Every drafter decodes every request, in an order
rotated per request (the machine is shared, so load drifts hit all drafters alike), with the
same model, and the outputs are compared token by token with plain decoding. Each drafter has
its own pool, warmed over the run as a server's would be: request ``i`` drafts from the
outputs of requests ``< i`` (never from its own output under another drafter).

ArcticInference's ``SuffixDecodingCache`` (``pip install arctic-inference==0.3.0``, optional,
never a dependency) runs as a reference drafter in the same harness when it is installed.

    slmgate bench spec --traces ../shared/data/agent-traces/tau-bench-replay.jsonl --limit 20
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from decoding.engine import EmbeddedEngine
from decoding.prefix_cache import PrefixCache
from decoding.speculative import DrafterPool
from decoding.types import GenerationRequest, SamplingParams, SpecStats, TokenEvent
from schemas.errors import ContextLengthError
from spec.draft import Draft

DEFAULT_TRACES = (
    Path(__file__).resolve().parents[2] / "shared/data/agent-traces/tau-bench-replay.jsonl"
)
MODELS = {
    "slm": "builtin:smollm2-135m-instruct",
    "llm": "builtin:qwen2.5-coder-0.5b-instruct",
}


@dataclass(slots=True)
class Run:
    """One request decoded with one drafter."""

    tokens: list[int]
    prompt_tokens: int
    reused_tokens: int  # prompt positions taken from the prefix cache
    seconds: float  # whole request (prefill included)
    decode_seconds: float  # after the first token
    forward_seconds: float
    spec: SpecStats | None


@dataclass(slots=True)
class Summary:
    drafter: str
    requests: int = 0
    tokens: int = 0
    tokens_per_s: float = 0.0
    decode_tokens_per_s: float = 0.0
    median_speedup: float = 1.0
    decode_speedup: float = 1.0
    mean_accepted_length: float = 1.0
    drafted: int = 0
    accepted: int = 0
    draft_us_per_proposal: float = 0.0
    identical: bool = True
    identical_requests: int = 0
    prompt_tokens: int = 0
    reused_prompt_tokens: int = 0
    time_split: dict[str, float] = field(default_factory=dict)


# ---- requests -----------------------------------------------------------------------------------


def trace_requests(
    path: Path, limit: int, max_messages: int, max_chars: int, system: bool, tools: bool
) -> list[GenerationRequest]:
    """The first ``limit`` requests: every assistant turn's prefix, in file order.

    The prompt may be bounded (its prefill is paid equally by every drafter): the last
    ``max_messages`` messages before the turn, each cut to ``max_chars`` characters (0: no
    bound), plus the system message and the tool definitions if asked for.
    """
    requests: list[GenerationRequest] = []
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            record = json.loads(line)
            messages: list[dict[str, Any]] = record["messages"]
            offered = tuple(record.get("tools") or ()) if tools else ()
            for i, message in enumerate(messages):
                if message.get("role") != "assistant" or i == 0:
                    continue
                head = [m for m in messages[:1] if m.get("role") == "system"]
                first = len(head) if max_messages <= 0 else max(len(head), i - max_messages)
                tail = messages[first:i]
                while tail and tail[0].get("role") == "tool":  # a result without its call
                    tail = tail[1:]
                kept = [_cut(m, max_chars) for m in (head if system else []) + tail]
                rid = str(len(requests))
                requests.append(GenerationRequest(tuple(kept), tools=offered, request_id=rid))
                if len(requests) >= limit:
                    return requests
    return requests


def _cut(message: dict[str, Any], max_chars: int) -> dict[str, Any]:
    content = message.get("content")
    if max_chars > 0 and isinstance(content, str) and len(content) > max_chars:
        return message | {"content": content[:max_chars]}
    return message


# ---- ArcticInference, the reference drafter ---------------------------------------------------


class ArcticDrafter:
    """``arctic_inference``'s SuffixDecodingCache behind the ``spec.Drafter`` lifecycle."""

    def __init__(self, cache: Any, max_depth: int = 64, tree: bool = False) -> None:
        self.cache = cache
        self.max_depth = max_depth
        self.tree = tree
        self._ids: dict[Hashable, int] = {}
        self._next = 0

    def start(self, req_id: Hashable, prompt_ids: Sequence[int]) -> None:
        self._next += 1
        self._ids[req_id] = self._next
        self.cache.start_request(self._next, list(prompt_ids))

    def extend(self, req_id: Hashable, token_ids: Sequence[int]) -> None:
        self.cache.add_active_response(self._ids[req_id], list(token_ids))

    def propose(self, req_id: Hashable, context_ids: Sequence[int], k: int) -> Draft:
        # Every argument explicit: the defaults path raises AttributeError in 0.3.0.
        result = self.cache.speculate(
            self._ids[req_id],
            list(context_ids[-self.max_depth :]),
            max_spec_tokens=k,
            max_spec_factor=1.0,
            max_spec_offset=0.0,
            min_token_prob=0.1,
            use_tree_spec=self.tree,
        )
        tokens = list(result.token_ids)[:k]
        scores = [min(1.0, max(0.0, float(p))) for p in list(result.probs)[: len(tokens)]]
        if not self.tree:
            return Draft.path(tokens, scores)
        return Draft(tuple(tokens), tuple(int(p) for p in list(result.parents)[:k]), tuple(scores))

    def stop(self, req_id: Hashable) -> None:
        self.cache.stop_request(self._ids.pop(req_id))


def arctic_drafter(tree: bool) -> ArcticDrafter | None:
    try:
        from arctic_inference.suffix_decoding import SuffixDecodingCache
    except ImportError:
        return None
    cache = SuffixDecodingCache(max_tree_depth=64, max_cached_requests=1000)
    return ArcticDrafter(cache, tree=tree)


# ---- running ------------------------------------------------------------------------------------


class ForwardTimer:
    """Wraps the engine's forward pass to split time into forward / drafter / the rest."""

    def __init__(self, engine: EmbeddedEngine) -> None:
        self.seconds = 0.0
        inner = engine._forward

        def timed(*args: Any, **kwargs: Any) -> torch.Tensor:
            started = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started

        engine._forward = timed  # type: ignore[method-assign]


def run_one(engine: EmbeddedEngine, timer: ForwardTimer, req: GenerationRequest) -> Run:
    reused_before = engine.prefix_cache.stats.tokens_reused if engine.prefix_cache else 0
    timer.seconds = 0.0
    started = time.perf_counter()
    first = 0.0
    tokens: list[int] = []
    spec: SpecStats | None = None
    prompt_tokens = 0
    for event in engine.generate_sync(req):
        if isinstance(event, TokenEvent):
            if not tokens:
                first = time.perf_counter()
            tokens.append(event.token_id)
        else:
            spec = event.spec
            prompt_tokens = event.prompt_tokens
    ended = time.perf_counter()
    decode = ended - (first or ended)
    reused = (engine.prefix_cache.stats.tokens_reused if engine.prefix_cache else 0) - reused_before
    return Run(tokens, prompt_tokens, reused, ended - started, decode, timer.seconds, spec)


def warm_up(
    engine: EmbeddedEngine, timer: ForwardTimer, req: GenerationRequest, params: SamplingParams
) -> None:
    """The first passes at a new prompt size run several times slower on these VMs: pay that
    once, plainly and speculatively, with a throwaway pool and prefix cache, before anything
    is measured."""
    pools, prefix = engine.drafters, engine.prefix_cache
    engine.drafters = DrafterPool()
    engine.prefix_cache = PrefixCache(engine.config.prefill_block) if prefix else None
    for mode in ("none", "suffix", "suffix"):
        run_one(engine, timer, replace(req, params=params, speculation=mode))
    engine.drafters, engine.prefix_cache = pools, prefix


def fitting(
    engine: EmbeddedEngine, requests: list[GenerationRequest], max_tokens: int
) -> tuple[list[GenerationRequest], int]:
    """The requests whose prompt plus ``max_tokens`` fit the model's context, and how many did
    not (late turns of long conversations outgrow SmolLM2's 8k tokens)."""
    kept: list[GenerationRequest] = []
    for req in requests:
        try:
            engine.prepare(replace(req, params=SamplingParams(max_tokens=max_tokens)))
        except ContextLengthError:
            continue
        kept.append(req)
    return kept, len(requests) - len(kept)


def rotate(items: list[str], by: int) -> Iterator[str]:
    for i in range(len(items)):
        yield items[(i + by) % len(items)]


def summarise(name: str, runs: list[Run], plain: list[Run]) -> Summary:
    tokens = sum(len(r.tokens) for r in runs)
    seconds = sum(r.seconds for r in runs)
    decode_tokens = sum(max(len(r.tokens) - 1, 0) for r in runs)
    decode_seconds = sum(r.decode_seconds for r in runs)
    speedups = [p.seconds / r.seconds for r, p in zip(runs, plain, strict=True)]
    decode_speedups = [
        p.decode_seconds / r.decode_seconds
        for r, p in zip(runs, plain, strict=True)
        if r.decode_seconds > 0 and p.decode_seconds > 0
    ]
    stats = [r.spec for r in runs if r.spec is not None]
    steps = sum(s.steps for s in stats)
    emitted = sum((i + 1) * n for s in stats for i, n in enumerate(s.histogram))
    draft_s = sum(s.draft_us for s in stats) / 1e6
    forward_s = sum(r.forward_seconds for r in runs)
    same = sum(r.tokens == p.tokens for r, p in zip(runs, plain, strict=True))
    return Summary(
        drafter=name,
        requests=len(runs),
        tokens=tokens,
        tokens_per_s=tokens / seconds if seconds else 0.0,
        decode_tokens_per_s=decode_tokens / decode_seconds if decode_seconds else 0.0,
        median_speedup=statistics.median(speedups) if speedups else 1.0,
        decode_speedup=statistics.median(decode_speedups) if decode_speedups else 1.0,
        mean_accepted_length=emitted / steps if steps else 1.0,
        drafted=sum(s.drafted for s in stats),
        accepted=sum(s.accepted for s in stats),
        draft_us_per_proposal=draft_s * 1e6 / steps if steps else 0.0,
        identical=same == len(runs),
        identical_requests=same,
        prompt_tokens=sum(r.prompt_tokens for r in runs),
        reused_prompt_tokens=sum(r.reused_tokens for r in runs),
        time_split={
            "forward": forward_s / seconds if seconds else 0.0,
            "drafter": draft_s / seconds if seconds else 0.0,
            "other": max(0.0, 1 - (forward_s + draft_s) / seconds) if seconds else 0.0,
        },
    )


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "torch": torch.__version__,
    }


def markdown(summaries: list[Summary]) -> str:
    rows = [
        "| drafter | tok/s | decode tok/s | speedup (median) | decode speedup (median) | "
        "mean accepted length | accepted/drafted | drafter µs/proposal | identical | "
        "forward/drafter/other |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        split = "/".join(f"{s.time_split.get(k, 0):.0%}" for k in ("forward", "drafter", "other"))
        rows.append(
            f"| {s.drafter} | {s.tokens_per_s:.1f} | {s.decode_tokens_per_s:.1f} | "
            f"{s.median_speedup:.2f}x | {s.decode_speedup:.2f}x | {s.mean_accepted_length:.2f} | "
            f"{s.accepted}/{s.drafted} | {s.draft_us_per_proposal:.0f} | "
            f"{'yes' if s.identical else f'no ({s.identical_requests}/{s.requests})'} | {split} |"
        )
    return "\n".join(rows)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="slmgate bench spec", description=__doc__)
    parser.add_argument("--traces", type=Path, default=DEFAULT_TRACES)
    parser.add_argument("--limit", type=int, default=20, help="first N requests")
    parser.add_argument("--json", type=Path, default=None, help="write the result here")
    parser.add_argument("--model", choices=sorted(MODELS), default="slm")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--max-messages", type=int, default=6,
                        help="messages kept before each turn")
    parser.add_argument("--max-chars", type=int, default=1500, help="characters per message")
    parser.add_argument("--system", action="store_true", help="keep the system message")
    parser.add_argument("--tools", action="store_true", help="offer the trace's tools")
    parser.add_argument("--drafters", default="plain,suffix,stand,both,arctic")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (1 avoids OpenMP spin-waits on a shared machine)")
    parser.add_argument("--max-draft", type=int, default=None, help="EngineConfig.spec_max_draft")
    parser.add_argument("--paths", action="store_true",
                        help="verify each drafter's best path instead of its whole tree")
    parser.add_argument("--suffix-tree", action="store_true",
                        help="SuffixDecoding drafts best-first trees (SuffixConfig.use_tree)")
    parser.add_argument("--no-prefix-cache", action="store_true",
                        help="prefill every prompt whole (no reuse across requests)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from decoding.models import ModelSpec, load_engine

    # The serial engine: this benchmark swaps its prefix cache and drafters per arm.
    engine = load_engine(
        ModelSpec(args.model, MODELS[args.model], dtype=args.dtype, batching=False)
    )
    if args.max_draft is not None:
        engine.config = replace(engine.config, spec_max_draft=args.max_draft)
    engine.config = replace(engine.config, spec_tree=not args.paths)
    if args.suffix_tree:
        engine.config = replace(
            engine.config, suffix=replace(engine.config.suffix, use_tree=True)
        )
    names = [d.strip() for d in args.drafters.split(",") if d.strip()]
    if "plain" not in names:
        names.insert(0, "plain")
    pools: dict[str, DrafterPool] = {}
    prefixes: dict[str, PrefixCache | None] = {}
    for name in names:
        pools[name] = DrafterPool(engine.config.suffix, engine.config.stand)
        # Each drafter warms its own prefix cache, so none profits from another's prefills.
        prefixes[name] = None if args.no_prefix_cache else PrefixCache(engine.config.prefill_block)
        if name == "arctic":
            reference = arctic_drafter(tree=not args.paths)
            if reference is None:
                print("arctic: arctic_inference not installed; skipped", file=sys.stderr)
                continue
            pools[name].add("arctic", reference)
    names = [n for n in names if n != "arctic" or "arctic" in pools[n].drafters]
    requests, skipped = fitting(
        engine,
        trace_requests(
            args.traces, args.limit, args.max_messages, args.max_chars, args.system, args.tools
        ),
        args.max_tokens,
    )
    if skipped:
        print(f"skipped {skipped} requests longer than the model's context", file=sys.stderr)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    timer = ForwardTimer(engine)
    if args.no_prefix_cache:
        engine.prefix_cache = None
    warm_up(engine, timer, requests[0], params)
    load_before = os.getloadavg()
    runs: dict[str, list[Run]] = {n: [] for n in names}
    for i, base in enumerate(requests):
        for name in rotate(names, i):
            mode = "none" if name == "plain" else name
            engine.drafters = pools[name]
            engine.prefix_cache = prefixes[name]
            req = GenerationRequest(
                base.messages, params, tools=base.tools, request_id=base.request_id,
                speculation=mode,  # type: ignore[arg-type]  # "arctic": a registered drafter
            )  # fmt: skip
            runs[name].append(run_one(engine, timer, req))
        line = "  ".join(f"{n} {len(runs[n][-1].tokens)}t {runs[n][-1].seconds:.2f}s"
                         for n in names)
        print(f"[{i + 1}/{len(requests)}] {line}", file=sys.stderr, flush=True)
    summaries = [summarise(n, runs[n], runs["plain"]) for n in names]
    info = machine() | {"load_average_before": load_before}
    print(markdown(summaries))
    print(
        f"\n{len(requests)} requests ({skipped} skipped: longer than the context), "
        f"model {args.model} ({args.dtype}), max_tokens "
        f"{args.max_tokens}, spec_max_draft {engine.config.spec_max_draft}, "
        f"{'paths' if args.paths else 'trees'}; prompt tokens "
        f"{summaries[0].prompt_tokens}, reused from the prefix cache "
        f"{summaries[0].reused_prompt_tokens}; machine {info}"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "machine": info,
                    "skipped": skipped,
                    "summaries": [asdict(s) for s in summaries],
                    "per_request": {
                        n: [
                            {"tokens": len(r.tokens), "seconds": r.seconds,
                             "prompt_tokens": r.prompt_tokens, "reused": r.reused_tokens,
                             "decode_seconds": r.decode_seconds,
                             "spec": asdict(r.spec) if r.spec else None}
                            for r in runs[n]
                        ]
                        for n in names
                    },
                },
                indent=2,
            )
        )  # fmt: skip
    engine.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
