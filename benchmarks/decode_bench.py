"""Single-stream decode speed (``slmgate bench decode``): the embedded engine in each dtype and
weight quantisation next to llama.cpp on the same GGUF, side by side in one run.

Workloads: a short prompt and a ~4k-token prompt (tau-bench replay conversations, public data in
``../shared/data``), each answered as free text and as JSON under a schema. Every arm gets the
same prompt text (rendered once with the model's chat template), greedy, ``--max-tokens`` new
tokens; decode tokens/s = tokens after the first / the time they took, prefill tokens/s =
prompt tokens / time to the first token; the median of ``--repeats`` runs after one warm-up.
``--replay N`` adds repetitive agent traffic: the first N assistant turns of the tau-bench
replay in order, llama.cpp decoding plainly, the engine arms speculating (``suffix`` by
default: drafts from the prompt and the earlier answers, verified by the model).
Each engine arm runs in its own process (its memory and threads are its own) and also reports
the perplexity of a fixed text (GSM8K's first worked solutions), so a quantisation's quality
cost sits next to its speed.

The llama.cpp arm needs ``llama-cpp-python`` (a benchmark-only install, never a dependency:
``pip install llama-cpp-python==0.3.36``, built from source in ~5 min here); without it the arm
is reported as skipped. It loads the built-in's own GGUF (its own quantisation: Q4_1 for
SmolLM2, Q4_K_M/Q8_0 for the Qwen tiers) with ``n_threads`` = torch's threads, and its JSON
workload uses llama.cpp's grammar from the same schema.

    slmgate bench decode --source builtin:smollm2-135m-instruct --json decode.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SHORT_PROMPT = (
    "Write a Python function that parses an ISO 8601 date string and returns the weekday "
    "name, with a docstring and two examples."
)
LONG_QUESTION = "In three sentences, what do the conversations above say about exchanges?"
JSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "summary": {"type": "string"},
        "steps": {"type": "array", "items": {"type": "string"}},
        "difficulty": {"type": "integer", "minimum": 1, "maximum": 5},
    },
    "required": ["name", "summary", "steps", "difficulty"],
}
JSON_INSTRUCTION = " Answer as JSON with name, summary, steps and difficulty (1-5)."
DEFAULT_ARMS = "bfloat16,bfloat16+int8,bfloat16+int4,float32,bfloat16/serial"
WORKLOADS = ("short/text", "short/json", "4k/text", "4k/json")


@dataclass(frozen=True, slots=True)
class Arm:
    """One engine configuration: ``dtype[+quantization][/serial|/team]``. ``/serial``: the
    serial engine; ``/team``: the batched engine with a second OpenMP team alive (the arm's
    main thread runs torch work before decoding), as every engine ran before the batch driver
    (``decoding.batch_driver``) — the baseline that change is measured against."""

    dtype: str
    quantization: str = "none"
    batching: bool = True
    extra_team: bool = False

    @classmethod
    def parse(cls, text: str) -> Arm:
        body, _, mode = text.partition("/")
        dtype, _, quant = body.partition("+")
        if mode not in ("", "serial", "team"):
            raise ValueError(f"arm {text!r}: the mode after / is 'serial', 'team' or nothing")
        return cls(dtype, quant or "none", mode != "serial", mode == "team")

    @property
    def label(self) -> str:
        quant = "" if self.quantization == "none" else f"+{self.quantization}"
        mode = "/team" if self.extra_team else "" if self.batching else "/serial"
        return f"{self.dtype}{quant}{mode}"


def long_prompt_text(tokenizer: Any, tokens: int) -> str:
    """The first ``tokens`` tokens of the tau-bench replay's conversations, one after another
    (its retail policy, then the dialogues), as one text."""
    parts: list[str] = []
    with (DATA / "agent-traces" / "tau-bench-replay.jsonl").open() as f:
        for line in f:
            for message in json.loads(line)["messages"]:
                if isinstance(message.get("content"), str) and message["content"]:
                    parts.append(f"{message['role']}: {message['content']}")
            ids = tokenizer.encode("\n\n".join(parts), add_special_tokens=False)
            if len(ids) >= tokens:
                return str(tokenizer.decode(ids[:tokens]))
    raise ValueError(f"the replay holds fewer than {tokens} tokens")


def perplexity_text(limit_chars: int = 6000) -> str:
    """A fixed text for perplexity: GSM8K's first worked solutions, questions and answers."""
    parts: list[str] = []
    with (DATA / "gsm8k" / "train-1000.jsonl").open() as f:
        for line in f:
            item = json.loads(line)
            parts.append(f"Question: {item['question']}\nAnswer: {item['answer']}\n")
            if sum(map(len, parts)) >= limit_chars:
                break
    return "".join(parts)


