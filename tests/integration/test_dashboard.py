"""The dashboard in headless Chromium: the numbers it shows are the stats API's, exactly.

Two halves. A stand-in FastAPI app serves the real dashboard router next to the documented JSON
shapes filled with literal data, so the page logic (cards, charts, task table, drill-down, key
handling, selectors, escaping) is checked against known numbers. Then a live ``slmgate serve``
(the ``server`` fixture) gets a scripted run of real requests and task outcomes, and the page is
compared with that gateway's own ``/v1/stats`` and ``/v1/tasks``, and ``/metrics`` with the run.
Chromium is Debian's (``apt-get install -y chromium chromium-driver``), driven by Playwright;
Playwright's own browsers are never downloaded.
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient

from gateway.dashboard import dashboard_router

KEY = "sk-dashboard-test"
LIVE_KEY = "sk-test-slmgate"  # the live server's key (tests/integration/conftest.py)
CHROMIUM = os.environ.get("SLMGATE_CHROMIUM", "/usr/bin/chromium")
NOW = 1_764_000_000.0
EVIL = '<img src=x onerror="document.body.dataset.pwned=1">'

# ---- what the page must show: testid -> path into the /v1/stats JSON -------------------------
CARD_PATHS: dict[str, tuple[str, ...]] = {
    "cps": ("cps_usd",),
    "cost": ("cost_usd",),
    "successful-tasks": ("successful_tasks",),
    "tasks": ("tasks",),
    "success-rate": ("success_rate",),
    "tasks-with-outcome": ("tasks_with_outcome",),
    "tasks-inferred": ("outcomes", "inferred", "tasks"),
    "tasks-unknown": ("outcomes", "unknown", "tasks"),
    "schema-validity": ("schema_validity_rate",),
    "executable-rate": ("executable_call_rate",),
    "fallback-rate": ("fallback_rate",),
    "latency-p50": ("latency_s", "p50"),
    "latency-p95": ("latency_s", "p95"),
    "ttft-p50": ("ttft_s", "p50"),
    "ttft-p95": ("ttft_s", "p95"),
    "savings": ("savings_usd",),
    "counterfactual-cost": ("counterfactual_cost_usd",),
    "spec-acceptance": ("speculation", "acceptance_rate"),
    "spec-mean-length": ("speculation", "mean_accepted_length"),
    "spec-accepted": ("speculation", "accepted"),
    "spec-drafted": ("speculation", "drafted"),
    "reused-share": ("verified_escalation", "reused_share"),
    "reused-tokens": ("verified_escalation", "reused_tokens"),
    "escalations-verified": ("verified_escalation", "verified"),
    "escalations-regenerated": ("verified_escalation", "regenerated"),
    "energy-per-request": ("energy", "joules_per_request"),
    "energy-total": ("energy", "joules"),
    "requests": ("requests",),
    "errors": ("errors",),
}


def dig(obj: Any, path: tuple[str, ...]) -> Any:
    for part in path:
        obj = None if obj is None else obj.get(part)
    return obj


def shown(value: str) -> float | None:
    """A data-value attribute back as a number (empty: the API said null)."""
    return None if value == "" else float(value)


def bucket(i: int, requests: int, tasks: int, ok: int, cost: float) -> dict[str, Any]:
    start = NOW - 86400 + i * 3600
    return {"start": start, "end": start + 3600, "requests": requests, "tasks": tasks,
            "successful_tasks": ok, "cost_usd": cost, "cps_usd": cost / ok if ok else None,
            "success_rate": ok / tasks if tasks else None}  # fmt: skip


def figures(tasks: int, ok: int, cost: float) -> dict[str, Any]:
    """One basis of the stats' ``outcomes`` block."""
    return {
        "tasks": tasks,
        "successful_tasks": ok,
        "cost_usd": cost,
        "success_rate": ok / tasks if tasks else None,
        "cps_usd": cost / ok if ok else None,
    }


def outcomes(
    reported: tuple[int, int, float], inferred: tuple[int, int, float], unknown: tuple[int, float]
) -> dict[str, Any]:
    both = (reported[0] + inferred[0], reported[1] + inferred[1], reported[2] + inferred[2])
    return {
        "reported": figures(*reported),
        "inferred": figures(*inferred),
        "combined": figures(*both),
        "unknown": {"tasks": unknown[0], "cost_usd": unknown[1]},
    }


