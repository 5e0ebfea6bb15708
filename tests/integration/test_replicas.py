"""Three ``slmgate serve`` replicas on loopback sharing one PostgreSQL ledger and one Redis, with
a client spreading requests over them (issue 17): a key's rate limit and budget hold whichever
replica a request reaches, a breaker opened by one replica is seen by the others, ``/v1/stats``
agrees on every replica, no ledger row is lost when a replica is stopped mid-run, and an OTLP
receiver gets each request's spans. The tier is a real remote backend (``kind: openai``) over a
fake upstream that answers at once, so the test measures the gateway, not a model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests import postgres
from tests.fake_upstream import ThreadedUpstream
from tests.otlp_receiver import OtlpReceiver

from .conftest import free_port, pg_schema

ADMIN = "sk-replicas-admin"
REDIS_URL = "redis://127.0.0.1:6379/0"
ROOT = Path(__file__).resolve().parents[2]
BODY = {"model": "up", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8}


def redis_or_fail(prefix: str) -> Any:
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_timeout=2, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        postgres.service_missing(f"Redis at 127.0.0.1:6379 is unreachable: {exc}")
    return client


@dataclass
class Replica:
    base: str
    proc: subprocess.Popen[bytes]

    def post(self, body: dict[str, Any], key: str, **headers: str) -> httpx.Response:
        return httpx.post(f"{self.base}/v1/chat/completions", json=body, timeout=30,
                          headers={"authorization": f"Bearer {key}", **headers})  # fmt: skip

    def get(self, path: str) -> httpx.Response:
        return httpx.get(f"{self.base}{path}", timeout=30,
                         headers={"authorization": f"Bearer {ADMIN}"})  # fmt: skip


@dataclass
class Cluster:
    replicas: list[Replica]
    config: Path
    ledger_url: str
    upstream: ThreadedUpstream
    flaky: ThreadedUpstream
    receiver: OtlpReceiver
    stack: ExitStack

    def start(self) -> Replica:
        return self.stack.enter_context(replica(self.config))

    def create_key(self, name: str, *args: str) -> dict[str, Any]:
        made = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "keys", "--ledger", self.ledger_url, "create",
             name, "--json", *args], capture_output=True, text=True, timeout=120, cwd=ROOT,
        )  # fmt: skip
        assert made.returncode == 0, made.stderr
        created: dict[str, Any] = json.loads(made.stdout)
        return created


@contextmanager
def replica(config: Path) -> Iterator[Replica]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", "--port", str(port), "--config",
         str(config), "--log-level", "warning"], env={**os.environ}, cwd=ROOT,
    )  # fmt: skip
    node = Replica(f"http://127.0.0.1:{port}", proc)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert proc.poll() is None, "a replica exited during startup"
            try:
                if node.get("/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail("a replica did not become ready")
        yield node
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=60)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    prefix = f"slmgate-test-{uuid.uuid4().hex[:10]}"
    redis_client = redis_or_fail(prefix)
    with ExitStack() as stack:
        ledger_url = stack.enter_context(pg_schema())
        upstream = stack.enter_context(ThreadedUpstream())
        flaky = stack.enter_context(ThreadedUpstream())
        receiver = stack.enter_context(OtlpReceiver())
        common = {"kind": "openai", "tier": "llm", "remote_model": "fake", "max_retries": 0,
                  "supports_logprobs": False, "price_in_per_mtok": 1000.0,
                  "price_out_per_mtok": 1000.0}  # fmt: skip
        config = tmp_path_factory.mktemp("replicas") / "slmgate.yaml"
        config.write_text(yaml.safe_dump({
            "api_keys": [ADMIN], "ledger_url": ledger_url, "redis_url": REDIS_URL,
            "redis_prefix": prefix, "otel_endpoint": receiver.endpoint,
            "models": [
                {"name": "up", "base_url": upstream.base_url, **common},
                {"name": "flaky", "base_url": flaky.base_url, "breaker_failures": 2,
                 "breaker_reset_s": 120.0, **common},
            ],
        }))  # fmt: skip
        with ThreadPoolExecutor(3) as pool:  # start together: each imports the model stack
            futures = [pool.submit(lambda: stack.enter_context(replica(config))) for _ in range(3)]
            replicas = [f.result() for f in futures]
        try:
            yield Cluster(replicas, config, ledger_url, upstream, flaky, receiver, stack)
        finally:
            for name in redis_client.scan_iter(f"{prefix}:*"):
                redis_client.delete(name)
            redis_client.close()


def wait_for_a_fresh_minute(margin_s: float = 15.0) -> None:
    """Rate limits count per UTC minute: start where the minute cannot turn mid-test."""
    left = 60 - time.time() % 60
    if left < margin_s:
        time.sleep(left + 0.5)


def test_a_keys_rate_limit_holds_across_replicas(cluster: Cluster) -> None:
    key = cluster.create_key("rpm-4", "--rpm", "4")["key"]
    r = cluster.replicas
    wait_for_a_fresh_minute()
    codes = [node.post(BODY, key).status_code for node in (r[0], r[1], r[2], r[0])]
    assert codes == [200, 200, 200, 200]
    for node in (r[1], r[2], r[0]):  # the 5th and later, whichever replica gets them
        refused = node.post(BODY, key)
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "requests_per_minute_exceeded"
        assert 1 <= int(refused.headers["retry-after"]) <= 60


def test_a_keys_budget_holds_across_replicas(cluster: Cluster) -> None:
    created = cluster.create_key("budget", "--budget-daily", "0.001")
    r = cluster.replicas
    first = r[0].post(BODY, created["key"])
    assert first.status_code == 200
    usage = first.json()["usage"]
    assert (usage["prompt_tokens"] + usage["completion_tokens"]) * 1000.0 / 1e6 > 0.001
    time.sleep(0.5)  # the spend is counted right after the answer, off the response path
    for node in (r[1], r[2], r[0]):
        refused = node.post(BODY, created["key"])
        assert refused.status_code == 429
        assert refused.json()["error"]["type"] == "insufficient_quota"


def test_a_breaker_opened_by_one_replica_is_seen_by_the_others(cluster: Cluster) -> None:
    r, flaky = cluster.replicas, cluster.flaky
    body = {**BODY, "model": "flaky"}
    flaky.failing = True
    statuses = [r[0].post(body, ADMIN).status_code for _ in range(3)]
    assert statuses[:2] == [502, 502]  # two upstream failures open replica 0's breaker
    assert statuses[2] == 503
    flaky.failing = False  # healthy again: only the shared breaker keeps the others away
    served = flaky.served
    time.sleep(1.5)  # breakers are synced every 0.5 s
    for node in (r[1], r[2]):
        refused = node.post(body, ADMIN)
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "circuit_open"
    assert flaky.served == served  # the other replicas never called the upstream


def stats_of(node: Replica) -> dict[str, Any]:
    body: dict[str, Any] = node.get("/v1/stats?window=7d").json()
    return {k: body[k] for k in ("requests", "errors", "cost_usd", "by_key", "by_tier",
                                 "fallback_rate", "tasks")}  # fmt: skip


def test_stats_agree_on_every_replica_and_spans_reach_the_collector(cluster: Cluster) -> None:
    created = cluster.create_key("traced", "--rpm", "1000")
    r = cluster.replicas
    caller_trace, caller_span = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    for i, node in enumerate(r * 2):
        headers = {"x-task-id": f"traced-{i}"}
        if i == 0:  # a caller with its own trace: the gateway's spans join it
            headers["traceparent"] = f"00-{caller_trace}-{caller_span}-01"
        assert node.post(BODY, created["key"], **headers).status_code == 200
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # each replica's ledger writer flushes on its own
        views = [stats_of(node) for node in r]
        traced = [row for row in views[0]["by_key"] if row["name"] == "traced"]
        if traced and traced[0]["requests"] == 6 and all(v == views[0] for v in views):
            break
        time.sleep(0.5)
    assert all(v == views[0] for v in views), views
    (row,) = [row for row in views[0]["by_key"] if row["name"] == "traced"]
    assert (row["key_id"], row["requests"], row["errors"]) == (created["key_id"], 6, 0)
    deadline = time.monotonic() + 30  # each replica's span processor exports in batches
    while time.monotonic() < deadline:
        spans = cluster.receiver.spans()
        mine = [s for s in spans if s["attributes"].get("slmgate.api_key.name") == "traced"]
        if len(mine) >= 6:
            break
        time.sleep(0.5)
    assert len(mine) == 6
    for span in mine:
        attrs = span["attributes"]
        assert span["name"] == "chat up"
        assert attrs["gen_ai.operation.name"] == "chat"
        assert attrs["gen_ai.request.model"] == "up"
        assert attrs["gen_ai.conversation.id"].startswith("traced-")
        assert attrs["gen_ai.usage.input_tokens"] > 0
        assert attrs["gen_ai.usage.cost"] > 0
        children = [s for s in spans if s["parent_span_id"] == span["span_id"]]
        assert [c["attributes"]["slmgate.outcome"] for c in children] == ["accepted"]
    (joined,) = [s for s in mine if s["attributes"]["gen_ai.conversation.id"] == "traced-0"]
    assert (joined["trace_id"], joined["parent_span_id"]) == (caller_trace, caller_span)


def test_no_ledger_row_is_lost_when_a_replica_is_stopped_mid_run(cluster: Cluster) -> None:
    extra = cluster.start()
    nodes = [cluster.replicas[0], cluster.replicas[1], extra]
    answered: dict[str, str] = {}  # task id -> request id of the 200 the client got
    lock = threading.Lock()

    def one(i: int) -> None:
        task = f"kill-{uuid.uuid4().hex[:8]}-{i}"
        for node in (nodes[i % 3], nodes[0]):  # a refused connection goes to another replica
            try:
                reply = node.post(BODY, ADMIN, **{"x-task-id": task})
            except httpx.TransportError:
                continue
            if reply.status_code == 200:
                with lock:
                    answered[task] = reply.json()["id"]
                return

    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(one, i) for i in range(60)]
        while len(answered) < 15:
            time.sleep(0.02)
        extra.proc.send_signal(signal.SIGTERM)  # what an orchestrator sends first
        for future in futures:
            future.result()
    # uvicorn shuts down gracefully (in-flight requests answered, the ledger flushed), then
    # re-raises the signal so the exit status says what stopped it
    assert extra.proc.wait(timeout=60) in (0, -signal.SIGTERM)
    assert len(answered) == 60
    for task, request_id in answered.items():
        found = cluster.replicas[2].get(f"/v1/tasks/{task}")
        assert found.status_code == 200, task
        assert [q["request_id"] for q in found.json()["requests"]] == [request_id]
