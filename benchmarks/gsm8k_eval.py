"""GSM8K through a live gateway (``slmgate eval gsm8k``): accuracy, latency, the large tier's
generated tokens and cost per correct answer for each routing policy.

Every problem of a fixed slice (``../shared/data/gsm8k/train-1000.jsonl``; the gold answer is
the number after ``####``) is sent once per policy — the policy is the request's model name:
``slm``, ``llm``, ``auto`` (the cascade), ``reason`` (SpecReason) — interleaved problem by
problem, one request at a time, so latencies are single-stream and drift hits every policy
alike. A reply is correct when the number after its last ``####`` (else its last number) equals
the gold answer.

    python -m benchmarks.gsm8k_eval --serve --limit 10 --policies slm,llm,auto,reason

``--format json`` asks for the same solution as a JSON schema instead (``steps``, then a numeric
``answer``; correct only when the reply parses and its ``answer`` equals the gold), so the two
kinds of request a deferral rule tells apart besides tool calls, free text and JSON, both get
labelled answers: ``--labels FILE`` writes one row per answer of ``--label-policy`` (its
signals, its kind, right or wrong) for ``slmgate calibrate``. ``--concurrency N`` keeps N
requests in flight (the batching engine serves them together; latencies are then not
single-stream).

Per policy: accuracy, p50 and mean latency, the large tier's generated tokens (every attempt on
the route's top tier: steps it wrote and one-token judgements) and cost per correct answer; and
each policy's latency against ``--baseline`` (default ``llm``) as a ratio of means.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from benchmarks.bfcl_eval import numeric_signals, serve_gateway
from router.stats import percentile

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "train-1000.jsonl"
SYSTEM_PROMPT = (
    "Solve the math problem step by step. Write each step on its own line, with a blank line "
    "between steps. Finish with a last line of the form '#### <number>'."
)
JSON_SYSTEM_PROMPT = (
    "Solve the math problem step by step. Reply with a JSON object: 'steps', your reasoning as "
    "a list of sentences, each working out one quantity with its arithmetic, then 'answer', "
    "the final number."
)
ANSWER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "steps": {"type": "array", "items": {"type": "string"}},
        "answer": {"type": "number"},
    },
    "required": ["steps", "answer"],
    "additionalProperties": False,
}
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


@dataclass(frozen=True, slots=True)
class Problem:
    index: int
    question: str
    gold: str


def load_problems(path: Path, offset: int, limit: int | None) -> list[Problem]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    chosen = rows[offset:] if limit is None else rows[offset : offset + limit]
    return [
        Problem(offset + i, r["question"], final_number(r["answer"]) or "")
        for i, r in enumerate(chosen)
    ]


def final_number(text: str) -> str | None:
    """The answer a solution gives: the number in its last ``\\boxed{}``, else the number on
    its last line when that line starts with ``####`` (the format asked for), else its last
    number. Small models write ``#### 1``, ``#### 2``, ... as step headings, so a ``####``
    anywhere but the last line is not the answer. Commas and a trailing ``.0`` are dropped so
    ``1,000`` and ``1000.0`` read as ``1000``.

    >>> final_number("so 3 + 4 = 7.\\n#### 7"), final_number("It costs $1,250.00 in all.")
    ('7', '1250')
    >>> final_number("#### 1\\nJoe: 23.\\n#### 2\\nTammy: 30.\\nThe answer is \\\\boxed{30}")
    '30'
    >>> final_number("#### 1\\nDerek caught 42.\\n#### 2\\nSo Tammy caught 30 times.")
    '30'
    >>> final_number("no numbers") is None
    True
    """
    boxed = [n for b in _BOXED.findall(text) for n in _NUMBER.findall(b)[-1:]]
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    if boxed:
        value = str(boxed[-1])
    elif last.startswith("####") and (numbers := _NUMBER.findall(last)):
        value = str(numbers[0])
    elif numbers := _NUMBER.findall(text):
        value = str(numbers[-1])
    else:
        return None
    value = value.replace(",", "")
    if "." in value:
        value = value.rstrip("0").rstrip(".")
    return value


def json_answer(text: str) -> str | None:
    """The ``answer`` of a JSON reply, normalised like :func:`final_number`; None when the reply
    is not a JSON object with a numeric answer (a cut or malformed reply is a wrong one).

    >>> json_answer('{"steps": ["3 + 4 = 7"], "answer": 7.0}'), json_answer('{"steps": [')
    ('7', None)
    """
    try:
        data = json.loads(text)
    except ValueError:
        return None
    value = data.get("answer") if isinstance(data, dict) else None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return final_number(repr(value) if isinstance(value, float) else str(value))


def request_body(problem: Problem, policy: str, max_tokens: int, fmt: str) -> dict[str, Any]:
    """The chat request for one problem: free text ending in ``#### N``, or a JSON schema."""
    system = JSON_SYSTEM_PROMPT if fmt == "json" else SYSTEM_PROMPT
    body: dict[str, Any] = {
        "model": policy,
        "messages": [{"role": "system", "content": system},
                     {"role": "user", "content": problem.question}],
        "temperature": 0,
        "max_tokens": max_tokens,
    }  # fmt: skip
    if fmt == "json":
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "solution", "strict": True, "schema": ANSWER_SCHEMA},
        }
    return body