def stats_for(route: str | None) -> dict[str, Any]:
    """Literal /v1/stats bodies: a busy route (reported outcomes), a quiet unpriced one
    (inferred only), one with no data at all."""
    if route == "empty":
        return {
            "object": "slmgate.stats", "route": route, "requests": 0, "errors": 0, "tasks": 0,
            "tasks_with_outcome": 0, "cps_basis": "inferred", "successful_tasks": 0,
            "success_rate": None, "cost_usd": 0.0, "cps_usd": None,
            "outcomes": outcomes((0, 0, 0.0), (0, 0, 0.0), (0, 0.0)),
            "counterfactual_cost_usd": 0.0,
            "savings_usd": None, "schema_validity_rate": None, "executable_call_rate": None,
            "fallback_rate": None, "fallback_reasons": {},
            "latency_s": {"p50": None, "p95": None}, "ttft_s": {"p50": None, "p95": None},
            "by_tier": {}, "speculation": {"drafted": 0, "accepted": 0, "steps": 0,
                                            "acceptance_rate": None,
                                            "mean_accepted_length": None},
            "energy": {"joules": 0.0, "joules_per_request": None, "measured": None},
            "series": [],
        }  # fmt: skip
    series = [bucket(0, 10, 4, 3, 0.0036), bucket(1, 6, 2, 0, 0.0011), bucket(2, 0, 0, 0, 0.0),
              bucket(3, 14, 6, 6, 0.0045)]  # fmt: skip
    stats: dict[str, Any] = {
        "object": "slmgate.stats", "route": route, "requests": 30, "errors": 1, "tasks": 12,
        "tasks_with_outcome": 4, "cps_basis": "reported", "successful_tasks": 3,
        "success_rate": 0.75, "cps_usd": 0.0036 / 3,
        "outcomes": outcomes((4, 3, 0.0036), (5, 4, 0.0032), (3, 0.0024)),
        "cost_usd": 0.0092, "counterfactual_cost_usd": 0.0368,
        "savings_usd": 0.0276, "schema_validity_rate": 0.9, "executable_call_rate": 0.8125,
        "fallback_rate": 0.2, "fallback_reasons": {"low_confidence": 4, "invalid": 1, EVIL: 1},
        "latency_s": {"p50": 0.412, "p95": 2.75}, "ttft_s": {"p50": 0.061, "p95": 0.3},
        "by_tier": {
            "slm": {"attempts": 30, "answered": 24, "prompt_tokens": 4100,
                    "completion_tokens": 950, "cost_usd": 0.0012},
            "llm": {"attempts": 6, "answered": 6, "prompt_tokens": 800,
                    "completion_tokens": 210, "cost_usd": 0.008},
        },
        "speculation": {"drafted": 1200, "accepted": 845, "steps": 400,
                        "acceptance_rate": 845 / 1200, "mean_accepted_length": 2.1125},
        "verified_escalation": {"verified": 5, "regenerated": 1, "drafted_tokens": 300,
                                "reused_tokens": 126, "reused_share": 0.6},
        "energy": {"joules": 91.5, "joules_per_request": 3.05, "measured": False},
        "by_key": [
            {"key_id": "key-0a1b2c3d4e5f", "name": "ci-bot", "requests": 20, "errors": 1,
             "tokens": 4200, "cost_usd": 0.0061},
            {"key_id": "key-ffeeddccbbaa", "name": EVIL, "requests": 4, "errors": 0,
             "tokens": 900, "cost_usd": 0.0009},
        ],
        "series": series,
    }  # fmt: skip
    if route == "cheap":  # measured energy, no speculation, no reports, unpriced top tier
        stats.update(requests=5, errors=0, tasks=3, tasks_with_outcome=0, cps_basis="inferred",
                     successful_tasks=1, success_rate=0.5, cost_usd=0.0004, cps_usd=0.0003,
                     outcomes=outcomes((0, 0, 0.0), (2, 1, 0.0003), (1, 0.0001)),
                     counterfactual_cost_usd=0.0, savings_usd=None, fallback_reasons={},
                     fallback_rate=0.0,
                     by_tier={"slm": {"attempts": 5, "answered": 5, "prompt_tokens": 300,
                                      "completion_tokens": 90, "cost_usd": 0.0004}},
                     speculation={"drafted": 0, "accepted": 0, "steps": 0,
                                  "acceptance_rate": None, "mean_accepted_length": None},
                     verified_escalation={"verified": 0, "regenerated": 0, "drafted_tokens": 0,
                                          "reused_tokens": 0, "reused_share": None},
                     energy={"joules": 12.5, "joules_per_request": 2.5, "measured": True},
                     by_key=[], series=[bucket(3, 5, 2, 1, 0.0004)])  # fmt: skip
    return stats


def attempt(
    rid: str, no: int, tier: str, outcome: str, cost: float, **extra: Any
) -> dict[str, Any]:
    return {"request_id": rid, "attempt_no": no, "route": "auto", "tier": tier, "backend": tier,
            "model": f"{tier}-model", "started_at": NOW - 500, "latency_s": 0.4, "ttft_s": 0.05,
            "prompt_tokens": 100, "completion_tokens": 20, "cost_usd": cost, "confidence": 0.42,
            "signals": {}, "schema_valid": True, "executable": None, "outcome": outcome,
            "fallback_reason": None, "error": None, "spec_drafted": 12, "spec_accepted": 9,
            "spec_steps": 4, "energy_j": 1.5, "energy_measured": False, "task_id": "t-1",
            **extra}  # fmt: skip


def request_row(
    rid: str, cost: float, attempts: list[dict[str, Any]], **extra: Any
) -> dict[str, Any]:
    return {"request_id": rid, "route": "auto", "created_at": NOW - 500, "latency_s": 0.9,
            "task_id": "t-1", "status": 200, "error_type": None, "tier": attempts[-1]["tier"],
            "backend": attempts[-1]["tier"], "ttft_s": 0.05, "prompt_tokens": 100,
            "completion_tokens": 20, "cost_usd": cost, "counterfactual_cost_usd": 0.004,
            "schema_valid": True, "executable": None, "fallback": len(attempts) > 1,
            "fallback_reason": "low_confidence" if len(attempts) > 1 else None, "stream": False,
            "expects_json": True, "expects_tools": False, "attempts": attempts,
            **extra}  # fmt: skip


