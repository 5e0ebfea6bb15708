"""Many agents at once (``slmgate bench serve``): concurrent clients through the HTTP gateway.

One in-process gateway serves the same weights twice: ``serial`` (one request at a time, the
engine before continuous batching) and ``batched`` (``batching: true``); ``--vllm-url`` adds
an OpenAI-compatible server (``vllm serve`` on the same converted weights) as a third arm.
Requests are a fixed mix from the shared data, in turns: free text (GSM8K questions), JSON
schema (``response_format`` json_schema, JSONSchemaBench's Glaiveai2K) and tool calls (BFCL
``simple_python``, ``tool_choice: auto``), all greedy and streamed, so time to first token is
read where the client sees it. For each concurrency level the arms run one after the other on
the same requests; reported per arm and level: output tokens/s, requests/s, p50/p95 latency,
p50/p95 time to first token, errors; and, for the gateway's arms, that every request left a
ledger row.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
import uvicorn

from benchmarks.grammar_bench import machine_info, percentile, resolve_model
from benchmarks.grammar_data import default_data_dir, load_subsets, prompt_for, sample_schemas

Body = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Outcome:
    latency_s: float
    ttft_s: float | None
    tokens: int
    error: str | None
    output: str = ""  # the streamed content and tool-call arguments, to compare arms


def workload(count: int, seed: int = 0) -> list[tuple[str, Body]]:
    """``count`` (kind, request body without model) pairs: text, json, tool in turns."""
    from benchmarks.bfcl_data import load_items, openai_tools

    data = default_data_dir().parent
    questions = [
        json.loads(line)["question"]
        for line in (data / "gsm8k" / "train-1000.jsonl").read_text().splitlines()[:count]
    ]
    schemas = sample_schemas(load_subsets(default_data_dir(), ("Glaiveai2K",)), count, seed)
    items = load_items("simple_python", limit=count)
    out: list[tuple[str, Body]] = []
    for i in range(count):
        turn, slot = i % 3, i // 3
        if turn == 0:
            out.append(("text", {"messages": [{"role": "user", "content": questions[slot]}]}))
        elif turn == 1:
            schema = schemas[slot][1]
            body = {
                "messages": list(prompt_for(schema)),
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "answer", "schema": schema},
                },
            }
            out.append(("json", body))
        else:
            tools, _ = openai_tools(items[slot].functions)
            body = {"messages": items[slot].messages, "tools": tools, "tool_choice": "auto"}
            out.append(("tool", body))
    return out


async def one_request(
    client: httpx.AsyncClient, model: str, body: Body, max_tokens: int
) -> Outcome:
    """Stream one request; the latency ends at the last chunk, the first token at the first
    chunk carrying content or a tool call."""
    payload = {**body, "model": model, "max_tokens": max_tokens, "temperature": 0,
               "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    started = time.perf_counter()
    first: float | None = None
    tokens = 0
    output: list[str] = []
    try:
        async with client.stream("POST", "/v1/chat/completions", json=payload) as reply:
            if reply.status_code != 200:
                text = (await reply.aread()).decode(errors="replace")[:200]
                return Outcome(
                    time.perf_counter() - started, None, 0, f"{reply.status_code} {text}"
                )
            async for line in reply.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return Outcome(time.perf_counter() - started, first, tokens, str(chunk))
                for choice in chunk.get("choices") or []:
                    delta = choice.get("delta") or {}
                    if first is None and (delta.get("content") or delta.get("tool_calls")):
                        first = time.perf_counter() - started
                    output.append(delta.get("content") or "")
                    for call in delta.get("tool_calls") or []:
                        function = call.get("function") or {}
                        output.append(
                            (function.get("name") or "") + (function.get("arguments") or "")
                        )
                if chunk.get("usage"):
                    tokens = int(chunk["usage"].get("completion_tokens") or 0)
    except httpx.HTTPError as exc:
        return Outcome(time.perf_counter() - started, first, tokens, repr(exc))
    return Outcome(time.perf_counter() - started, first, tokens, None, "".join(output))


async def run_level(
    base_url: str, model: str, requests: list[tuple[str, Body]], concurrency: int, max_tokens: int
) -> dict[str, Any]:
    """``requests`` by ``concurrency`` clients, each taking the next one when it is done."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(len(requests)):
        queue.put_nowait(index)
    outcomes: list[Outcome] = []
    by_request: dict[int, Outcome] = {}
    async with httpx.AsyncClient(base_url=base_url, timeout=900) as client:

        async def client_loop() -> None:
            while not queue.empty():
                index = queue.get_nowait()
                outcome = await one_request(client, model, requests[index][1], max_tokens)
                outcomes.append(outcome)
                by_request[index] = outcome

        started = time.perf_counter()
        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    latencies = [o.latency_s for o in outcomes]
    ttfts = [o.ttft_s for o in outcomes if o.ttft_s is not None]
    errors = [o.error for o in outcomes if o.error]
    return {
        "concurrency": concurrency,
        "requests": len(outcomes),
        "errors": len(errors),
        "error_samples": errors[:3],
        "wall_s": wall,
        "output_tokens": sum(o.tokens for o in outcomes),
        "output_tokens_per_s": sum(o.tokens for o in outcomes) / wall,
        "requests_per_s": len(outcomes) / wall,
        "p50_latency_s": percentile(latencies, 50),
        "p95_latency_s": percentile(latencies, 95),
        "p50_ttft_s": percentile(ttfts, 50),
        "p95_ttft_s": percentile(ttfts, 95),
        "outputs": [by_request[i].output for i in sorted(by_request)],
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_gateway(
    args: argparse.Namespace, ledger_url: str
) -> tuple[uvicorn.Server, threading.Thread, str]:
    """A gateway with the model twice: ``serial`` and ``batched``, one single-tier route each
    (no abstention probe: the arms compare engines, and vLLM runs none)."""
    from decoding.models import ModelSpec, load_engine
    from gateway.app import create_app
    from gateway.config import GatewayConfig, Limits
    from router.router import Route, Router

    source = resolve_model(args.model)
    specs = {
        "serial": ModelSpec("serial", source, dtype=args.dtype, batching=False),
        "batched": ModelSpec(
            "batched", source, dtype=args.dtype, batching=True, max_running=args.max_running,
            max_batch_tokens=args.max_batch_tokens,
        ),
    }  # fmt: skip
    engines = {name: load_engine(spec) for name, spec in specs.items() if name in args.arms}
    routes = {name: Route(name, (name,), abstain_probe=False) for name in engines}
    config = GatewayConfig(
        models=tuple(specs[n] for n in engines), routes=tuple(routes.values()),
        ledger_url=ledger_url, limits=Limits(max_queue=256, request_timeout_s=1800),
    )  # fmt: skip
    port = _free_port()
    app = create_app(config, Router(dict(engines), routes))
    server = uvicorn.Server(uvicorn.Config(app, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{port}"


def ledger_rows(url: str) -> dict[str, int]:
    """Requests in the ledger per route."""
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT route, COUNT(*) FROM requests GROUP BY route"))
        return {str(route): int(count) for route, count in rows}


def match_rates(levels: list[dict[str, Any]]) -> dict[str, list[int]]:
    """Per arm, [identical outputs, requests] against the serial arm's, over all levels (the
    same requests, greedy: batching may change rounding, and so a near-tie)."""
    rates: dict[str, list[int]] = {}
    for row in levels:
        serial = row["arms"].get("serial")
        if serial is None:
            continue
        for arm, r in row["arms"].items():
            if arm == "serial":
                continue
            same = sum(a == b for a, b in zip(serial["outputs"], r["outputs"], strict=True))
            total = rates.setdefault(arm, [0, 0])
            total[0] += same
            total[1] += len(r["outputs"])
    return rates


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slmgate bench serve", description=__doc__)
    parser.add_argument("--model", default="builtin:qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--concurrency", default="1,4,8,16", help="levels, comma-separated")
    parser.add_argument("--per-client", type=int, default=2, help="requests per client and level")
    parser.add_argument("--min-requests", type=int, default=6, help="requests per level, at least")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--arms", default="serial,batched", help="serial, batched, vllm")
    parser.add_argument("--vllm-url", default="http://127.0.0.1:8100")
    parser.add_argument("--vllm-model", default="vllm-q05")
    parser.add_argument("--max-running", type=int, default=16)
    parser.add_argument("--max-batch-tokens", type=int, default=256)
    parser.add_argument("--json", type=Path, default=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    levels = [int(c) for c in args.concurrency.split(",")]
    ledger_url = f"sqlite:///{tempfile.mkdtemp(prefix='serve-bench-')}/ledger.sqlite3"
    logging.getLogger("httpx").setLevel(logging.WARNING)
    local = [a for a in args.arms if a != "vllm"]
    server, thread, base = start_gateway(args, ledger_url) if local else (None, None, "")
    arms = {a: (base, a) for a in local}
    if "vllm" in args.arms:
        arms["vllm"] = (args.vllm_url.rstrip("/"), args.vllm_model)
    warm = workload(3)
    result: dict[str, Any] = {"machine": machine_info(args.dtype, "cpu"), "args": vars(args),
                              "levels": []}  # fmt: skip
    sent: dict[str, int] = {a: 0 for a in arms}
    try:
        for arm, (url, model) in arms.items():  # warm each arm (first passes are slow)
            asyncio.run(run_level(url, model, warm, 3, 8))
            sent[arm] += len(warm)
        for level in levels:
            count = max(args.min_requests, level * args.per_client)
            requests = workload(count)
            row: dict[str, Any] = {"concurrency": level, "arms": {}}
            for arm, (url, model) in arms.items():
                row["arms"][arm] = asyncio.run(
                    run_level(url, model, requests, level, args.max_tokens)
                )
                sent[arm] += count
                shown = {k: v for k, v in row["arms"][arm].items() if k != "outputs"}
                print(json.dumps({arm: shown}), flush=True)
            result["levels"].append(row)
    finally:
        if server is not None and thread is not None:
            server.should_exit = True
            thread.join(timeout=60)  # the app's shutdown writes what the ledger still queues
    rows = ledger_rows(ledger_url) if local else {}
    result["matches_serial"] = match_rates(result["levels"])
    result["ledger"] = {a: {"sent": sent[a], "rows": rows.get(a, 0)} for a in arms if a != "vllm"}
    print(render_report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    return 0


def render_report(result: dict[str, Any]) -> str:
    lines = ["| c | arm | out tok/s | req/s | p50 lat s | p95 lat s | p50 TTFT s | p95 TTFT s "
             "| errors |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in result["levels"]:
        for arm, r in row["arms"].items():
            lines.append(
                f"| {row['concurrency']} | {arm} | {r['output_tokens_per_s']:.1f} | "
                f"{r['requests_per_s']:.2f} | {r['p50_latency_s']:.2f} | "
                f"{r['p95_latency_s']:.2f} | "
                f"{(r['p50_ttft_s'] or 0):.2f} | {(r['p95_ttft_s'] or 0):.2f} | {r['errors']} |"
            )
    lines.append("")
    first = {arm: r for arm, r in result["levels"][0]["arms"].items()}
    for row in result["levels"]:
        for arm, r in row["arms"].items():
            if arm != "serial" and "serial" in row["arms"]:
                ratio = r["output_tokens_per_s"] / max(
                    row["arms"]["serial"]["output_tokens_per_s"], 1e-9
                )
                lines.append(f"c={row['concurrency']} {arm}/serial tokens/s: {ratio:.2f}x")
            if arm in first and first[arm]["p95_latency_s"]:
                lines.append(
                    f"c={row['concurrency']} {arm} p95 latency / c=1 p95: "
                    f"{r['p95_latency_s'] / first[arm]['p95_latency_s']:.2f}x"
                )
    lines.append(f"ledger: {result['ledger']}")
    for arm, (same, total) in result.get("matches_serial", {}).items():
        lines.append(f"{arm}: {same} of {total} outputs identical to the serial arm's")
    return "\n".join(lines)