@dataclass(slots=True)
class Record:
    index: int
    policy: str
    kind: str = "text"  # the deferral rule's kind of request: "text" or "json"
    correct: bool = False
    answer: str | None = None
    error: str | None = None
    latency_s: float = 0.0
    completion_tokens: int = 0
    top_tier_tokens: int = 0  # generated by the route's top tier (``llm``), judgements included
    cost_usd: float = 0.0
    tier: str | None = None
    reasoning: dict[str, Any] | None = None
    attempts: list[dict[str, Any]] = field(default_factory=list)
    signals: dict[str, float] = field(default_factory=dict)
    text: str = ""  # the reply, kept so answers can be re-read


def run_problem(client: httpx.Client, problem: Problem, policy: str, max_tokens: int,
                top_tier: str, fmt: str = "text") -> Record:  # fmt: skip
    record = Record(problem.index, policy, kind=fmt)
    body = request_body(problem, policy, max_tokens, fmt)
    started = time.perf_counter()
    try:
        response = client.post("/v1/chat/completions", json=body)
        record.latency_s = time.perf_counter() - started
        if response.status_code != 200:
            record.error = f"http_{response.status_code}: {response.text[:200]}"
            return record
        reply = response.json()
    except (httpx.HTTPError, ValueError) as exc:
        record.latency_s = time.perf_counter() - started
        record.error = f"{type(exc).__name__}: {exc}"[:300]
        return record
    text = reply["choices"][0]["message"].get("content") or ""
    record.text = text
    record.answer = json_answer(text) if fmt == "json" else final_number(text)
    record.correct = record.answer is not None and record.answer == problem.gold
    record.completion_tokens = int(reply.get("usage", {}).get("completion_tokens") or 0)
    facts = reply.get("slmgate") or {}
    record.cost_usd = float(facts.get("cost_usd") or 0.0)
    record.tier = facts.get("tier")
    record.reasoning = facts.get("specreason")
    record.attempts = [a for a in facts.get("attempts") or [] if isinstance(a, dict)]
    record.signals = numeric_signals(facts)
    record.top_tier_tokens = sum(
        int(a.get("completion_tokens") or 0) for a in record.attempts if a.get("tier") == top_tier
    )
    return record


def summarize(records: Sequence[Record], policy: str) -> dict[str, Any]:
    rows = [r for r in records if r.policy == policy]
    correct = sum(r.correct for r in rows)
    latencies = sorted(r.latency_s for r in rows if r.error is None)
    cost = sum(r.cost_usd for r in rows)
    return {
        "policy": policy,
        "problems": len(rows),
        "correct": correct,
        "accuracy": correct / len(rows) if rows else None,
        "errors": sum(r.error is not None for r in rows),
        "p50_latency_s": percentile(latencies, 50),
        "mean_latency_s": sum(latencies) / len(latencies) if latencies else None,
        "completion_tokens": sum(r.completion_tokens for r in rows),
        "top_tier_tokens": sum(r.top_tier_tokens for r in rows),
        "cost_usd": cost,
        "cost_per_correct_usd": cost / correct if correct else None,
        "step_acceptance": _acceptance(rows),
    }


def label_rows(records: Sequence[Record], policy: str) -> list[dict[str, Any]]:
    """Rows for ``slmgate calibrate --labels``: one policy's signals, kind and verdict. Answers
    whose request failed carry no signals and are left out."""
    return [
        {"signals": r.signals, "kind": r.kind, "success": r.correct, "id": f"gsm8k-{r.index}"}
        for r in records
        if r.policy == policy and r.error is None and r.signals
    ]


def _acceptance(rows: Sequence[Record]) -> float | None:
    judged = sum(int((r.reasoning or {}).get("judged") or 0) for r in rows)
    kept = sum(int((r.reasoning or {}).get("kept") or 0) for r in rows)
    return kept / judged if judged else None


