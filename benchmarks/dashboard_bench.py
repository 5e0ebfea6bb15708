"""Dashboard data load at scale (``python -m benchmarks.dashboard_bench``).

Fills a ledger with N synthetic requests (``benchmarks.ledger_bench``'s generator, outcomes for
half the tasks), serves it with the real gateway app (no models loaded), and times what the
dashboard does: its API calls over HTTP, and the page's own fetch-and-draw time in headless
Chromium (``document.body.dataset.loadMs``) for the default 24 h window, all time, and one route.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI

from benchmarks.ledger_bench import isolated_url, machine, synthetic_requests, timed
from gateway.app import create_app
from gateway.config import GatewayConfig
from gateway.dashboard import dashboard_router
from router.ledger import Ledger
from router.router import Router
from router.stats import percentile

KEY = "sk-dashboard-bench"


def fill(url: str, rows: int, seed: int) -> dict[str, Any]:
    """Write ``rows`` requests and outcomes for half the tasks; return counts and fill time."""
    ledger = Ledger(url, queue_size=rows + 1)
    ledger.start()
    started = time.perf_counter()
    try:
        task_ids: set[str] = set()
        for rec in synthetic_requests(rows, time.time(), seed):
            ledger.record(rec)
            if rec.task_id is not None:
                task_ids.add(rec.task_id)
        if not ledger.flush(timeout=3600):
            raise RuntimeError("ledger did not flush")
        rng = random.Random(seed + 1)
        for task_id in sorted(task_ids)[::2]:
            ledger.set_outcome(task_id, rng.random() < 0.85)
    finally:
        ledger.close()
    return {"rows": rows, "tasks": len(task_ids), "fill_s": time.perf_counter() - started}


def app_for(url: str) -> FastAPI:
    """The gateway's app on this ledger, with no backends (the dashboard reads only)."""
    app = create_app(GatewayConfig(api_keys=(KEY,)), router=Router({}, {}), ledger=Ledger(url))
    if not any(getattr(r, "path", None) == "/dashboard" for r in app.routes):
        app.include_router(dashboard_router((KEY,)))  # until the gateway mounts it itself
    return app


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serving(app: FastAPI) -> Iterator[str]:
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def api_timings(base: str, repeats: int) -> dict[str, dict[str, float]]:
    """Median/p95 ms of each call the page makes, and of the page's parallel pair."""
    client = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {KEY}"}, timeout=600)

    def get(path: str, **params: Any) -> Callable[[], object]:
        def call() -> object:
            r = client.get(path, params=params)
            r.raise_for_status()
            return r.json()

        return call

    one_task = client.get("/v1/tasks", params={"limit": 1, "window": "all"}).json()["data"]
    calls = {
        "stats_24h": get("/v1/stats", window="24h", buckets=24),
        "stats_all": get("/v1/stats", window="all", buckets=24),
        "stats_24h_route": get("/v1/stats", window="24h", route="slm", buckets=24),
        "tasks_24h_50": get("/v1/tasks", window="24h", limit=50),
        "models": get("/v1/models"),
    }
    if one_task:
        calls["task_one"] = get(f"/v1/tasks/{one_task[0]['task_id']}")
    try:
        return {name: timed(call, repeats) for name, call in calls.items()}
    finally:
        client.close()


def page_timings(base: str, chromium: str, repeats: int) -> dict[str, Any]:
    """The page's fetch-and-draw time per load (its own ``loadMs``), per window/route."""
    from playwright.sync_api import sync_playwright

    out: dict[str, Any] = {}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        started = time.perf_counter()
        page.goto(f"{base}/dashboard?window=24h")  # the key is typed in, never put in a URL
        page.fill("[data-testid=key-input]", KEY)
        page.press("[data-testid=key-input]", "Enter")
        page.wait_for_function("() => document.body.dataset.ready === '1'", timeout=600_000)
        out["first_open_to_ready_ms"] = (time.perf_counter() - started) * 1e3
        for label, window, route in (("24h", "24h", ""), ("all", "all", ""),
                                     ("24h_route", "24h", "slm")):  # fmt: skip
            page.select_option("#window", window)
            page.wait_for_function("() => document.body.dataset.ready === '1'", timeout=600_000)
            page.select_option("#route", route)
            page.wait_for_function("() => document.body.dataset.ready === '1'", timeout=600_000)
            loads = []
            for _ in range(repeats):
                page.click("#refresh")
                page.wait_for_function("() => document.body.dataset.ready === '1'",
                                       timeout=600_000)  # fmt: skip
                loads.append(float(page.evaluate("document.body.dataset.loadMs")))
            out[f"page_{label}"] = {"p50_ms": percentile(loads, 50) or 0.0,
                                    "p95_ms": percentile(loads, 95) or 0.0}  # fmt: skip
        out["task_rows_shown"] = page.locator("[data-testid=task-row]").count()
        browser.close()
    return out


def report(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        f"machine: {m['cpu']}, {m['cores']} cores ({m['cores_available']} available)",
        f"{result['backend']}: {result['rows']} requests, {result['tasks']} tasks "
        f"(filled in {result['fill_s']:.1f} s)",
    ]
    for name, t in result["api"].items():
        lines.append(f"api  {name:18s} p50 {t['p50_ms']:8.1f} ms   p95 {t['p95_ms']:8.1f} ms")
    page = result.get("page")
    if page:
        lines.append(f"page first open → drawn: {page['first_open_to_ready_ms']:.0f} ms")
        for name, t in page.items():
            if isinstance(t, dict):
                lines.append(f"{name:23s} p50 {t['p50_ms']:8.1f} ms   p95 {t['p95_ms']:8.1f} ms")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dashboard_bench", description=__doc__)
    p.add_argument("--rows", type=int, default=100_000, help="synthetic requests in the ledger")
    p.add_argument("--url", default=None, help="database URL (default: a temp SQLite file)")
    p.add_argument("--repeats", type=int, default=5, help="timed loads per case")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chromium", default="/usr/bin/chromium", help="browser ('' to skip)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)
    if args.rows < 1 or args.repeats < 1:
        p.error("--rows and --repeats must be >= 1")
    with isolated_url(args.url, keep=False) as url:
        result: dict[str, Any] = {"backend": url.split(":", 1)[0].split("+")[0]}
        result |= fill(url, args.rows, args.seed)
        with serving(app_for(url)) as base:
            result["api"] = api_timings(base, args.repeats)
            if args.chromium and Path(args.chromium).exists():
                result["page"] = page_timings(base, args.chromium, args.repeats)
    result["machine"] = machine()
    print(json.dumps(result, indent=2) if args.json else report(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
