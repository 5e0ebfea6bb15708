"""Admission: what the gateway refuses before any model work, and how (issue 11). The scripted
backend stands in for a model only to observe that refused requests never reach it."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from decoding.types import GenerationRequest, SamplingParams
from gateway.admission import check_task_id
from gateway.app import create_app
from gateway.config import GatewayConfig, Limits, from_mapping
from gateway.guard import bearer_key, is_json_content_type
from router.router import Route, Router
from schemas.errors import InvalidRequestError, OverloadedError
from schemas.json_limits import lone_surrogate_path, raw_json_depth
from tests.unit.gateway.test_failure_paths import BODY, ScriptedBackend, events

KEY = "sk-admission"
AUTH = {"authorization": f"Bearer {KEY}"}
WHOLE = {**BODY, "stream": False}


def client_for(
    backend: ScriptedBackend, limits: Limits | None = None, keys: tuple[str, ...] = ()
) -> httpx.AsyncClient:
    config = GatewayConfig(routes=(Route("auto", ("slm",)),), limits=limits or Limits(),
                           ledger_url="off", api_keys=keys)  # fmt: skip
    router = Router({"slm": backend}, {"auto": Route("auto", ("slm",))})
    app = create_app(config, router)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def error_of(r: httpx.Response) -> dict[str, Any]:
    body = r.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return dict(body["error"])


# ---- pure checks -----------------------------------------------------------------------------


def test_json_depth_counts_containers_not_brackets_in_strings() -> None:
    assert raw_json_depth(b'{"a": [1, {"b": "[[[[{{{"}]}') == 3
    assert raw_json_depth(b'"[[[["') == 0
    assert raw_json_depth(b'{"a": "\\"[[["}') == 1  # escaped quote stays inside the string
    assert raw_json_depth(b"[" * 10_000 + b"]" * 10_000) == 10_000
    assert raw_json_depth(b"42") == 0


def test_lone_surrogates_are_found_with_their_path() -> None:
    body = b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}'
    assert lone_surrogate_path(body, json.loads(body)) == "messages.0.content"
    pair = b'{"messages": [{"content": "\\ud83d\\ude00"}]}'  # a valid pair: one emoji
    assert lone_surrogate_path(pair, json.loads(pair)) is None
    key = b'{"metadata": {"\\udfff": 1}}'
    assert lone_surrogate_path(key, json.loads(key)) == "metadata"
    plain = b'{"a": "no escapes"}'
    assert lone_surrogate_path(plain, json.loads(plain)) is None


def test_content_types_and_bearer_keys() -> None:
    assert is_json_content_type("application/json")
    assert is_json_content_type("Application/JSON; charset=utf-8")
    assert is_json_content_type("application/merge-patch+json")
    assert not is_json_content_type("text/plain")
    assert not is_json_content_type("application/x-www-form-urlencoded")
    assert bearer_key("Bearer abc") == "abc"
    assert bearer_key("bearer  abc ") == "abc"
    assert bearer_key("Basic abc") == ""


@pytest.mark.parametrize("bad", ["", "a b", "x" * 257, "ü", "a\tb", "../../etc/passwd\n"])
def test_bad_task_ids_are_400(bad: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        check_task_id(bad, "task_id")
    assert info.value.param == "task_id"


def test_task_ids_within_bounds_pass() -> None:
    assert check_task_id("task-42/step:3", "task_id") == "task-42/step:3"
    assert check_task_id("x" * 256, "task_id") == "x" * 256


def test_models_without_routes_get_routes_that_fit() -> None:
    models = [{"name": "slm", "source": "builtin:smollm2-135m-instruct"},
              {"name": "llm", "source": "builtin:smollm2-135m-instruct"}]  # fmt: skip
    assert [r.name for r in from_mapping({"models": models}).routes] == ["auto", "pre", "reason"]
    remote = [{"name": "slm", "source": "builtin:smollm2-135m-instruct"},
              {"name": "llm", "kind": "openai", "base_url": "http://127.0.0.1:9/v1",
               "remote_model": "m"}]  # fmt: skip
    assert [r.name for r in from_mapping({"models": remote}).routes] == ["auto", "pre"]
    only = from_mapping({"models": [{"name": "mine", "source": "builtin:smollm2-135m-instruct"}]})
    assert only.routes == ()


def test_unknown_limit_keys_are_named() -> None:
    with pytest.raises(ValueError, match="max_tokenz"):
        from_mapping({"limits": {"max_tokenz": 3}})


# ---- through the app -------------------------------------------------------------------------


async def test_every_path_but_healthz_needs_the_key_and_never_from_the_url() -> None:
    async with client_for(ScriptedBackend(["a"]), keys=(KEY,)) as client:
        for path in ("/readyz", "/docs", "/redoc", "/openapi.json", "/metrics", "/v1/models",
                     "/v1/stats", "/v1/tasks"):  # fmt: skip
            r = await client.get(path)
            assert r.status_code == 401, path
            assert error_of(r)["code"] == "invalid_api_key"
            in_url = await client.get(path, params={"key": KEY})
            assert in_url.status_code == 401, path
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/readyz", headers=AUTH)).status_code == 200
        assert (await client.get("/openapi.json", headers=AUTH)).status_code == 200


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x"])  # fmt: skip
async def test_non_json_bodies_are_415(content_type: str | None) -> None:
    backend = ScriptedBackend(["a"])
    headers = {} if content_type is None else {"content-type": content_type}
    async with client_for(backend) as client:
        r = await client.post("/v1/chat/completions", content=json.dumps(WHOLE), headers=headers)
        outcome = await client.post("/v1/tasks/t/outcome", content=b'{"success": true}',
                                    headers=headers)  # fmt: skip
    assert r.status_code == 415
    assert error_of(r) == {"message": error_of(r)["message"], "type": "invalid_request_error",
                           "param": None, "code": "unsupported_media_type"}  # fmt: skip
    assert outcome.status_code == 415


async def test_deep_nesting_is_a_400_naming_the_limit() -> None:
    deep = '{"model": "auto", "messages": [{"role": "user", "content": "hi"}], "metadata": ' + (
        '{"a": ' * 10_000 + "1" + "}" * 10_000 + "}")  # fmt: skip
    async with client_for(ScriptedBackend(["a"])) as client:
        r = await client.post("/v1/chat/completions", content=deep,
                              headers={"content-type": "application/json"})  # fmt: skip
        after = await client.post("/v1/chat/completions", json=WHOLE)
    assert r.status_code == 400
    error = error_of(r)
    assert error["code"] == "request_too_large"
    assert "limits.max_json_depth" in error["message"]
    assert after.status_code == 200  # the server is fine


async def test_lone_surrogate_is_a_400_with_its_param() -> None:
    raw = json.dumps(WHOLE).replace('"hi"', '"hi \\ud800"')
    async with client_for(ScriptedBackend(["a"])) as client:
        r = await client.post("/v1/chat/completions", content=raw,
                              headers={"content-type": "application/json"})  # fmt: skip
    assert r.status_code == 400
    assert error_of(r)["param"] == "messages.0.content"
    assert "lone UTF-16 surrogate" in error_of(r)["message"]


async def test_choices_and_total_tokens_are_bounded() -> None:
    limits = Limits(max_choices=4, max_generated_tokens=1000)
    async with client_for(ScriptedBackend(["a"]), limits) as client:
        many = await client.post("/v1/chat/completions", json={**WHOLE, "n": 100})
        total = await client.post("/v1/chat/completions", json={**WHOLE, "n": 4,
                                                                "max_tokens": 300})
        new_name = await client.post("/v1/chat/completions",
                                     json={**WHOLE, "max_completion_tokens": 1001})
        fine = await client.post("/v1/chat/completions", json={**WHOLE, "n": 2,
                                                               "max_tokens": 500})
    assert many.status_code == 400
    assert error_of(many)["param"] == "n"
    assert error_of(many)["code"] == "request_too_large"
    assert total.status_code == 400
    assert error_of(total)["param"] == "max_tokens"
    assert "limits.max_generated_tokens" in error_of(total)["message"]
    assert error_of(new_name)["param"] == "max_completion_tokens"
    assert fine.status_code == 200


async def test_oversized_schemas_are_refused_before_any_check() -> None:
    big = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(200)}}
    limits = Limits(max_schema_bytes=2000)
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": big}}
    tool = {"type": "function", "function": {"name": "f", "parameters": big}}
    async with client_for(ScriptedBackend(["a"]), limits) as client:
        schema = await client.post("/v1/chat/completions", json={**WHOLE, "response_format": fmt})
        tools = await client.post("/v1/chat/completions", json={**WHOLE, "tools": [tool]})
    assert schema.status_code == tools.status_code == 400
    assert error_of(schema)["param"] == "response_format.json_schema.schema"
    assert error_of(schema)["code"] == "schema_too_complex"
    assert "limits.max_schema_bytes" in error_of(schema)["message"]
    assert error_of(tools)["param"] == "tools.0.function.parameters"


class Recording(ScriptedBackend):
    """Remembers the sampling parameters each request reached the backend with."""

    def __init__(self) -> None:
        super().__init__(["a"])
        self.seen: list[SamplingParams] = []

    def generate(self, req: GenerationRequest, prepared: Any = None) -> Any:
        self.seen.append(req.params)
        return super().generate(req, prepared)


async def test_without_max_tokens_the_budget_travels_but_nothing_is_refused() -> None:
    backend = Recording()
    async with client_for(backend, Limits(max_generated_tokens=1000)) as client:
        r = await client.post("/v1/chat/completions", json={**WHOLE, "n": 3})
    assert r.status_code == 200
    [params] = backend.seen
    assert (params.max_tokens, params.token_budget, params.n) == (None, 1000, 3)


async def test_one_key_cannot_take_every_slot() -> None:
    backend = ScriptedBackend(["a"] * 10, delay=0.05)
    async with client_for(backend, Limits(max_concurrent_per_key=2), keys=(KEY,)) as client:
        slow = [asyncio.create_task(client.post("/v1/chat/completions", json=WHOLE,
                                                headers=AUTH)) for _ in range(2)]  # fmt: skip
        await asyncio.sleep(0.1)
        third = await client.post("/v1/chat/completions", json=WHOLE, headers=AUTH)
        assert [r.status_code for r in await asyncio.gather(*slow)] == [200, 200]
        again = await client.post("/v1/chat/completions", json=WHOLE, headers=AUTH)
    assert third.status_code == 429
    assert third.headers["retry-after"]
    assert error_of(third)["code"] == "rate_limit_exceeded"
    assert again.status_code == 200  # slots come back


async def test_stream_slots_come_back_after_streams() -> None:
    async with client_for(ScriptedBackend(["a", "b"]), Limits(max_concurrent_per_key=1)) as client:
        for _ in range(3):
            r = await client.post("/v1/chat/completions", json=BODY)
            assert r.status_code == 200


async def test_a_failure_before_the_first_byte_keeps_its_status() -> None:
    backend = ScriptedBackend([], fail=OverloadedError("circuit open for slm"))
    async with client_for(backend) as client:
        r = await client.post("/v1/chat/completions", json=BODY)
    assert r.status_code == 503
    assert r.headers["content-type"].startswith("application/json")
    assert error_of(r) == {"message": "circuit open for slm", "type": "overloaded_error",
                           "param": None, "code": "overloaded"}  # fmt: skip


async def test_streams_carry_headers_and_the_slmgate_object() -> None:
    async with client_for(ScriptedBackend(["Hel", "lo"])) as client:
        r = await client.post("/v1/chat/completions", json=BODY)
        whole = await client.post("/v1/chat/completions", json=WHOLE)
    assert r.status_code == 200
    assert r.headers["x-slmgate-route"] == "auto"
    assert r.headers["x-slmgate-tier"] == "slm"
    assert r.headers["x-slmgate-request-id"].startswith("chatcmpl-")
    chunks = [json.loads(d) for d in events(r.text)[:-1]]
    last = chunks[-1]
    assert last["choices"][0]["finish_reason"] == "stop"
    assert last["slmgate"]["tier"] == "slm"
    assert last["slmgate"]["attempts"][0]["outcome"] == "accepted"
    assert all("slmgate" not in c for c in chunks[:-1])
    assert set(last["slmgate"]) == set(whole.json()["slmgate"])
