"""Soak (``slmgate bench soak``): a bounded mixed load against a live gateway whose remote tier
fails for a while, then proof from the ledger that nothing was lost.

The benchmark starts its own gateway (``python -m gateway.cli serve``) with two priced tiers: the
embedded SmolLM2 and an OpenAI-compatible fake upstream on 127.0.0.1 that answers 500, closes
connections and refuses them during a fault window, then recovers. Routes: a cascade over both,
a cascade that starts on the upstream, one route per tier. The load mixes free text, JSON schema
and tool calls, streaming and whole, with clients that hang up and clients whose deadline is
shorter than the generation; each request carries a unique ``X-Task-Id``. Afterwards (every
request's record taken by the ledger writer, then a graceful stop) the ledger is read directly and
reconciled: rows lost, cost and token consistency, 5xx from retryable faults, 499s and 504s,
latency p50/p95, server RSS. Exits 1 when rows were lost or a 5xx reached a client.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any

import httpx
import yaml

from benchmarks.host import host_info
from benchmarks.soak_client import ClientResult, run_one
from benchmarks.soak_ledger import read_ledger, reconcile, refused_before_admission
from benchmarks.soak_plan import FaultWindow, MixWeights, PlannedRequest, plan_mix
from benchmarks.soak_report import summarize, table
from benchmarks.soak_upstream import FakeUpstream

CASCADE_SIGNAL = "min_grammar_agreement"  # the shipped default route's signal and threshold
CASCADE_THRESHOLD = 0.9986


def gateway_config(
    model: str, upstream_port: int, ledger_url: str, request_timeout_s: float,
    concurrency: int, limit_fields: frozenset[str],
) -> dict[str, Any]:  # fmt: skip
    """The gateway's config: priced tiers, the four routes, the run's ledger. A per-key
    concurrency limit (where the gateway has one) is raised to fit the load plus the poller."""
    limits: dict[str, Any] = {"request_timeout_s": request_timeout_s}
    if "max_concurrent_per_key" in limit_fields:
        limits["max_concurrent_per_key"] = max(16, concurrency + 4)
    return {
        "host": "127.0.0.1",
        "ledger_url": ledger_url,
        "limits": limits,
        "models": [
            {"name": "small", "source": model, "tier": "slm",
             "price_in_per_mtok": 0.02, "price_out_per_mtok": 0.04},
            {"name": "upstream", "kind": "openai", "tier": "llm",
             "base_url": f"http://127.0.0.1:{upstream_port}/v1", "remote_model": "fake-large",
             "price_in_per_mtok": 0.5, "price_out_per_mtok": 1.5, "timeout_s": 10.0,
             "max_retries": 1, "breaker_failures": 3, "breaker_reset_s": 2.0,
             "context_length": 8192, "supports_logprobs": False},
        ],
        "routes": [
            {"name": "cascade", "tiers": ["small", "upstream"], "policy": "cascade",
             "signal": CASCADE_SIGNAL, "threshold": CASCADE_THRESHOLD},
            {"name": "failover", "tiers": ["upstream", "small"], "policy": "cascade"},
            {"name": "slm", "tiers": ["small"]},
            {"name": "remote", "tiers": ["upstream"]},
        ],
    }  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mb(pid: int) -> float | None:
    """Resident memory of ``pid`` in MB (Linux /proc; None elsewhere or once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError):
        return None
    return None


def _tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