TASKS = [
    {"task_id": "t-1", "created_at": NOW - 500, "requests": 2, "cost_usd": 0.0031,
     "success": True, "outcome_source": "reported", "tiers": ["slm", "llm"], "fallbacks": 1,
     "route": "auto"},
    {"task_id": EVIL, "created_at": NOW - 900, "requests": 1, "cost_usd": 0.0001,
     "success": None, "outcome_source": None, "tiers": ["slm"], "fallbacks": 0, "route": "auto"},
    {"task_id": "t-3", "created_at": NOW - 1200, "requests": 3, "cost_usd": 0.0004,
     "success": False, "outcome_source": "inferred", "tiers": ["slm"], "fallbacks": 0,
     "route": "cheap"},
]  # fmt: skip
LONG_MODEL = "/root/.cache/gguf/Qwen2.5-Coder-0.5B.Q4_K_M.gguf (cached as /root/.cache/m/1d96)"
DETAIL: dict[str, Any] = {
    "task_id": "t-1", "created_at": NOW - 500, "success": True, "outcome_source": "reported",
    "score": None,
    "requests": [
        request_row("req-a", 0.0030, [attempt("req-a", 0, "slm", "escalated", 0.0001,
                                              fallback_reason="low_confidence"),
                                      attempt("req-a", 1, "llm", "accepted", 0.0029,
                                              model=LONG_MODEL)]),
        request_row("req-b", 0.0001, [attempt("req-b", 0, "slm", "accepted", 0.0001)]),
    ],
}  # fmt: skip


LEDGER_OK = {"ok": True, "queued": 0, "written": 30, "dropped": 0, "last_error": None}
LEDGER_FAILING = {"ok": False, "queued": 1, "written": 5, "dropped": 3,
                  "last_error": "OperationalError: database is locked"}  # fmt: skip


