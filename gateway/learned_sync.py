"""What replicas learn, shared through a Redis stream: every replica publishes the outputs its
engines' drafters learned from (token ids, per model) and the examples its escalation memory
verified; every replica's drafters and memories learn from all of them.

Best effort by design: a replica that cannot reach Redis keeps learning from its own traffic,
counts the failure, and tries again; nothing on the request path waits for Redis. Entries carry
the publishing replica's id, so nobody learns its own outputs twice. The stream is capped
(``MAXLEN ~``), so a replica that joins learns from what comes after, and the escalation memory
it loads from the ledger database at start covers what came before.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import Callable, Mapping
from dataclasses import asdict
from typing import Any

from decoding.speculative import DrafterPool
from router.memory import EscalationMemory, MemoryExample

log = logging.getLogger(__name__)

MAX_QUEUE = 1000  # entries waiting to be published; more are dropped (counted)
STREAM_MAXLEN = 10_000


class LearnedSync:
    """Connects drafter pools (by model) and escalation memories (by route) to one stream."""

    def __init__(self, client: Any, stream: str, replica: str | None = None):
        self.client = client  # redis.asyncio.Redis (decode_responses=True)
        self.stream = stream
        self.replica = replica or secrets.token_hex(6)
        self.pools: dict[str, DrafterPool] = {}
        self.memories: Callable[[], Mapping[str, EscalationMemory]] = dict
        self.counts = {"published": 0, "learned": 0, "dropped": 0, "failures": 0}
        self._queue: asyncio.Queue[dict[str, str]] = asyncio.Queue(MAX_QUEUE)
        self._loop: asyncio.AbstractEventLoop | None = None

    def attach(
        self,
        pools: Mapping[str, DrafterPool],
        memories: Callable[[], Mapping[str, EscalationMemory]],
    ) -> None:
        """Publish from and learn into ``pools`` (model → pool) and ``memories()`` (route →
        memory; a callable because routes create their memory on first use)."""
        self.pools = dict(pools)
        self.memories = memories
        for model, pool in self.pools.items():
            pool.on_learned = lambda ids, model=model: self._offer(
                {"kind": "tokens", "model": model, "ids": json.dumps(ids)}
            )

    def watch_memory(self, memory: EscalationMemory) -> None:
        memory.on_add = lambda example: self._offer(
            {"kind": "memory", "example": json.dumps(asdict(example))}
        )

    def _offer(self, entry: dict[str, str]) -> None:
        """From any thread: queue an entry for publishing, or drop it when the queue is full."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return

        def put() -> None:
            try:
                self._queue.put_nowait({**entry, "replica": self.replica})
            except asyncio.QueueFull:
                self.counts["dropped"] += 1

        loop.call_soon_threadsafe(put)

    async def publish_forever(self) -> None:
        self._loop = asyncio.get_running_loop()
        while True:
            entry = await self._queue.get()
            try:
                await self.client.xadd(self.stream, entry, maxlen=STREAM_MAXLEN, approximate=True)
                self.counts["published"] += 1
            except Exception as exc:
                self.counts["failures"] += 1
                self.counts["dropped"] += 1
                log.debug("learned sync: publishing failed: %s", exc)
                await asyncio.sleep(1.0)

    async def consume_forever(self, block_ms: int = 1000) -> None:
        last = "$"  # what comes after this replica started
        while True:
            try:
                replies = await self.client.xread({self.stream: last}, block=block_ms, count=100)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.counts["failures"] += 1
                log.debug("learned sync: reading failed: %s", exc)
                await asyncio.sleep(1.0)
                continue
            for _stream, entries in replies or []:
                for entry_id, fields in entries:
                    last = entry_id
                    if fields.get("replica") != self.replica:
                        await self.learn(fields)

    async def learn(self, fields: Mapping[str, str]) -> None:
        """Apply one entry from another replica (unknown models and routes are skipped)."""
        try:
            if fields.get("kind") == "tokens":
                pool = self.pools.get(fields.get("model", ""))
                if pool is not None:
                    ids = [int(i) for i in json.loads(fields["ids"])]
                    await asyncio.to_thread(pool.learn, (), ids)
                    self.counts["learned"] += 1
            elif fields.get("kind") == "memory":
                data = json.loads(fields["example"])
                example = MemoryExample(**{**data, "tools": tuple(data["tools"])})
                memory = self.memories().get(example.route)
                if memory is not None:
                    memory.adopt(example)
                    self.counts["learned"] += 1
        except (KeyError, ValueError, TypeError) as exc:  # a malformed entry: skip it
            log.debug("learned sync: skipped an entry: %s", exc)

    async def run(self) -> None:
        """Publish and consume until cancelled."""
        self._loop = asyncio.get_running_loop()
        await asyncio.gather(self.publish_forever(), self.consume_forever())
