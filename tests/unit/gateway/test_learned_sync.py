"""Replicas learning from each other through the machine's Redis: an output decoded on one
replica becomes a draft on another, and an example one replica's escalation memory verified is
recalled by the other's. Real drafters and a real Redis stream; no model is needed."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest

from decoding.speculative import DrafterPool
from decoding.types import GenerationRequest, SamplingParams
from gateway.learned_sync import LearnedSync
from router.memory import EscalationMemory, MemoryConfig
from tests import postgres

OUTPUT = [501, 502, 503, 504, 505, 506, 507, 508, 509, 510, 511, 512]


@pytest.fixture
async def redis_client() -> AsyncIterator[object]:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url("redis://127.0.0.1:6379/0", socket_timeout=5,
                                     socket_connect_timeout=2, decode_responses=True)  # fmt: skip
    try:
        await client.ping()
    except Exception as exc:
        await client.aclose()
        postgres.service_missing(f"Redis at 127.0.0.1:6379 is unreachable: {exc}")
    yield client
    await client.aclose()


def request(text: str) -> GenerationRequest:
    return GenerationRequest(request_id="r", messages=[{"role": "user", "content": text}],
                             params=SamplingParams(max_tokens=8))  # fmt: skip


async def eventually(check: object, timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not check():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, "not learned in time"
        await asyncio.sleep(0.05)


async def test_one_replicas_outputs_and_memories_teach_the_other(redis_client: object) -> None:
    stream = f"slmgate-test-{uuid.uuid4().hex[:10]}:learned"
    pool_a, pool_b = DrafterPool(), DrafterPool()
    config = MemoryConfig(enabled=True)
    memory_a, memory_b = EscalationMemory("auto", config), EscalationMemory("auto", config)
    a = LearnedSync(redis_client, stream, replica="a")
    b = LearnedSync(redis_client, stream, replica="b")
    a.attach({"slm": pool_a}, lambda: {"auto": memory_a})
    b.attach({"slm": pool_b}, lambda: {"auto": memory_b})
    a.watch_memory(memory_a)
    b.watch_memory(memory_b)
    tasks = [asyncio.create_task(s.run()) for s in (a, b)]
    try:
        await asyncio.sleep(0.3)  # both consumers are reading the stream's tail
        before = pool_b.session("suffix", [1, 2, 3])
        assert before is not None
        assert before.propose(OUTPUT[:4], 8).token_ids == ()  # b has never seen it
        before.close()
        # replica a decodes OUTPUT (its drafters learn it, and it is published)
        session = pool_a.session("suffix", [7, 8, 9])
        assert session is not None
        session.extend(OUTPUT)
        session.close()
        await eventually(lambda: b.counts["learned"] >= 1)
        after = pool_b.session("suffix", [1, 2, 3])
        assert after is not None
        draft = after.propose(OUTPUT[:4], 8, tree=False)
        assert draft.token_ids[:4] == tuple(OUTPUT[4:8])  # b now drafts a's output
        after.close()
        assert a.counts["learned"] == 0  # nobody learns its own outputs twice

        # replica a verifies an escalated answer; b recalls it for a similar request
        memory_a.add(request("What is the weather in Paris today?"), "<call>weather</call>", 1.0)
        await eventually(lambda: len(memory_b) == 1)
        (recalled,) = memory_b.recall(request("What is the weather in Paris tomorrow?"))
        assert recalled.answer == "<call>weather</call>"
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await redis_client.delete(stream)  # type: ignore[attr-defined]