def workloads(tokenizer: Any, long_text: str, run: int) -> list[dict[str, Any]]:
    """The four workloads of run ``run`` (the same prompts for every arm; ``long_text`` from
    ``long_prompt_text``). Each run's prompts begin with its own number, so no run reuses an
    earlier run's cached prompt (the batched engine shares cached blocks across requests;
    llama.cpp keeps its last prompt)."""
    from decoding.chat_template import render_prompt

    result: list[dict[str, Any]] = []
    for name in ("short", "4k"):
        for form in ("text", "json"):
            tag = f"Run {run}, {form}. "  # no workload shares a prompt's first block either
            messages = (
                [{"role": "user", "content": tag + SHORT_PROMPT}] if name == "short" else
                [{"role": "system", "content": tag + long_text},
                 {"role": "user", "content": LONG_QUESTION}]
            )  # fmt: skip
            if form == "json":
                asked = messages[-1]["content"] + JSON_INSTRUCTION
                messages = [*messages[:-1], {"role": "user", "content": asked}]
            ids = render_prompt(tokenizer, messages)
            result.append({"name": f"{name}/{form}", "messages": messages, "prompt_ids": ids,
                           "schema": JSON_SCHEMA if form == "json" else None})  # fmt: skip
    return result


def _timed(stream: Any) -> tuple[float, float, int]:
    """(time to the first token, time after it, tokens) of an iterator of token events."""
    started = time.perf_counter()
    first: float | None = None
    tokens = 0
    for _ in stream:
        tokens += 1
        first = first or time.perf_counter()
    end = time.perf_counter()
    assert first is not None, "no token was produced"
    return first - started, end - first, tokens


def _measure_workloads(
    tokenizer: Any,
    args: argparse.Namespace,
    stream: Callable[[dict[str, Any]], Iterable[Any]],
) -> dict[str, Any]:
    """Each selected workload's summary: ``stream(work)`` yields one run's tokens; every run
    has its own prompts (``workloads``), and the first run warms up and is not counted."""
    long_text = long_prompt_text(tokenizer, args.long_tokens)
    per_run = [workloads(tokenizer, long_text, i) for i in range(args.repeats + 1)]
    rows: dict[str, Any] = {}
    for k, work in enumerate(per_run[0]):
        if work["name"] in args.workloads:
            runs = [_timed(stream(run[k])) for run in per_run][1:]
            rows[work["name"]] = _summary(runs, len(per_run[-1][k]["prompt_ids"]))
    return rows


def _summary(runs: list[tuple[float, float, int]], prompt_tokens: int) -> dict[str, Any]:
    ttft = statistics.median(r[0] for r in runs)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": statistics.median(r[2] for r in runs),
        "ttft_s": ttft,
        "prefill_tok_s": prompt_tokens / ttft,
        "decode_tok_s": statistics.median((r[2] - 1) / r[1] for r in runs if r[2] > 1),
    }


def measure_engine(source: str, arm: Arm, args: argparse.Namespace) -> dict[str, Any]:
    """One engine arm (in its own process): every workload, then the perplexity."""
    import torch

    from decoding.constraint import Constraint, JsonSchema, NoConstraint
    from decoding.models import ModelSpec, load_engine
    from decoding.types import GenerationRequest, SamplingParams, TokenEvent

    spec = ModelSpec("m", source, dtype=arm.dtype, batching=arm.batching,
                     quantization=arm.quantization, prefix_cache_tokens=0)  # fmt: skip
    engine = load_engine(spec, warmup=False)
    if arm.extra_team:  # a parallel region on this thread: its OpenMP team stays alive
        torch.randn(1 << 22).sum()
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)

    def tokens(work: dict[str, Any]) -> Iterable[Any]:
        schema = work["schema"]
        constraint: Constraint = JsonSchema(schema) if schema else NoConstraint()
        req = GenerationRequest(tuple(work["messages"]), params=params, constraint=constraint,
                                speculation="none")  # fmt: skip
        return (e for e in engine.generate_sync(req) if isinstance(e, TokenEvent))

    rows = _measure_workloads(engine.tokenizer, args, tokens)
    if args.replay:

        def stream(req: Any) -> Iterable[Any]:
            speculating = replace(req, speculation=args.replay_speculation)
            return (e for e in engine.generate_sync(speculating) if isinstance(e, TokenEvent))

        rows["replay"] = _replay(args, stream)
    return {"arm": arm.label, "workloads": rows, "threads": torch.get_num_threads(),
            "perplexity": engine_perplexity(engine, perplexity_text())}  # fmt: skip


