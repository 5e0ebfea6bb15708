"""API keys as records, through a live app: who may call what, limits that answer 403/429 the
way OpenAI does, spend per key in /v1/stats, revocation, and the key directory's cache. The tier
is a real remote backend (``kind: openai``) over a fake upstream that answers at once."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from decoding.models import ModelSpec, build_backend
from gateway.app import create_app
from gateway.config import GatewayConfig
from gateway.keys import KeyDirectory
from router.ledger import Ledger
from router.ledger.key_store import KeyLimits
from router.router import Route, Router
from schemas.errors import OverloadedError
from tests.fake_upstream import ThreadedUpstream

ADMIN = "sk-static-admin"
BODY = {"model": "up", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}


@pytest.fixture(scope="module")
def upstream() -> Iterator[ThreadedUpstream]:
    with ThreadedUpstream() as up:
        yield up


def model_spec(up: ThreadedUpstream) -> ModelSpec:
    return ModelSpec.from_mapping({
        "name": "up", "kind": "openai", "tier": "llm", "base_url": up.base_url,
        "remote_model": "fake", "price_in_per_mtok": 1000.0, "price_out_per_mtok": 1000.0,
        "max_retries": 0, "supports_logprobs": False,
    })  # fmt: skip


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    with Ledger(f"sqlite:///{tmp_path / 'ledger.sqlite3'}") as led:
        yield led


@pytest.fixture
async def client(upstream: ThreadedUpstream, ledger: Ledger) -> AsyncIterator[httpx.AsyncClient]:
    spec = model_spec(upstream)
    config = GatewayConfig(models=(spec,), routes=(), api_keys=(ADMIN,))
    router = Router({"up": build_backend(spec)}, {"up": Route("up", ("up",)),
                                                  "other": Route("other", ("up",))})  # fmt: skip
    app = create_app(config, router, ledger)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        c.app = app  # type: ignore[attr-defined]
        yield c
    await app.state.gateway.settled()


def auth(secret: str) -> dict[str, str]:
    return {"authorization": f"Bearer {secret}"}


async def test_key_records_authenticate_and_are_limited_to_their_models(
    client: httpx.AsyncClient, ledger: Ledger
) -> None:
    _, secret = ledger.key_store().create("agent", KeyLimits(models=("up",)))
    assert (await client.post("/v1/chat/completions", json=BODY)).status_code == 401
    assert (await client.post("/v1/chat/completions", json=BODY,
                              headers=auth("sk-slmgate-wrong"))).status_code == 401  # fmt: skip
    ok = await client.post("/v1/chat/completions", json=BODY, headers=auth(secret))
    assert ok.status_code == 200
    other = await client.post("/v1/chat/completions", json={**BODY, "model": "other"},
                              headers=auth(secret))  # fmt: skip
    assert other.status_code == 403
    assert other.json()["error"]["type"] == "permission_error"
    assert other.json()["error"]["param"] == "model"
    # a key that only calls models may not read everyone's stats; an admin key may
    stats = await client.get("/v1/stats", headers=auth(secret))
    assert stats.status_code == 403
    assert (await client.get("/v1/stats", headers=auth(ADMIN))).status_code == 200
    assert (await client.get("/v1/models", headers=auth(secret))).status_code == 200


async def test_rpm_over_the_limit_is_a_429_with_retry_after(
    client: httpx.AsyncClient, ledger: Ledger
) -> None:
    _, secret = ledger.key_store().create("burst", KeyLimits(rpm=2))
    codes = [
        (await client.post("/v1/chat/completions", json=BODY, headers=auth(secret))).status_code
        for _ in range(2)
    ]
    refused = await client.post("/v1/chat/completions", json=BODY, headers=auth(secret))
    if codes != [200, 200]:  # the minute turned between the two: the window restarted
        pytest.skip("a minute boundary fell inside the test")
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "requests_per_minute_exceeded")
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert "2 requests per minute" in error["message"]


async def test_a_spent_budget_is_refused_and_spend_shows_per_key_in_stats(
    client: httpx.AsyncClient, ledger: Ledger
) -> None:
    key, secret = ledger.key_store().create("thrifty", KeyLimits(budget_daily_usd=0.001))
    first = await client.post("/v1/chat/completions", json=BODY, headers=auth(secret))
    assert first.status_code == 200
    await client.app.state.gateway.settled()  # type: ignore[attr-defined]
    refused = await client.post("/v1/chat/completions", json=BODY, headers=auth(secret))
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert (error["type"], error["code"]) == ("insufficient_quota", "insufficient_quota")
    assert "daily budget of $0.0010" in error["message"]
    ledger.flush()
    stats = (await client.get("/v1/stats", headers=auth(ADMIN))).json()
    (row,) = stats["by_key"]
    usage = first.json()["usage"]
    assert row["key_id"] == key.key_id
    assert row["name"] == "thrifty"
    assert row["requests"] == 1  # the refused request never ran, so it is not billed
    assert row["tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert row["cost_usd"] == pytest.approx(row["tokens"] * 1000.0 / 1e6)


async def test_a_revoked_key_stops_working(client: httpx.AsyncClient, ledger: Ledger) -> None:
    store = ledger.key_store()
    key, secret = store.create("leaver", KeyLimits())
    assert (await client.post("/v1/chat/completions", json=BODY,
                              headers=auth(secret))).status_code == 200  # fmt: skip
    assert store.revoke(key.key_id)
    client.app.state.gateway.keys._cache.clear()  # type: ignore[attr-defined]  # the ttl passing
    assert (await client.post("/v1/chat/completions", json=BODY,
                              headers=auth(secret))).status_code == 401  # fmt: skip


async def test_redis_down_never_fails_a_request_and_is_visible(
    upstream: ThreadedUpstream, ledger: Ledger
) -> None:
    spec = model_spec(upstream)
    config = GatewayConfig(models=(spec,), routes=(), api_keys=(ADMIN,),
                           redis_url="redis://127.0.0.1:1/0")  # nothing listens on port 1
    app = create_app(config, Router({"up": build_backend(spec)}, {"up": Route("up", ("up",))}),
                     ledger)  # fmt: skip
    _, secret = ledger.key_store().create("limited", KeyLimits(rpm=100, budget_daily_usd=5.0))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://test") as client:  # fmt: skip
        for _ in range(3):
            reply = await client.post("/v1/chat/completions", json=BODY, headers=auth(secret))
            assert reply.status_code == 200
        await app.state.gateway.settled()
        ready = (await client.get("/readyz", headers=auth(ADMIN))).json()
        metrics = (await client.get("/metrics", headers=auth(ADMIN))).text
    shared = ready["shared_state"]
    assert (shared["configured"], shared["up"]) == (True, False)
    assert shared["fallbacks"] >= 3
    assert "ConnectionError" in shared["last_error"] or "Connection" in shared["last_error"]
    assert "slmgate_shared_state_up 0.0" in metrics
    assert 'slmgate_shared_state_fallbacks_total{op="read_and_add"}' in metrics


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_the_directory_caches_verdicts_and_keeps_them_through_an_outage(
    ledger: Ledger,
) -> None:
    store, clock = ledger.key_store(), Clock()
    keys = KeyDirectory(lambda: (), store, ttl_s=2.0, clock=clock)
    assert await keys.required() is False  # an open gateway until a key exists
    key, secret = store.create("a", KeyLimits())
    assert await keys.required() is False  # read 0 s ago
    clock.now = 2.0
    assert await keys.required() is True
    caller = await keys.resolve(secret)
    assert caller is not None
    assert caller.key_id == key.key_id
    assert not caller.admin
    store.revoke(key.key_id)
    assert await keys.resolve(secret) is not None  # cached for ttl_s
    clock.now = 4.0
    assert await keys.resolve(secret) is None

    def down(*args: Any) -> Any:
        raise OSError("database down")

    store.find = down  # type: ignore[method-assign]
    store.any_active = down  # type: ignore[method-assign]
    clock.now = 10.0
    assert await keys.resolve(secret) is None  # the last verdict, through the outage
    with pytest.raises(OverloadedError):
        await keys.resolve("sk-slmgate-never-seen")
    clock.now = 20.0
    assert await keys.required() is True  # as last read, not open because the database is down
    assert await KeyDirectory(lambda: ("sk-admin",), store).required() is True


def test_the_keys_command_creates_lists_and_revokes(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'k.sqlite3'}"

    def keys(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "gateway.cli", "keys", "--ledger", url,
                               *args], capture_output=True, text=True, timeout=120)  # fmt: skip

    made = keys("create", "ci-bot", "--rpm", "5", "--budget-monthly", "20", "--models",
                "auto,llm", "--json")  # fmt: skip
    assert made.returncode == 0, made.stderr
    created = json.loads(made.stdout)
    assert created["key"].startswith("sk-slmgate-")
    assert (created["rpm"], created["budget_monthly_usd"]) == (5, 20.0)
    assert created["models"] == ["auto", "llm"]
    listed = json.loads(keys("list", "--json").stdout)
    assert [k["key_id"] for k in listed] == [created["key_id"]]
    assert "key" not in listed[0]  # secrets are never listed
    assert keys("revoke", "ci-bot").returncode == 0
    assert json.loads(keys("list", "--json").stdout) == []
    assert keys("revoke", "ci-bot").returncode == 1
    bad = keys("create", "x", "--rpm", "0")
    assert bad.returncode == 2
    assert "rpm must be >= 1" in bad.stderr
    with Ledger(url) as ledger:  # only the hash is stored
        engine = ledger._engine
        with engine.connect() as conn:
            stored = conn.exec_driver_sql("SELECT key_hash FROM api_keys").scalar_one()
    assert created["key"] not in stored
    assert len(stored) == 64


def test_concurrency_is_counted_per_key_record_not_per_address(ledger: Ledger) -> None:
    from starlette.requests import Request

    from gateway.keys import Caller
    from gateway.metrics import GatewayMetrics
    from gateway.state import Gateway

    gw = Gateway(GatewayConfig(routes=()), None, ledger, GatewayMetrics())
    key, _ = ledger.key_store().create("a", KeyLimits())

    def request(caller: Caller | None) -> Request:
        state = {} if caller is None else {"caller": caller}
        return Request({"type": "http", "headers": [], "client": ("10.0.0.1", 5),
                        "state": state})  # fmt: skip

    assert gw.caller(request(Caller(key))) == f"key:{key.key_id}"
    assert gw.caller(request(None)) == "ip:10.0.0.1"