class StandIn:
    """The stand-in app and what it saw: every API request's path, query and auth header."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str]] = []
        self.app = FastAPI()
        self.app.include_router(dashboard_router([KEY]))
        app = self.app

        def check(request: Request) -> JSONResponse | None:
            auth = request.headers.get("authorization", "")
            self.seen.append((request.url.path, request.url.query, auth))
            if auth != f"Bearer {KEY}":
                return JSONResponse({"error": {"message": "bad key", "type": "auth"}}, 401)
            return None

        @app.get("/v1/models", response_model=None)
        async def models(request: Request) -> Any:
            refused = check(request)
            return refused or {
                "object": "list",
                "data": [{"id": name, "object": "model"} for name in ("auto", "cheap", "empty")],
            }

        @app.get("/v1/stats", response_model=None)
        async def stats(request: Request, window: str = "24h", route: str | None = None,
                        buckets: int = 24) -> Any:  # fmt: skip
            refused = check(request)
            if refused:
                return refused
            if window == "1h":  # the ledger is down: 503, its writer's health still told
                error = {"message": "the ledger is unavailable", "type": "overloaded_error",
                         "param": None, "code": None}  # fmt: skip
                return JSONResponse({"error": error, "ledger": LEDGER_FAILING}, 503)
            body = stats_for(route)
            seconds = {"15m": 900, "1h": 3600, "24h": 86400, "7d": 604800}.get(window)
            start = NOW - seconds if seconds else NOW - 30 * 86400
            body["window"] = {"start": start, "end": NOW, "seconds": seconds}
            body["ledger"] = LEDGER_FAILING if route == "cheap" else LEDGER_OK
            return body

        @app.get("/v1/tasks", response_model=None)
        async def tasks(request: Request, route: str | None = None, limit: int = 50) -> Any:
            refused = check(request)
            rows = [t for t in TASKS if route in (None, t["route"])]
            return refused or {"object": "list", "data": rows[:limit]}

        @app.get("/v1/tasks/{task_id}", response_model=None)
        async def task(request: Request, task_id: str) -> Any:
            refused = check(request)
            if refused:
                return refused
            if task_id == "t-1":
                return DETAIL
            match = next((t for t in TASKS if t["task_id"] == task_id), None)
            if match is None:
                return JSONResponse({"error": {"message": "no such task"}}, 404)
            return {
                **{k: match[k] for k in ("task_id", "created_at", "success", "outcome_source")},
                "score": None,
                "requests": [],
            }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def standin() -> Iterator[tuple[StandIn, str]]:
    fake = StandIn()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(fake.app, host="127.0.0.1", port=port,
                                           log_level="warning"))  # fmt: skip
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "stand-in server did not start"
        time.sleep(0.05)
    try:
        yield fake, f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} missing: apt-get install -y chromium chromium-driver")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh page that records every URL it requests and every console error."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    pg.requested = []
    pg.errors = []
    pg.on("request", lambda r: pg.requested.append(r.url))
    pg.on("console", lambda m: pg.errors.append(m.text) if m.type == "error" else None)
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    yield pg
    context.close()


def artifacts() -> Path:
    root = os.environ.get("SLMGATE_ARTIFACTS")
    out = Path(root) if root else Path(__file__).resolve().parents[1] / "artifacts"
    out.mkdir(parents=True, exist_ok=True)
    return out


def open_dashboard(page: Any, base: str, query: str = "", key: str = KEY) -> None:
    """Open the page and type the key into its form, as a person does (never in the URL)."""
    page.goto(f"{base}/dashboard{'?' + query if query else ''}")
    page.wait_for_function("() => document.body.dataset.ready === 'auth'", timeout=20_000)
    page.fill("[data-testid=key-input]", key)
    page.press("[data-testid=key-input]", "Enter")
    wait_ready(page)


def wait_ready(page: Any) -> None:
    page.wait_for_function("() => document.body.dataset.ready !== '0'", timeout=20_000)
    assert page.evaluate("document.body.dataset.ready") == "1", page.text_content("#error")


def wait_detail(page: Any, task_id: str) -> None:
    # A function with an argument: the page's CSP forbids evaluating built-up strings.
    page.wait_for_function("id => document.body.dataset.detail === id", arg=task_id,
                           timeout=10_000)  # fmt: skip


def card_values(page: Any) -> dict[str, str]:
    return dict(page.eval_on_selector_all(
        "#cards [data-testid][data-value]",
        "els => els.map(e => [e.dataset.testid, e.dataset.value])"))  # fmt: skip


def assert_cards_equal(page: Any, stats: dict[str, Any]) -> None:
    values = card_values(page)
    assert set(values) == set(CARD_PATHS) | {"savings-pct", "cps-other", "success-rate-other"}
    for testid, path in CARD_PATHS.items():
        assert shown(values[testid]) == dig(stats, path), testid
    cf, saved = stats["counterfactual_cost_usd"], stats["savings_usd"]
    assert shown(values["savings-pct"]) == (saved / cf if cf else None)
    # the headline says its basis; the other basis is shown beside it, named
    basis = stats["cps_basis"]
    other = {"reported": "inferred", "inferred": "reported"}[basis]
    for card in ("cps", "success-rate"):
        assert page.text_content(f"[data-testid={card}-source]") == basis
        assert page.get_attribute(f"[data-testid={card}]", "data-basis") == basis
    assert shown(values["cps-other"]) == stats["outcomes"][other]["cps_usd"]
    assert shown(values["success-rate-other"]) == stats["outcomes"][other]["success_rate"]
    assert page.text_content("[data-testid=trend-basis]") == f" · {basis} outcomes"
    sub = page.text_content("[data-testid=card-cps] .sub") or ""
    assert sub.startswith(other + " ")
    savings = page.text_content("[data-testid=savings]")
    if saved is None:
        assert savings == ("n/a — top tier has no price" if stats["requests"] else "—")
    else:
        assert (savings or "").startswith(("$", "-$"))
    measured = stats["energy"]["measured"]
    label = {True: "measured", False: "estimated", None: "none"}[measured]
    assert page.get_attribute("[data-testid=energy-per-request]", "data-measured") == label


def bars(page: Any, chart: str) -> dict[str, float | None]:
    pairs = page.eval_on_selector_all(
        f"[data-testid={chart}] rect[data-testid=bar]",
        "els => els.map(e => [e.dataset.key, e.dataset.value])")  # fmt: skip
    return {k: shown(v) for k, v in pairs}


def assert_charts_equal(page: Any, stats: dict[str, Any]) -> None:
    series = stats["series"]
    for testid, field in (("cps", "cps_usd"), ("success", "success_rate")):
        points = page.eval_on_selector_all(
            f"[data-testid=chart-trend] [data-testid={testid}-point]",
            "els => els.map(e => [Number(e.dataset.index), e.dataset.value])")  # fmt: skip
        expected = [(i, b[field]) for i, b in enumerate(series) if b[field] is not None]
        assert [(i, shown(v)) for i, v in points] == expected, testid
    tiers = stats["by_tier"]
    assert bars(page, "chart-cost-by-tier") == {t: v["cost_usd"] for t, v in tiers.items()}
    tokens = {f"{t}:in": v["prompt_tokens"] for t, v in tiers.items()}
    tokens |= {f"{t}:out": v["completion_tokens"] for t, v in tiers.items()}
    assert bars(page, "chart-tokens-by-tier") == tokens
    assert bars(page, "chart-fallback-reasons") == stats["fallback_reasons"]
    keys = stats.get("by_key", [])
    assert bars(page, "chart-spend-by-key") == {k["key_id"]: k["cost_usd"] for k in keys}
    if stats["requests"]:
        assert bars(page, "chart-savings") == {
            "actual": stats["cost_usd"],
            "top_tier": stats["counterfactual_cost_usd"],
        }


def assert_tasks_equal(page: Any, rows: list[dict[str, Any]]) -> None:
    shown_rows = page.eval_on_selector_all(
        "[data-testid=task-row]",
        """els => els.map(e => ({
        id: e.dataset.taskId, text: e.querySelector('[data-testid=task-id]').textContent,
        requests: e.querySelector('[data-testid=task-requests]').dataset.value,
        cost: e.querySelector('[data-testid=task-cost]').dataset.value,
        success: e.querySelector('[data-testid=success]').dataset.value,
        tiers: e.querySelector('[data-testid=task-tiers]').textContent}))""",
    )
    assert len(shown_rows) == len(rows)
    for got, want in zip(shown_rows, rows, strict=True):
        assert got["id"] == got["text"] == want["task_id"]
        assert shown(got["requests"]) == want["requests"]
        assert shown(got["cost"]) == want["cost_usd"]
        assert got["success"] == {True: "true", False: "false", None: ""}[want["success"]]
        assert got["tiers"] == ", ".join(want["tiers"])


# ---- without a browser -----------------------------------------------------------------------


def test_dashboard_shell_is_open_carries_no_data_and_pins_its_script() -> None:
    """The shell needs no key (a person types it into the page); a ?key= changes nothing."""
    client = TestClient(StandIn().app)
    pages = [client.get("/dashboard"), client.get("/dashboard", params={"key": KEY}),
             client.get("/dashboard", headers={"Authorization": f"Bearer {KEY}"})]  # fmt: skip
    for ok in pages:
        assert ok.status_code == 200
        assert ok.headers["cache-control"] == "no-store"
        assert ok.headers["referrer-policy"] == "no-referrer"
        csp = ok.headers["content-security-policy"]
        nonce = re.search(r"script-src 'nonce-([^']+)'", csp)
        assert nonce is not None
        assert "connect-src 'self'" in csp
        assert re.findall(r"<script nonce=\"([^\"]+)\"", ok.text) == [nonce.group(1)]
        # No CDN or other host: the only absolute URL is the SVG namespace.
        assert set(re.findall(r"https?://[^\s\"'`)]+", ok.text)) == {"http://www.w3.org/2000/svg"}
        assert '<body data-ready="0" data-auth="key">' in ok.text  # ask for a key up front
        assert KEY not in ok.text
    # the same page whatever the URL says, bar the per-response nonce
    nonces = [
        re.findall(r"'nonce-([^']+)'", p.headers["content-security-policy"])[0] for p in pages
    ]
    assert len({p.text.replace(n, "") for p, n in zip(pages, nonces, strict=True)}) == 1
    assert 'get("key")' not in pages[0].text  # the script never reads a key from the URL


def test_dashboard_is_open_without_configured_keys() -> None:
    app = FastAPI()
    app.include_router(dashboard_router(lambda: []))
    page = TestClient(app).get("/dashboard")
    assert page.status_code == 200
    assert '<body data-ready="0" data-auth="open">' in page.text


def test_a_single_key_string_is_one_key() -> None:
    app = FastAPI()
    app.include_router(dashboard_router("sk-one"))
    page = TestClient(app).get("/dashboard")
    assert page.status_code == 200
    assert 'data-auth="key"' in page.text


# ---- in Chromium -----------------------------------------------------------------------------


@pytest.mark.slow
def test_numbers_and_charts_equal_the_stats(page: Any, standin: tuple[StandIn, str]) -> None:
    fake, base = standin
    fake.seen.clear()
    open_dashboard(page, base, "window=24h")
    assert page.evaluate("sessionStorage.getItem('slmgate.key')") == KEY
    assert page.input_value("[data-testid=key-input]") == ""  # not left in the DOM
    stats = httpx.get(f"{base}/v1/stats", params={"window": "24h", "buckets": 24},
                      headers={"Authorization": f"Bearer {KEY}"}).json()  # fmt: skip
    assert_cards_equal(page, stats)
    assert_charts_equal(page, stats)
    assert_tasks_equal(page, TASKS)
    assert page.is_hidden("[data-testid=ledger-health]")
    # Formatted text says the same as the raw values.
    assert page.text_content("[data-testid=success-rate]") == "75.0%"
    assert page.text_content("[data-testid=success-rate-other]") == "80.0%"  # inferred
    assert page.text_content("[data-testid=fallback-rate]") == "20.0%"
    assert page.text_content("[data-testid=latency-p50]") == "412 ms"
    assert page.text_content("[data-testid=latency-p95]") == "2.75 s"
    assert page.text_content("[data-testid=energy-per-request-source]") == "estimated"
    # Caller-controlled strings are text, not markup.
    assert page.evaluate("document.body.dataset.pwned") is None
    assert page.locator("img").count() == 0
    # Every fetch carried the key; nothing left the gateway's origin.
    api_calls = [s for s in fake.seen if s[0].startswith("/v1/")]
    assert {path for path, _, _ in api_calls} == {"/v1/models", "/v1/stats", "/v1/tasks"}
    assert all(auth == f"Bearer {KEY}" for _, _, auth in api_calls)
    assert all(url.startswith(base) for url in page.requested)
    assert page.errors == []
    page.screenshot(path=str(artifacts() / "dashboard.png"), full_page=True)


@pytest.mark.slow
def test_route_and_window_selectors(page: Any, standin: tuple[StandIn, str]) -> None:
    fake, base = standin
    open_dashboard(page, base)
    assert page.eval_on_selector_all("#route option", "els => els.map(e => e.value)") == [
        "",
        "auto",
        "cheap",
        "empty",
    ]
    fake.seen.clear()
    page.select_option("#route", "cheap")
    wait_ready(page)
    assert_cards_equal(page, stats_for("cheap"))
    assert_charts_equal(page, stats_for("cheap"))
    assert_tasks_equal(page, [t for t in TASKS if t["route"] == "cheap"])
    assert page.text_content("[data-testid=energy-per-request-source]") == "measured"
    assert page.text_content("[data-testid=savings]") == "n/a — top tier has no price"
    assert page.text_content("[data-testid=cps-source]") == "inferred"
    assert page.text_content("[data-testid=cps-other]") == "—"  # nothing reported here
    assert page.text_content("[data-testid=ledger-health]") == (
        "Ledger: writes failing (OperationalError: database is locked); 3 records dropped, "
        "1 queued — figures may be incomplete."
    )
    page.select_option("#window", "1h")  # a ledger outage: 503 with the writer's health
    page.wait_for_function("() => document.body.dataset.ready !== '0'", timeout=20_000)
    assert page.evaluate("document.body.dataset.ready") == "error"
    assert page.text_content("[data-testid=error]") == (
        "Could not load the stats: the ledger is unavailable"
    )
    assert page.is_visible("[data-testid=ledger-health]")
    assert "3 records dropped" in (page.text_content("[data-testid=ledger-health]") or "")
    page.errors.clear()  # the browser logs the 503 itself
    page.select_option("#window", "7d")
    wait_ready(page)
    queries = [q for path, q, _ in fake.seen if path == "/v1/stats"]
    assert queries == ["window=24h&route=cheap&buckets=24", "window=1h&route=cheap&buckets=24",
                       "window=7d&route=cheap&buckets=24"]  # fmt: skip
    assert page.url.endswith("/dashboard?route=cheap&window=7d")
    page.select_option("#route", "empty")
    wait_ready(page)
    assert_cards_equal(page, stats_for("empty"))
    assert page.text_content("[data-testid=cps]") == "—"
    assert page.locator("[data-testid=chart-trend] [data-testid=empty]").count() == 1
    assert page.text_content("[data-testid=energy-per-request-source]") == "no data"
    assert page.errors == []


@pytest.mark.slow
def test_drill_down_to_one_task(page: Any, standin: tuple[StandIn, str]) -> None:
    _, base = standin
    open_dashboard(page, base)
    page.click("[data-testid=task-row][data-task-id='t-1']")
    wait_detail(page, "t-1")
    detail = page.locator("[data-testid=task-detail]")
    assert detail.locator("[data-testid=detail-task-id]").text_content() == "t-1"
    requests = detail.locator("[data-testid=request-row]")
    assert requests.count() == len(DETAIL["requests"])
    for i, req in enumerate(DETAIL["requests"]):
        row = requests.nth(i)
        assert row.get_attribute("data-request-id") == req["request_id"]
        assert shown(row.locator("[data-testid=req-cost]").get_attribute("data-value")) == \
            req["cost_usd"]  # fmt: skip
    outcomes = detail.locator("[data-testid=attempt-outcome]").all_text_contents()
    assert outcomes == [a["outcome"] for r in DETAIL["requests"] for a in r["attempts"]]
    costs = detail.locator("[data-testid=attempt-cost]").evaluate_all(
        "els => els.map(e => Number(e.dataset.value))"
    )
    assert costs == [a["cost_usd"] for r in DETAIL["requests"] for a in r["attempts"]]
    models = detail.locator("[data-testid=attempt-model]")
    assert models.all_text_contents() == ["slm-model", "Qwen2.5-Coder-0.5B.Q4_K_M.gguf",
                                          "slm-model"]  # fmt: skip
    assert models.nth(1).get_attribute("title") == LONG_MODEL
    page.screenshot(path=str(artifacts() / "dashboard-task.png"), full_page=True)
    # The task whose id is markup opens too (its id is URL-encoded, shown as text).
    page.locator("[data-testid=task-row]").nth(1).click()
    wait_detail(page, EVIL)
    assert detail.locator("[data-testid=detail-task-id]").text_content() == EVIL
    assert page.evaluate("document.body.dataset.pwned") is None
    assert page.errors == []


@pytest.mark.slow
def test_key_form_opens_the_dashboard(page: Any, standin: tuple[StandIn, str]) -> None:
    fake, base = standin
    fake.seen.clear()
    response = page.goto(f"{base}/dashboard")
    assert response.status == 200  # the shell: no data, no key needed
    page.wait_for_function("() => document.body.dataset.ready === 'auth'", timeout=20_000)
    assert page.is_visible("[data-testid=keybox]")
    assert fake.seen == []  # asked for the key before any call
    page.fill("[data-testid=key-input]", "sk-wrong")
    page.press("[data-testid=key-input]", "Enter")
    page.wait_for_function("() => document.body.dataset.ready === 'auth'", timeout=20_000)
    assert page.is_visible("[data-testid=keybox]")  # refused: asked again
    page.fill("[data-testid=key-input]", KEY)
    page.press("[data-testid=key-input]", "Enter")
    wait_ready(page)
    assert_cards_equal(page, stats_for(None))
    assert {auth for _, _, auth in fake.seen} == {"Bearer sk-wrong", f"Bearer {KEY}"}
    assert all("key" not in query for _, query, _ in fake.seen)
    assert all("key=" not in url for url in page.requested)
    # a reload keeps the key for the tab's session, out of every URL
    page.reload()
    wait_ready(page)
    assert "key=" not in page.url


@pytest.mark.slow
def test_a_key_in_the_url_is_never_used(page: Any, standin: tuple[StandIn, str]) -> None:
    fake, base = standin
    fake.seen.clear()
    page.goto(f"{base}/dashboard?key={KEY}&window=7d")
    page.wait_for_function("() => document.body.dataset.ready === 'auth'", timeout=20_000)
    assert fake.seen == []  # nothing sent with it
    assert page.evaluate("sessionStorage.getItem('slmgate.key')") is None
    assert page.url.endswith("/dashboard?window=7d")  # and it left the address bar


# ---- against a live gateway ------------------------------------------------------------------

CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": CITY}}
PERSON = {"type": "object", "properties": {"name": {"type": "string"},
                                           "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}  # fmt: skip
# xgrammar does not enforce ``contains``: the SLM's array fails validation and the cascade
# escalates (tests/integration/test_routing.py), so the run has two tiers and a fallback.
CONTAINS = {"type": "array", "items": {"type": "integer"}, "minItems": 3, "maxItems": 5,
            "contains": {"const": 7}}  # fmt: skip
Counters = dict[tuple[str, frozenset[tuple[str, str]]], float]


def json_schema(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "out", "schema": schema}}


def script(tag: str) -> list[tuple[str, str, dict[str, Any]]]:
    """(task id, route, body) of the scripted run: 4 tasks, 5 requests, two routes."""

    def user(text: str) -> list[dict[str, str]]:
        return [{"role": "user", "content": text}]

    return [
        (f"{tag}-a", "auto", {"messages": user("Give a JSON object with a name and an age."),
                              "response_format": {"type": "json_object"}}),
        (f"{tag}-a", "auto", {"messages": user("Say hi.")}),
        (f"{tag}-b", "auto", {"messages": user("Weather in Paris?"), "tools": [WEATHER_TOOL],
                              "tool_choice": "required"}),
        (f"{tag}-c", "cascade", {"messages": user("List 3 to 5 integers that include 7."),
                                 "response_format": json_schema(CONTAINS), "max_tokens": 40}),
        (f"{tag}-d", "cascade", {"messages": user("Extract: Ann Lee is 31 years old."),
                                 "response_format": json_schema(PERSON), "max_tokens": 40}),
    ]  # fmt: skip


def scrape_counters(base: str) -> Counters:
    from prometheus_client.parser import text_string_to_metric_families

    r = httpx.get(f"{base}/metrics", headers={"Authorization": f"Bearer {LIVE_KEY}"}, timeout=30)
    assert r.status_code == 200, "mount GatewayMetrics as GET /metrics (see gateway/metrics.py)"
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(r.text) for s in fam.samples}  # fmt: skip


def total(samples: Counters, name: str, **labels: str) -> float:
    """Sum of ``name`` over every label set that includes ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def live(request: pytest.FixtureRequest) -> dict[str, Any]:
    """A live ``slmgate serve`` after a scripted run of real requests and two reported outcomes,
    with /metrics before and after, and the ledger's view of every task the run made. SQLite:
    the shared ``server``; PostgreSQL: the shared ``pg_server`` (either ledger may hold other
    tests' rows)."""
    from tests.integration.conftest import KEY

    assert KEY == LIVE_KEY
    base: str = request.getfixturevalue("server" if request.param == "sqlite" else "pg_server")
    return run_script(base)