def replay_requests(args: argparse.Namespace) -> list[Any]:
    """The first ``--replay`` assistant turns of the tau-bench replay, greedy (the prompts of
    ``slmgate bench spec``: the last 6 messages, each cut to 1500 characters)."""
    from benchmarks.spec_bench import DEFAULT_TRACES, trace_requests
    from decoding.types import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    requests = trace_requests(DEFAULT_TRACES, args.replay, 6, 1500, False, False)
    return [replace(req, params=params) for req in requests]


def _replay(args: argparse.Namespace, stream: Callable[[Any], Iterable[Any]]) -> dict[str, Any]:
    """The replay's requests in order through ``stream`` (a request's token events): decode
    tokens/s over all of them (tokens after each first / the time they took, summed)."""
    runs = [_timed(stream(req)) for req in replay_requests(args)]
    decode_s = sum(r[1] for r in runs)
    return {
        "requests": len(runs),
        "completion_tokens": sum(r[2] for r in runs),
        "ttft_s": statistics.median(r[0] for r in runs),
        "prefill_tok_s": float("nan"),
        "decode_tok_s": sum(r[2] - 1 for r in runs) / decode_s if decode_s else float("nan"),
    }


def engine_perplexity(engine: Any, text: str, window: int = 512) -> float:
    """exp(mean negative log-likelihood) of ``text`` under the engine's model, in windows of
    ``window`` tokens (each scored on its own), computed in float32 from the model's logits."""
    import torch

    ids = engine.tokenizer.encode(text, add_special_tokens=False)
    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(ids) - 1, window):
            chunk = torch.tensor([ids[start : start + window + 1]])
            logits = engine.model(input_ids=chunk[:, :-1], use_cache=False).logits[0].float()
            nll = torch.nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="sum")
            total += float(nll)
            count += chunk.shape[1] - 1
    return math.exp(total / count)


def measure_llamacpp(source: str, args: argparse.Namespace) -> dict[str, Any]:
    """The llama.cpp arm on the built-in's GGUF (in its own process)."""
    import torch
    from llama_cpp import Llama, LlamaGrammar

    from decoding.loader import default_cache_dir, load_gguf_source
    from decoding.models import BUILTIN_SOURCES
    from decoding.weights import assemble_gguf

    gguf = assemble_gguf(BUILTIN_SOURCES[source], default_cache_dir() / "gguf")
    tokenizer = load_gguf_source(BUILTIN_SOURCES[source], "float32", "cpu").tokenizer
    threads = torch.get_num_threads()
    llm = Llama(str(gguf), n_ctx=args.long_tokens + 512, n_threads=threads,
                n_threads_batch=threads, verbose=False, logits_all=False)  # fmt: skip
    grammar = LlamaGrammar.from_json_schema(json.dumps(JSON_SCHEMA), verbose=False)

    def tokens(work: dict[str, Any]) -> Iterable[Any]:
        llm.reset()  # no reuse of the previous run's prompt cache
        return llm.create_completion(
            list(work["prompt_ids"]), max_tokens=args.max_tokens, temperature=0.0, top_k=1,
            stream=True, grammar=grammar if work["schema"] else None,
        )  # fmt: skip

    rows = _measure_workloads(tokenizer, args, tokens)
    if args.replay:
        from decoding.chat_template import render_prompt

        def stream(req: Any) -> Iterable[Any]:
            llm.reset()
            ids = render_prompt(tokenizer, list(req.messages), list(req.tools))
            return llm.create_completion(ids, max_tokens=args.max_tokens, temperature=0.0,
                                         top_k=1, stream=True)  # fmt: skip

        rows["replay"] = _replay(args, stream)
    return {"arm": f"llama.cpp ({gguf.name})", "workloads": rows, "threads": threads,
            "perplexity": None}  # fmt: skip


