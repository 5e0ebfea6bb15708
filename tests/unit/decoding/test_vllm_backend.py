"""``VllmBackend`` over a scripted vLLM (httpx's MockTransport): per-request speculation counts
only for a request that ran alone, and its share of busy time as the attempt's compute."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx

from decoding.backend import FinishEvent
from decoding.openai_compat import RemoteConfig
from decoding.types import GenerationRequest
from decoding.vllm_backend import VllmBackend


class ScriptedVllm:
    """Streams three tokens per request (each after ``gate`` is set, when one is given); every
    request adds 2 drafts of 3 tokens with 4 accepted to its /metrics counters."""

    def __init__(self) -> None:
        self.requests = 0
        self.gates: list[asyncio.Event] = []

    def metrics(self) -> str:
        n, per_pos = self.requests, "vllm:spec_decode_num_accepted_tokens_per_pos_total"
        return (
            f'vllm:spec_decode_num_drafts_total{{engine="0"}} {2 * n}\n'
            f'vllm:spec_decode_num_draft_tokens_total{{engine="0"}} {6 * n}\n'
            f'vllm:spec_decode_num_accepted_tokens_total{{engine="0"}} {4 * n}\n'
            f'{per_pos}{{engine="0",position="0"}} {2 * n}\n'
            f'{per_pos}{{engine="0",position="1"}} {2 * n}\n'
        )

    async def handler(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/metrics":
            return httpx.Response(200, text=self.metrics())
        self.requests += 1
        gate = asyncio.Event()
        self.gates.append(gate)

        async def stream() -> Any:
            for word in ("a", "b", "c"):
                await gate.wait()
                chunk = {"choices": [{"index": 0, "delta": {"content": word}}]}
                yield f"data: {json.dumps(chunk)}\n\n".encode()
            done = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 5, "completion_tokens": 6}}  # fmt: skip
            yield f"data: {json.dumps(done)}\n\ndata: [DONE]\n\n".encode()

        return httpx.Response(200, content=stream(), headers={"content-type": "text/event-stream"})


def backend(server: ScriptedVllm) -> VllmBackend:
    config = RemoteConfig("v", "m", base_url="http://vllm/v1", supports_logprobs=False)
    return VllmBackend(config, compute_price_per_hour=3.0, speculative_method="ngram",
                       transport=httpx.MockTransport(server.handler))  # fmt: skip


async def finish_of(b: VllmBackend, rid: str) -> FinishEvent:
    req = GenerationRequest(({"role": "user", "content": "hi"},), request_id=rid)
    events = [e async for e in b.generate(req)]
    finishes = [e for e in events if isinstance(e, FinishEvent)]
    assert len(finishes) == 1
    return finishes[0]


async def test_a_request_alone_gets_its_speculation_counts_and_busy_share() -> None:
    server = ScriptedVllm()
    b = backend(server)

    async def open_gates() -> None:
        while not server.gates:
            await asyncio.sleep(0.01)
        server.gates[0].set()

    finish, _ = await asyncio.gather(finish_of(b, "r1"), open_gates())
    assert finish.spec is not None
    assert finish.spec.drafter == "vllm:ngram"
    assert (finish.spec.drafted, finish.spec.accepted) == (6, 4)
    # 6 tokens (3 events + 3 the usage counted), 4 accepted: 2 steps, each emitting 3
    assert (finish.spec.steps, finish.spec.histogram) == (2, (0, 0, 2))
    assert finish.compute_s > 0
    await b.aclose()


async def test_overlapping_requests_get_no_counts_and_split_the_busy_time() -> None:
    server = ScriptedVllm()
    b = backend(server)

    async def open_gates() -> None:
        while len(server.gates) < 2:  # both in flight before either streams
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
        for gate in server.gates:
            gate.set()

    first, second, _ = await asyncio.gather(finish_of(b, "r1"), finish_of(b, "r2"), open_gates())
    assert first.spec is None
    assert second.spec is None  # the counters' change is both requests': not attributable
    # ~0.2 s overlapped: each is billed about half of it, not all
    assert 0.05 < first.compute_s < 0.2
    assert 0.05 < second.compute_s < 0.2
    await b.aclose()