def run_script(base: str) -> dict[str, Any]:
    auth = {"Authorization": f"Bearer {LIVE_KEY}"}
    before = scrape_counters(base)
    steps = script(f"dash-{uuid.uuid4().hex[:8]}")
    tasks = sorted({task_id for task_id, _, _ in steps})
    usage: dict[str, list[dict[str, int]]] = {}
    with httpx.Client(base_url=base, headers=auth, timeout=600) as client:
        for task_id, route, body in steps:
            r = client.post("/v1/chat/completions", headers={"X-Task-Id": task_id},
                            json={"model": route, "max_tokens": 24, "temperature": 0,
                                  **body})  # fmt: skip
            assert r.status_code == 200, r.text
            usage.setdefault(route, []).append(r.json()["usage"])
        for task_id, success in ((tasks[0], True), (tasks[1], False)):
            r = client.post(f"/v1/tasks/{task_id}/outcome", json={"success": success})
            assert r.status_code == 200, r.text
        want = [sum(1 for t, _, _ in steps if t == task_id) for task_id in tasks]
        deadline = time.monotonic() + 60  # the ledger writes in the background
        while True:
            found = {t: client.get(f"/v1/tasks/{t}").json() for t in tasks}
            if [len(found[t].get("requests", [])) for t in tasks] == want:
                break
            assert time.monotonic() < deadline, f"the ledger has not got every request: {found}"
            time.sleep(0.2)
    return {"base": base, "tasks": tasks, "ledger": found, "usage": usage, "before": before,
            "after": scrape_counters(base)}  # fmt: skip


