"""Gateway overhead (``slmgate bench gateway``): the same short generations through the HTTP
gateway and straight into the engine, in one process, interleaved round by round.

Reports p50/p95 latency and requests/s at a fixed concurrency for each arm, and the overhead
(added p50/p95 latency, throughput ratio).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from benchmarks.grammar_bench import machine_info, percentile
from decoding.models import ModelSpec, load_engine
from decoding.types import GenerationRequest, SamplingParams
from gateway.app import create_app
from gateway.config import GatewayConfig
from router.router import Route, Router

PROMPTS = ["Say hi.", "Name a colour.", "Count to three.", "Name a fruit.", "Say yes."]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _run_arm(call: Any, requests: int, concurrency: int) -> dict[str, float]:
    latencies: list[float] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)

    async def worker() -> None:
        while not queue.empty():
            i = queue.get_nowait()
            started = time.perf_counter()
            await call(PROMPTS[i % len(PROMPTS)])
            latencies.append((time.perf_counter() - started) * 1e3)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    return {"p50_ms": percentile(latencies, 50) or 0.0, "p95_ms": percentile(latencies, 95) or 0.0,
            "requests_per_s": requests / wall}  # fmt: skip


async def _bench(engine: Any, base: str, args: argparse.Namespace) -> dict[str, Any]:
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)

    async def direct(prompt: str) -> None:
        req = GenerationRequest(({"role": "user", "content": prompt},), params)
        await engine.complete(req)

    async with httpx.AsyncClient(base_url=base, timeout=300) as client:

        async def via_gateway(prompt: str) -> None:
            body = {"model": "slm", "messages": [{"role": "user", "content": prompt}],
                    "max_tokens": args.max_tokens, "temperature": 0}  # fmt: skip
            r = await client.post("/v1/chat/completions", json=body)
            r.raise_for_status()

        await _run_arm(via_gateway, args.concurrency, args.concurrency)  # warm both paths
        await _run_arm(direct, args.concurrency, args.concurrency)
        rounds: dict[str, list[dict[str, float]]] = {"direct": [], "gateway": []}
        for _ in range(args.rounds):
            rounds["direct"].append(await _run_arm(direct, args.requests, args.concurrency))
            rounds["gateway"].append(await _run_arm(via_gateway, args.requests, args.concurrency))

    def median_of(arm: str, key: str) -> float:
        values = sorted(r[key] for r in rounds[arm])
        return values[len(values) // 2]

    result: dict[str, Any] = {arm: {k: median_of(arm, k) for k in rounds[arm][0]} for arm in rounds}
    d, g = result["direct"], result["gateway"]
    result["overhead"] = {
        "added_p50_ms": g["p50_ms"] - d["p50_ms"],
        "added_p95_ms": g["p95_ms"] - d["p95_ms"],
        "throughput_ratio": g["requests_per_s"] / d["requests_per_s"],
    }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slmgate bench gateway", description=__doc__)
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--requests", type=int, default=20, help="requests per arm per round")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    engine = load_engine(ModelSpec("slm", args.model, dtype=args.dtype))
    router = Router({"slm": engine}, {"auto": Route("auto", ("slm",))})
    route = Route("auto", ("slm",))
    config = GatewayConfig(models=(ModelSpec("slm", args.model),), routes=(route,))
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(config, router), port=port,
                                           log_level="warning"))  # fmt: skip
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        result = asyncio.run(_bench(engine, f"http://127.0.0.1:{port}", args))
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    info = machine_info(engine.info.dtype, engine.info.device)
    result.update(machine=info, model=args.model, dtype=engine.info.dtype,
                  concurrency=args.concurrency, requests=args.requests, rounds=args.rounds,
                  max_tokens=args.max_tokens)  # fmt: skip
    d, g, o = result["direct"], result["gateway"], result["overhead"]
    print(f"machine: {result['machine']}\nmodel: {args.model} ({engine.info.dtype}), "
          f"{args.requests} requests x {args.rounds} rounds, concurrency {args.concurrency}, "
          f"max_tokens {args.max_tokens} (medians over rounds)")  # fmt: skip
    print("| arm | p50 ms | p95 ms | req/s |\n|---|---|---|---|")
    for arm, r in (("engine, in-process", d), ("gateway, HTTP", g)):
        print(f"| {arm} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['requests_per_s']:.2f} |")
    print(f"overhead: +{o['added_p50_ms']:.1f} ms p50, +{o['added_p95_ms']:.1f} ms p95, "
          f"throughput x{o['throughput_ratio']:.3f}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    engine.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