async def _wait_ready(
    client: httpx.AsyncClient, proc: subprocess.Popen[bytes], log: Path, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the gateway exited ({proc.returncode}):\n{_tail(log)}")
        with contextlib.suppress(httpx.HTTPError, ValueError):
            r = await client.get("/readyz")
            if r.status_code == 200:
                return
            if r.json().get("status") == "failed":
                raise RuntimeError(f"the gateway failed to load: {r.text}\n{_tail(log)}")
        await asyncio.sleep(0.5)
    raise RuntimeError(f"the gateway was not ready within {timeout:g} s:\n{_tail(log)}")


class Progress:
    """How much of the load has started: what the fake upstream's fault window follows."""

    def __init__(self, total: int):
        self.total = max(total, 1)
        self.started = 0

    def __call__(self) -> float:
        return self.started / self.total


async def _run_load(
    base: str, plan: list[PlannedRequest], concurrency: int, max_seconds: float,
    client_timeout: float, progress: Progress,
) -> tuple[list[ClientResult], int]:  # fmt: skip
    """Send the plan with ``concurrency`` clients; no new request starts after ``max_seconds``
    (each one in flight is bounded by ``client_timeout``). Returns (results, not sent)."""
    queue = deque(plan)
    results: list[ClientResult] = []
    loop = asyncio.get_running_loop()
    stop_at = loop.time() + max_seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=client_timeout, limits=limits) as client:

        async def worker() -> None:
            while queue and loop.time() < stop_at:
                planned = queue.popleft()
                progress.started += 1
                results.append(await run_one(client, planned))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    results.sort(key=lambda r: r.index)
    return results, len(queue)


async def _settle(client: httpx.AsyncClient, expected: int, timeout: float) -> dict[str, Any]:
    """Wait until the ledger writer has taken ``expected`` records (written or dropped) with
    none queued. The gateway hands over a request's record when the request ends, so a hung-up
    request is done only once its record is counted; lost rows never come, hence ``timeout``.
    Reads the ``ledger`` health block of ``/v1/stats``."""
    started = time.monotonic()
    health: dict[str, Any] = {}
    while time.monotonic() - started < timeout:
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, TypeError):
            health = (await client.get("/v1/stats", params={"window": "1h"})).json()["ledger"]
            taken = int(health.get("written") or 0) + int(health.get("dropped") or 0)
            if health.get("queued") == 0 and taken >= expected:
                return {"settled": True, "settle_s": round(time.monotonic() - started, 2),
                        "ledger_health": health}  # fmt: skip
        await asyncio.sleep(0.5)
    return {"settled": False, "settle_s": round(timeout, 2), "ledger_health": health}


def _stop(proc: subprocess.Popen[bytes], timeout: float = 60.0) -> dict[str, Any]:
    """Stop the gateway as an operator would (SIGINT: lifespan shutdown flushes the ledger)."""
    if proc.poll() is not None:
        return {"returncode": proc.returncode, "graceful": False}
    proc.send_signal(signal.SIGINT)
    try:
        return {"returncode": proc.wait(timeout), "graceful": True}
    except subprocess.TimeoutExpired:
        proc.kill()
        return {"returncode": proc.wait(), "graceful": False}


async def _sample_rss(pid: int, peak: list[float]) -> None:
    while True:
        value = rss_mb(pid)
        if value is not None:
            peak[0] = max(peak[0], value)
        await asyncio.sleep(0.5)