@pytest.mark.slow
def test_live_dashboard_equals_the_gateways_stats(page: Any, live: dict[str, Any]) -> None:
    base, auth = live["base"], {"Authorization": f"Bearer {LIVE_KEY}"}
    shell = httpx.get(f"{base}/dashboard", timeout=30)
    assert shell.status_code == 200  # the shell is open; its data is not
    assert 'data-auth="key"' in shell.text
    assert httpx.get(f"{base}/v1/stats", timeout=30).status_code == 401
    assert httpx.get(f"{base}/v1/stats", params={"key": LIVE_KEY}, timeout=30).status_code == 401
    # window=all: the page and this test read the same rows whatever the clock says.
    open_dashboard(page, base, "window=all", key=LIVE_KEY)
    for route in ("", "cascade", "auto"):
        if route:
            page.select_option("#route", route)
            wait_ready(page)
        query = {"window": "all", **({"route": route} if route else {})}
        stats = httpx.get(f"{base}/v1/stats", params={**query, "buckets": 24}, headers=auth)
        listed = httpx.get(f"{base}/v1/tasks", params={**query, "limit": 50}, headers=auth)
        assert_cards_equal(page, stats.json())
        assert_charts_equal(page, stats.json())
        assert_tasks_equal(page, listed.json()["data"])
        if not route:
            assert stats.json()["requests"] >= 5
            assert {t["task_id"] for t in listed.json()["data"]} >= set(live["tasks"])
            page.screenshot(path=str(artifacts() / "dashboard-live.png"), full_page=True)
    ours = {t["task_id"]: t for t in httpx.get(f"{base}/v1/tasks", params={"window": "all"},
                                               headers=auth).json()["data"]}  # fmt: skip
    a, b, c, _ = live["tasks"]
    assert (ours[a]["success"], ours[a]["outcome_source"]) == (True, "reported")
    assert (ours[b]["success"], ours[b]["outcome_source"]) == (False, "reported")
    assert ours[c]["outcome_source"] == "inferred"
    assert page.errors == []

    page.select_option("#route", "cascade")
    wait_ready(page)
    page.click(f"[data-testid=task-row][data-task-id='{c}']")
    wait_detail(page, c)
    detail = live["ledger"][c]
    rows = page.locator("[data-testid=task-detail] [data-testid=request-row]")
    ids = [rows.nth(i).get_attribute("data-request-id") for i in range(rows.count())]
    assert ids == [r["request_id"] for r in detail["requests"]]
    outcomes = page.locator("[data-testid=attempt-outcome]").all_text_contents()
    assert outcomes == [at["outcome"] for r in detail["requests"] for at in r["attempts"]]
    costs = page.locator("[data-testid=attempt-cost]").evaluate_all(
        "els => els.map(e => Number(e.dataset.value))"
    )
    assert costs == [at["cost_usd"] for r in detail["requests"] for at in r["attempts"]]
    page.screenshot(path=str(artifacts() / "dashboard-live-task.png"), full_page=True)


