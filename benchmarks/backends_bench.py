"""The same weights through the embedded engine and through vLLM (``slmgate bench backends``).

One run, arms one after the other, each a fresh ``slmgate serve`` holding only that arm's tier
(so an idle arm's server takes no CPU from the one being measured): the embedded engine plain
and with its own speculation (suffix + STAND), and a vLLM server the gateway launches from the
embedded engine's converted cache directory, plain and with vLLM's own speculation (``suffix``
by default). Every arm gets the same requests, one at a time (a single stream), greedy and
streamed through the gateway, in turns: free text (GSM8K), JSON schema (JSONSchemaBench
Glaiveai2K), tool calls (BFCL simple_python) and tau-bench replay turns (system prompt, tools
and the conversation so far). Reported per arm and kind: output tokens/s (all tokens over all
streaming time, and the median request's), median time to first token, the gateway checker's
verdict (valid of all requests, errors counted as invalid), and what speculation accepted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from benchmarks.grammar_bench import machine_info
from benchmarks.serve_bench import Body, _free_port, workload

KINDS = ("text", "json", "tool", "tau")
ARMS = ("embedded", "embedded-spec", "vllm", "vllm-spec")


@dataclass(slots=True)
class Result:
    kind: str
    latency_s: float
    ttft_s: float | None
    tokens: int
    valid: bool
    error: str | None = None
    speculation: dict[str, Any] | None = None


@dataclass(slots=True)
class ArmReport:
    arm: str
    started_s: float  # until /readyz answered (server start, model load, warm-up)
    results: list[Result] = field(default_factory=list)


def tau_turns(count: int, max_messages: int, max_chars: int) -> list[Body]:
    """``count`` assistant turns of the tau-bench replay as request bodies (spec_bench's cut)."""
    from benchmarks.grammar_data import default_data_dir
    from benchmarks.spec_bench import trace_requests

    path = default_data_dir().parent / "agent-traces" / "tau-bench-replay.jsonl"
    reqs = trace_requests(path, count, max_messages, max_chars, system=True, tools=True)
    return [{"messages": list(r.messages), "tools": list(r.tools), "tool_choice": "auto"}
            for r in reqs]  # fmt: skip


def requests_for(per_kind: int, args: argparse.Namespace) -> list[tuple[str, Body]]:
    mixed = workload(per_kind * 3)
    taus = tau_turns(per_kind, args.tau_messages, args.tau_chars)
    return mixed + [("tau", body) for body in taus]


def arm_model(arm: str, args: argparse.Namespace) -> dict[str, Any]:
    """The one tier an arm's gateway serves."""
    model = "builtin:qwen2.5-coder-0.5b-instruct" if args.model == "qwen" else args.model
    if arm.startswith("embedded"):
        speculation = "both" if arm == "embedded-spec" else "none"
        return {"name": arm, "source": model, "dtype": args.dtype, "speculation": speculation}
    launch = {"model": model, "python": args.vllm_python, "args": ["--dtype", args.dtype,
              "--max-model-len", "8192"], "startup_timeout_s": 1200}  # fmt: skip
    spec: dict[str, Any] = {"name": arm, "kind": "vllm", "device": "cpu", "launch": launch,
                            "timeout_s": 600}  # fmt: skip
    if arm == "vllm-spec":
        spec["speculative_config"] = json.loads(args.vllm_speculative_config)
    return spec


def start(arm: str, args: argparse.Namespace, workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    config = workdir / f"{arm}.yaml"
    config.write_text(
        f"models: [{json.dumps(arm_model(arm, args))}]\n"
        f"routes: [{json.dumps({'name': arm, 'tiers': [arm], 'abstain_probe': False})}]\n"
        f"ledger_url: 'sqlite:///{workdir / (arm + '.sqlite3')}'\n"
        "limits: {request_timeout_s: 1800}\n"
    )
    port = _free_port()
    log = (workdir / f"{arm}.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config), "--port",
         str(port), "--log-level", "warning"], stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(proc: subprocess.Popen[bytes], base: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the gateway exited ({proc.returncode}) before it was ready")
        try:
            if httpx.get(base + "/readyz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise RuntimeError("the gateway did not become ready in time")


async def one(client: httpx.AsyncClient, arm: str, kind: str, body: Body, max_tokens: int) -> (
    Result
):
    """One streamed request; valid is the gateway checker's verdict on its finish chunk."""
    payload = {**body, "model": arm, "max_tokens": max_tokens, "temperature": 0,
               "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    started = time.perf_counter()
    first: float | None = None
    tokens, facts = 0, None
    try:
        async with client.stream("POST", "/v1/chat/completions", json=payload) as reply:
            if reply.status_code != 200:
                text = (await reply.aread()).decode(errors="replace")[:200]
                return Result(kind, time.perf_counter() - started, None, 0, False, text)
            async for line in reply.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return Result(kind, time.perf_counter() - started, first, tokens, False,
                                  str(chunk["error"])[:200])  # fmt: skip
                for choice in chunk.get("choices") or []:
                    delta = choice.get("delta") or {}
                    if first is None and (delta.get("content") or delta.get("tool_calls")):
                        first = time.perf_counter() - started
                if chunk.get("usage"):
                    tokens = int(chunk["usage"].get("completion_tokens") or 0)
                facts = chunk.get("slmgate") or facts
    except httpx.HTTPError as exc:
        return Result(kind, time.perf_counter() - started, first, tokens, False, repr(exc))
    valid = bool(facts and facts.get("valid"))
    spec = facts.get("speculation") if facts else None
    return Result(kind, time.perf_counter() - started, first, tokens, valid, None, spec)


async def run_arm(base: str, arm: str, requests: list[tuple[str, Body]], max_tokens: int) -> (
    list[Result]
):
    async with httpx.AsyncClient(base_url=base, timeout=1800) as client:
        await one(client, arm, "text", requests[0][1], 8)  # warm-up, not counted
        return [await one(client, arm, kind, body, max_tokens) for kind, body in requests]


def summarise(report: ArmReport) -> dict[str, Any]:
    out: dict[str, Any] = {"arm": report.arm, "started_s": round(report.started_s, 1)}
    for kind in (*KINDS, "all"):
        rows = [r for r in report.results if kind in ("all", r.kind)]
        if not rows:
            continue
        done = [r for r in rows if r.error is None and r.tokens > 0]
        rates = [r.tokens / r.latency_s for r in done]
        specs = [r.speculation for r in rows if r.speculation]
        drafted = sum(s["drafted"] for s in specs)
        out[kind] = {
            "requests": len(rows),
            "errors": sum(r.error is not None for r in rows),
            "valid_of_all": round(sum(r.valid for r in rows) / len(rows), 3),
            "tokens_per_s": round(sum(r.tokens for r in done) / sum(r.latency_s for r in done), 2)
            if done else None,
            "median_request_tokens_per_s": round(statistics.median(rates), 2) if rates else None,
            "median_ttft_s": round(statistics.median(t), 3)
            if (t := [r.ttft_s for r in rows if r.ttft_s is not None]) else None,
            "spec_acceptance": round(sum(s["accepted"] for s in specs) / drafted, 3)
            if drafted else None,
            "spec_requests": len(specs),
        }  # fmt: skip
    return out


def markdown(summaries: list[dict[str, Any]]) -> str:
    head = ("| arm | kind | tok/s | median req tok/s | median TTFT s | valid of all | errors | "
            "spec acceptance (requests) |\n|---|---|---|---|---|---|---|---|")  # fmt: skip
    lines = [head]
    for s in summaries:
        for kind in (*KINDS, "all"):
            k = s.get(kind)
            if k is None:
                continue
            spec = "-" if k["spec_acceptance"] is None else (
                f"{k['spec_acceptance']:.2f} ({k['spec_requests']})")  # fmt: skip
            lines.append(
                f"| {s['arm']} | {kind} | {k['tokens_per_s']} | {k['median_request_tokens_per_s']}"
                f" | {k['median_ttft_s']} | {k['valid_of_all']:.0%} | {k['errors']} | {spec} |"
            )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="slmgate bench backends", description=__doc__)
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated of {ARMS}")
    p.add_argument("--model", default="qwen", help="qwen (Qwen2.5-Coder-0.5B), builtin:… or dir")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--per-kind", type=int, default=4, help="requests of each kind")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--tau-messages", type=int, default=6, help="messages kept before a turn")
    p.add_argument("--tau-chars", type=int, default=800, help="characters kept per message")
    p.add_argument("--vllm-python", default=os.environ.get("SLMGATE_VLLM_PYTHON", ""),
                   help="vLLM's environment (scripts/vllm_venv.sh)")  # fmt: skip
    p.add_argument("--vllm-speculative-config",
                   default='{"method": "suffix", "num_speculative_tokens": 16}')  # fmt: skip
    p.add_argument("--json", default=None, help="write the results here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    arms = [a for a in args.arms.split(",") if a]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise SystemExit(f"unknown arms {unknown}; known: {ARMS}")
    if any(a.startswith("vllm") for a in arms) and not args.vllm_python:
        raise SystemExit("vLLM arms need --vllm-python (or SLMGATE_VLLM_PYTHON)")
    requests = requests_for(args.per_kind, args)
    summaries = []
    with tempfile.TemporaryDirectory(prefix="slmgate-backends-") as tmp:
        for arm in arms:
            started = time.monotonic()
            proc, base = start(arm, args, Path(tmp))
            try:
                wait_ready(proc, base, 1800)
                report = ArmReport(arm, time.monotonic() - started)
                report.results = asyncio.run(run_arm(base, arm, requests, args.max_tokens))
            finally:
                proc.terminate()
                proc.wait(timeout=60)
            summaries.append(summarise(report))
            print(json.dumps(summaries[-1]), flush=True)
    result = {"machine": machine_info(args.dtype, "cpu"), "args": vars(args), "arms": summaries}
    print(markdown(summaries))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