def _start_gateway(config: dict[str, Any], workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """``python -m gateway.cli serve`` on a free port, logging to ``workdir/gateway.log``."""
    path = workdir / "gateway.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    port = _free_port()
    cmd = [sys.executable, "-m", "gateway.cli", "serve", "--config", str(path),
           "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]  # fmt: skip
    with (workdir / "gateway.log").open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}"


async def _soak(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from gateway.config import Limits  # lazily: only to know which limits the gateway has

    tag = secrets.token_hex(4)
    weights = MixWeights(stream=args.stream_share, disconnect=args.disconnect_share,
                         timeout=args.timeout_share)  # fmt: skip
    plan = plan_mix(args.requests, args.seed, tag, weights)
    progress = Progress(len(plan))
    window = FaultWindow(args.fault_from, args.fault_to, args.fault_mode)
    upstream = FakeUpstream(window, latency_s=args.upstream_latency, progress=progress)
    ledger_url = args.ledger_url or f"sqlite:///{workdir / 'ledger.sqlite3'}"
    fields = frozenset(f.name for f in dataclasses.fields(Limits))
    log_path = workdir / "gateway.log"
    await upstream.start()
    config = gateway_config(args.model, upstream.port, ledger_url, args.request_timeout_s,
                            args.concurrency, fields)  # fmt: skip
    proc, base = _start_gateway(config, workdir)
    peak = [0.0]
    sampler: asyncio.Task[None] | None = None
    try:
        async with httpx.AsyncClient(base_url=base, timeout=30) as admin:
            await _wait_ready(admin, proc, log_path, args.startup_timeout)
            rss_start = rss_mb(proc.pid)
            sampler = asyncio.create_task(_sample_rss(proc.pid, peak))
            started = time.perf_counter()
            results, not_sent = await _run_load(base, plan, args.concurrency, args.max_seconds,
                                                args.request_timeout_s + 30, progress)  # fmt: skip
            wall = time.perf_counter() - started
            expected = sum(not refused_before_admission(r) for r in results)
            settle = await _settle(admin, expected, args.settle_timeout)
            rss_end = rss_mb(proc.pid)
    finally:
        if sampler is not None:
            sampler.cancel()
        stopped = _stop(proc)
        await upstream.close()
    requests, attempts = read_ledger(ledger_url, f"soak-{tag}-")
    rss = {"start": rss_start, "peak": peak[0] or None, "end": rss_end}
    ledger = reconcile(results, requests, attempts)
    summary = summarize(results, ledger, wall_s=wall, not_sent=not_sent, rss_mb=rss,
                        upstream=dict(upstream.counts))  # fmt: skip
    server_log = log_path.read_text(errors="replace")
    summary.update(
        settle=settle, server_stop=stopped,
        server_tracebacks=server_log.count("Traceback (most recent call last)"),
        machine=host_info(), model=args.model, seed=args.seed, tag=tag,
        concurrency=args.concurrency, max_seconds=args.max_seconds,
        fault_window=dataclasses.asdict(window), mix=dataclasses.asdict(weights),
        ledger_url=ledger_url if args.ledger_url else "sqlite (temporary)",
    )  # fmt: skip
    return summary


def _parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser("slmgate bench soak", description=__doc__, formatter_class=raw)
    add = parser.add_argument
    add("--requests", type=int, default=200, help="requests in the mix")
    add("--concurrency", type=int, default=8)
    add("--max-seconds", type=float, default=900.0,
        help="no request starts after this; those in flight finish")  # fmt: skip
    add("--seed", type=int, default=0)
    add("--model", default="builtin:smollm2-135m-instruct")
    add("--fault-from", type=float, default=0.2,
        help="share of the load started when the upstream starts failing")  # fmt: skip
    add("--fault-to", type=float, default=0.6, help="share of the load when it recovers")
    add("--fault-mode", default="mixed", choices=["mixed", "500", "close", "refuse"])
    add("--upstream-latency", type=float, default=0.2, help="seconds per upstream answer")
    add("--stream-share", type=float, default=0.4)
    add("--disconnect-share", type=float, default=0.15)
    add("--timeout-share", type=float, default=0.15)
    add("--request-timeout-s", type=float, default=120.0,
        help="the gateway's limits.request_timeout_s (its 504s)")  # fmt: skip
    add("--ledger-url", default=None, help="ledger database (default: a temporary SQLite file)")
    add("--startup-timeout", type=float, default=600.0)
    add("--settle-timeout", type=float, default=30.0)
    add("--keep", action="store_true", help="keep the config, server log and ledger")
    add("--json", type=Path, default=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1 or args.max_seconds <= 0:
        parser.error("--requests, --concurrency >= 1 and --max-seconds > 0")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    workdir = Path(tempfile.mkdtemp(prefix="slmgate-soak-"))
    try:
        summary = asyncio.run(_soak(args, workdir))
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"machine: {summary['machine']}\nmodel: {args.model}, {args.requests} requests, "
          f"concurrency {args.concurrency}, fault window {summary['fault_window']}")  # fmt: skip
    print(table(summary))
    if args.keep:
        print(f"kept: {workdir}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