def render(summaries: Sequence[dict[str, Any]], baseline: str) -> str:
    base = next((s for s in summaries if s["policy"] == baseline), None)
    lines = [
        f"| policy | accuracy | p50 latency | mean latency | speed-up vs {baseline} (means) "
        "| top-tier tokens | cost per correct | steps kept |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        speedup = (
            base["mean_latency_s"] / s["mean_latency_s"]
            if base and base["mean_latency_s"] and s["mean_latency_s"]
            else None
        )
        cpc = s["cost_per_correct_usd"]
        lines.append(
            f"| {s['policy']} | {s['correct']}/{s['problems']} "
            f"({_pct(s['accuracy'])}) | {_sec(s['p50_latency_s'])} | {_sec(s['mean_latency_s'])} "
            f"| {'-' if speedup is None else f'{speedup:.2f}x'} | {s['top_tier_tokens']} "
            f"| {'-' if cpc is None else f'${cpc:.6f}'} "
            f"| {_pct(s['step_acceptance'])} |"
        )
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _sec(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f} s"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="slmgate eval gsm8k", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--base-url", default=None, help="a running gateway; else --serve starts one")
    p.add_argument("--serve", action="store_true", help="start `slmgate serve` on a free port")
    p.add_argument("--config", default=None, help="config file for --serve")
    p.add_argument("--ready-timeout", type=float, default=900.0)
    p.add_argument("--api-key", default="none")
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--policies", default="slm,llm,auto,reason")
    p.add_argument("--baseline", default="llm", help="the policy latencies are compared with")
    p.add_argument("--top-tier", default="llm", help="tier whose generated tokens are counted")
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--limit", type=int, default=10)
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--format", choices=("text", "json"), default="text",
                   help="free text ending in '#### N', or a JSON schema with a numeric answer")
    p.add_argument("--concurrency", type=int, default=1,
                   help="requests in flight (problem by problem, policies interleaved)")
    p.add_argument("--labels", type=Path, default=None,
                   help="write --label-policy's answers as labelled rows for slmgate calibrate")
    p.add_argument("--label-policy", default="slm")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per request")
    p.add_argument("--json", type=Path, default=None, help="write summaries and every record")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import contextlib
    import platform

    args = parse_args(argv)
    problems = load_problems(args.data, args.offset, args.limit)
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    records: list[Record] = []
    with contextlib.ExitStack() as stack:
        base = args.base_url
        if base is None or args.serve:
            base = stack.enter_context(serve_gateway(args.config, args.ready_timeout))
        headers = {"Authorization": f"Bearer {args.api_key}"}
        limits = httpx.Limits(max_connections=max(args.concurrency, 1))
        with (
            httpx.Client(base_url=base, timeout=args.timeout, headers=headers,
                         limits=limits) as client,
            ThreadPoolExecutor(max(args.concurrency, 1)) as pool,
        ):  # fmt: skip
            jobs = [(problem, policy) for problem in problems for policy in policies]
            futures = [
                pool.submit(run_problem, client, problem, policy, args.max_tokens,
                            args.top_tier, args.format)
                for problem, policy in jobs
            ]  # fmt: skip
            for (problem, policy), future in zip(jobs, futures, strict=True):
                r = future.result()
                records.append(r)
                if not args.quiet:
                    print(f"[{problem.index}] {policy}: {'ok' if r.correct else 'no'} "
                          f"({r.answer} vs {problem.gold}), {r.latency_s:.1f} s, "
                          f"{r.top_tier_tokens} top-tier tokens", file=sys.stderr)  # fmt: skip
    summaries = [summarize(records, p) for p in policies]
    flight = "one request at a time" if args.concurrency <= 1 else f"{args.concurrency} in flight"
    print(f"GSM8K {args.data.name} problems {args.offset}..{args.offset + len(problems) - 1}, "
          f"format {args.format}, max_tokens {args.max_tokens}, {platform.machine()} "
          f"x{_cores()} cores, {flight}")  # fmt: skip
    print(render(summaries, args.baseline))
    if args.json:
        report = {"summaries": summaries, "records": [asdict(r) for r in records]}
        args.json.write_text(json.dumps(report, indent=1))
    if args.labels:
        rows = label_rows(records, args.label_policy)
        args.labels.write_text("".join(json.dumps(row) + "\n" for row in rows))
        print(f"{len(rows)} labelled {args.label_policy} answers written to {args.labels}")
    return 0


def _cores() -> int:
    import os

    return os.cpu_count() or 0


if __name__ == "__main__":
    raise SystemExit(main())