def render(report: dict[str, Any]) -> str:
    arms = report["arms"]
    measured = [a for a in arms if a.get("workloads")]
    names = list(measured[0]["workloads"]) if measured else []
    # Ratios are to llama.cpp, or without it to the first arm measured.
    base = next((a for a in measured if a["arm"].startswith("llama.cpp")), None)
    base = base or (measured[0] if measured else None)
    head = "| arm | perplexity | " + " | ".join(f"{n} decode tok/s" for n in names)
    lines = [head + " | 4k/text prefill tok/s |", "|---" * (len(names) + 3) + "|"]
    for a in arms:
        if not a.get("workloads"):
            lines.append(f"| {a['arm']} | skipped: {a.get('skipped', '?')} |")
            continue
        cells = []
        for n in names:
            tok_s = a["workloads"][n]["decode_tok_s"]
            ratio = ""
            if base is not None and base is not a:
                ratio = f" ({tok_s / base['workloads'][n]['decode_tok_s']:.2f}x)"
            cells.append(f"{tok_s:.1f}{ratio}")
        ppl = "n/a" if a.get("perplexity") is None else f"{a['perplexity']:.3f}"
        prefill = a["workloads"].get("4k/text", {}).get("prefill_tok_s", float("nan"))
        lines.append(f"| {a['arm']} | {ppl} | " + " | ".join(cells) + f" | {prefill:.0f} |")
    ratio_note = f" (x: ratio to {base['arm']} on the same workload)" if base else ""
    return "\n".join(lines) + f"\n\n{report['machine']}{ratio_note}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="slmgate bench decode", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--source", default="builtin:smollm2-135m-instruct")
    p.add_argument("--arms", default=DEFAULT_ARMS,
                   help="comma-separated dtype[+int8|+int4][/serial]")  # fmt: skip
    p.add_argument("--no-llamacpp", action="store_true", help="leave the llama.cpp arm out")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--long-tokens", type=int, default=4000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workloads", default=",".join(WORKLOADS),
                   help=f"comma-separated, of {', '.join(WORKLOADS)}")  # fmt: skip
    p.add_argument("--replay", type=int, default=16,
                   help="tau-bench replay requests (0: none); engine arms speculate on them")
    p.add_argument("--replay-speculation", default="suffix",
                   help="the engine arms' speculation on the replay (llama.cpp: none)")  # fmt: skip
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # the child's arm
    args = p.parse_args(argv)
    args.workloads = tuple(args.workloads.split(",")) if args.workloads else ()
    if set(args.workloads) - set(WORKLOADS):
        p.error(f"--workloads: choose from {', '.join(WORKLOADS)}")
    if args.repeats < 1 or args.max_tokens < 2 or args.long_tokens < 16:
        p.error("--repeats >= 1, --max-tokens >= 2, --long-tokens >= 16")
    for text in args.arms.split(","):
        Arm.parse(text)
    return args


def _child(args: argparse.Namespace, arm: str) -> dict[str, Any]:
    """Run one arm in a fresh process and read its JSON line."""
    cmd = [sys.executable, "-m", "benchmarks.decode_bench", "--one", arm, "--source", args.source,
           "--max-tokens", str(args.max_tokens), "--long-tokens", str(args.long_tokens),
           "--repeats", str(args.repeats), "--replay", str(args.replay),
           "--workloads", ",".join(args.workloads),
           "--replay-speculation", args.replay_speculation]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, check=False,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})  # fmt: skip
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or ["failed"])[-1]
        return {"arm": arm, "skipped": reason[:200]}
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.one is not None:
        if args.one == "llama.cpp":
            result = measure_llamacpp(args.source, args)
        else:
            result = measure_engine(args.source, Arm.parse(args.one), args)
        print(json.dumps(result))
        return 0
    arms = [] if args.no_llamacpp else ["llama.cpp"]
    arms += args.arms.split(",")
    results = []
    for arm in arms:
        print(f"measuring {arm} …", file=sys.stderr, flush=True)
        results.append(_child(args, arm))
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
               f"Python {platform.python_version()}, {args.source}, greedy, "
               f"{args.max_tokens} new tokens, median of {args.repeats}")  # fmt: skip
    settings = {k: str(v) for k, v in vars(args).items()}
    report = {"machine": machine, "arms": results, "args": settings}
    print(render(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
