"""A remote tier asks its server for a stream only when someone reads tokens as they come: a
non-streaming client without early fallback gets the answer in one response (no SSE to parse),
with the same text, tokens and usage as the streamed path."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import pytest

from benchmarks.soak_plan import fake_chunks, fake_completion
from decoding.backend import FinishEvent
from decoding.models import ModelSpec, build_backend
from decoding.types import GenerationRequest, TokenEvent
from router.request import generation_request
from schemas.chat import ChatCompletionRequest


class Recording(BaseHTTPRequestHandler):
    seen: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        Recording.seen.append(body)
        if body.get("stream"):
            chunks = [json.dumps(c) for c in fake_chunks(body, "chatcmpl-1", 0)] + ["[DONE]"]
            payload = "".join(f"data: {c}\n\n" for c in chunks).encode()
            kind = "text/event-stream"
        else:
            payload = json.dumps(fake_completion(body, "chatcmpl-1", 0)).encode()
            kind = "application/json"
        self.send_response(200)
        self.send_header("content-type", kind)
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    Recording.seen = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Recording)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()


async def collect(backend: Any, req: GenerationRequest) -> tuple[str, FinishEvent]:
    text, finish = "", None
    async for event in backend.generate(req, backend.prepare(req)):
        if isinstance(event, TokenEvent):
            text += event.text
        elif isinstance(event, FinishEvent):
            finish = event
    assert finish is not None
    return text, finish


async def test_only_an_incremental_request_streams_from_the_server(server: str) -> None:
    spec = ModelSpec.from_mapping({"name": "up", "kind": "openai", "tier": "llm",
                                   "base_url": server, "remote_model": "fake", "max_retries": 0,
                                   "supports_logprobs": False})  # fmt: skip
    backend = build_backend(spec)
    wire = ChatCompletionRequest.model_validate(
        {"model": "up", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8}
    )
    whole = generation_request(wire, "r1")
    assert whole.incremental is False  # the client did not ask for a stream
    streamed = replace(whole, incremental=True)
    text_whole, finish_whole = await collect(backend, whole)
    text_streamed, finish_streamed = await collect(backend, streamed)
    await backend.aclose()
    assert [body.get("stream", False) for body in Recording.seen] == [False, True]
    assert text_whole == text_streamed != ""
    assert finish_whole.prompt_tokens == finish_streamed.prompt_tokens > 0
    assert finish_whole.reason == finish_streamed.reason == "stop"