@pytest.mark.slow
def test_live_metrics_count_the_run(live: dict[str, Any]) -> None:
    """/metrics after the run moved by exactly what the ledger recorded for the run."""
    before, after = live["before"], live["after"]

    def delta(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    reqs = [r for task in live["ledger"].values() for r in task["requests"]]
    atts = [a for r in reqs for a in r["attempts"]]
    for route in ("auto", "cascade"):
        mine = [r for r in reqs if r["route"] == route]
        tried = [a for a in atts if a["route"] == route]
        assert delta("slmgate_request_latency_seconds_count", route=route) == len(mine)
        for r in {(r["tier"] or "none", str(r["status"])) for r in mine}:
            n = sum(1 for q in mine if (q["tier"] or "none", str(q["status"])) == r)
            assert delta("slmgate_requests_total", route=route, tier=r[0], status=r[1]) == n
        for tier, outcome in {(a["tier"], a["outcome"]) for a in tried}:
            n = sum(1 for a in tried if (a["tier"], a["outcome"]) == (tier, outcome))
            assert delta("slmgate_attempts_total", route=route, tier=tier, outcome=outcome) == n
        for tier in {a["tier"] for a in tried}:
            on = [a for a in tried if a["tier"] == tier]
            assert delta("slmgate_tokens_total", route=route, tier=tier, direction="in") == sum(
                a["prompt_tokens"] for a in on)  # fmt: skip
            assert delta("slmgate_tokens_total", route=route, tier=tier, direction="out") == sum(
                a["completion_tokens"] for a in on)  # fmt: skip
            assert delta("slmgate_cost_usd_total", route=route, tier=tier) == pytest.approx(
                sum(a["cost_usd"] for a in on), rel=1e-9, abs=1e-15)  # fmt: skip
        reasons = [r["fallback_reason"] or "unknown" for r in mine if r["fallback"]]
        assert delta("slmgate_fallbacks_total", route=route) == len(reasons)
        for reason in set(reasons):
            assert delta("slmgate_fallbacks_total", route=route, reason=reason) == \
                reasons.count(reason)  # fmt: skip
        for field, metric in (("schema_valid", "slmgate_schema_validity_total"),
                              ("executable", "slmgate_executable_calls_total")):  # fmt: skip
            for flag, result in ((True, "valid"), (False, "invalid")):
                n = sum(1 for r in mine if r[field] is flag)
                assert delta(metric, route=route, result=result) == n, (field, result)
    # The single-tier route's attempt tokens are what the responses reported as usage.
    assert delta("slmgate_tokens_total", route="auto", direction="out") == sum(
        u["completion_tokens"] for u in live["usage"]["auto"])  # fmt: skip
    assert delta("slmgate_requests_total") == len(reqs) == 5
