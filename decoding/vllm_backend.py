"""A tier served by vLLM (``kind: vllm``): the OpenAI-compatible client plus what only vLLM
gives or needs.

- Optionally a server the gateway launches and supervises itself (``decoding.vllm_launch``);
  while that server is down (restarting, hung) attempts fail at once, so routes fall back
  without waiting out a timeout.
- vLLM's request extras (``top_k``, ``structured_outputs`` for regex) are always sent.
- Cost by the hour, never $0: without per-token prices, each attempt is billed its share of the
  server's busy time (``decoding.share_clock``) x the configured GPU-hour (or core-hour) price.
- vLLM's own speculative decoding reports its counts only server-wide, on ``/metrics``; when a
  speculative tier serves one request alone, the counters' change over that request is that
  request's, and it is reported as the choice's ``SpecStats`` (drafter ``vllm:<method>``).
  Requests that overlap another get no per-request figures (the counts are not separable); the
  totals stay on the server's ``/metrics``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx

from decoding.backend import FinishEvent
from decoding.openai_compat import OpenAICompatBackend, RemoteConfig, RemotePrepared
from decoding.resilience import CircuitBreaker
from decoding.share_clock import ShareClock
from decoding.types import GenerationRequest, GenerationResult, SpecStats, TokenEvent
from decoding.vllm_launch import ServerState, VllmSupervisor
from schemas.errors import UpstreamError

log = logging.getLogger(__name__)

_SPEC_COUNTERS = {
    "vllm:spec_decode_num_drafts_total": "drafts",
    "vllm:spec_decode_num_draft_tokens_total": "drafted",
    "vllm:spec_decode_num_accepted_tokens_total": "accepted",
}
_PER_POSITION = "vllm:spec_decode_num_accepted_tokens_per_pos_total"
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([0-9.eE+-]+|NaN|[+-]Inf)\s*$")
_POSITION = re.compile(r'position="(\d+)"')


@dataclass(frozen=True, slots=True)
class SpecCounters:
    """vLLM's server-wide speculative decoding counters (summed over engines).
    ``per_position[i]``: drafts whose token ``i`` was accepted (so at least ``i + 1`` were)."""

    drafts: float = 0.0  # verification steps that carried a draft
    drafted: float = 0.0  # draft tokens proposed
    accepted: float = 0.0  # draft tokens accepted
    per_position: tuple[float, ...] = ()

    def minus(self, earlier: SpecCounters) -> SpecCounters:
        size = max(len(self.per_position), len(earlier.per_position))
        mine = self.per_position + (0.0,) * (size - len(self.per_position))
        theirs = earlier.per_position + (0.0,) * (size - len(earlier.per_position))
        per_position = tuple(a - b for a, b in zip(mine, theirs, strict=True))
        return SpecCounters(
            self.drafts - earlier.drafts, self.drafted - earlier.drafted,
            self.accepted - earlier.accepted, per_position,
        )  # fmt: skip


def parse_spec_counters(metrics_text: str) -> SpecCounters | None:
    """The speculative decoding counters in a Prometheus text page; None when the server has
    none (speculation is off)."""
    sums: dict[str, float] = {}
    positions: dict[int, float] = {}
    for line in metrics_text.splitlines():
        match = _SAMPLE.match(line.strip())
        if match is None:
            continue
        name, labels, value = match.group(1), match.group(2) or "", float(match.group(3))
        if name in _SPEC_COUNTERS:
            sums[_SPEC_COUNTERS[name]] = sums.get(_SPEC_COUNTERS[name], 0.0) + value
        elif name == _PER_POSITION and (pos := _POSITION.search(labels)) is not None:
            positions[int(pos.group(1))] = positions.get(int(pos.group(1)), 0.0) + value
    if not sums:
        return None
    per_position = tuple(positions.get(i, 0.0) for i in range(max(positions, default=-1) + 1))
    return SpecCounters(**sums, per_position=per_position)


def spec_stats_of(delta: SpecCounters, completion_tokens: int, method: str) -> SpecStats:
    """One request's ``SpecStats`` from the counters' change while it ran alone.

    Each verification step emits its accepted draft tokens plus one, so the steps are the
    tokens emitted minus those accepted; a step emitting ``k + 1`` tokens accepted exactly
    ``k``, which is ``per_position[k - 1] - per_position[k]`` of the drafts (steps without a
    draft, and drafts with nothing accepted, emit one)."""
    accepted = int(delta.accepted)
    steps = max(0, completion_tokens - accepted)
    counts = [round(c) for c in delta.per_position]
    counts.append(0)
    longer = [counts[k - 1] - counts[k] for k in range(1, len(counts))]  # accepted exactly k
    histogram: tuple[int, ...] = (max(0, steps - sum(longer)), *longer) if steps else ()
    while len(histogram) > 1 and histogram[-1] == 0:
        histogram = histogram[:-1]
    return SpecStats(
        f"vllm:{method}", drafted=int(delta.drafted), accepted=accepted, steps=steps,
        histogram=tuple(histogram),
    )  # fmt: skip


class VllmBackend(OpenAICompatBackend):
    """``OpenAICompatBackend`` for a vLLM server, optionally launched by ``supervisor``."""

    def __init__(
        self,
        config: RemoteConfig,
        *,
        supervisor: VllmSupervisor | None = None,
        compute_price_per_hour: float | None = None,
        speculative_method: str | None = None,
        breaker: CircuitBreaker | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[object]] | None = None,
    ):
        if supervisor is not None:
            config = dataclasses.replace(config, base_url=supervisor.base_url + "/v1")
        config = dataclasses.replace(config, vllm_extras=True)
        kwargs: dict[str, Any] = {} if sleep is None else {"sleep": sleep}
        super().__init__(config, breaker=breaker, transport=transport, **kwargs)
        self.supervisor = supervisor
        self.speculative_method = speculative_method
        self.clock = ShareClock()
        self._began = 0  # requests begun so far: a request ran alone if none began meanwhile
        if compute_price_per_hour is not None:  # priced by the hour: the share of busy time
            price = compute_price_per_hour
            self.info = dataclasses.replace(self.info, compute_price_per_hour=price)

    async def _send(
        self, body: dict[str, Any], extras: dict[str, Any], req: GenerationRequest
    ) -> dict[str, Any]:
        self._check_server()
        return await super()._send(body, extras, req)

    async def _open_stream(
        self, body: dict[str, Any], extras: dict[str, Any], req: GenerationRequest
    ) -> httpx.Response:
        self._check_server()
        return await super()._open_stream(body, extras, req)

    def _check_server(self) -> None:
        """A launched server that its supervisor sees down (restarting, hung) fails the attempt
        at once, as a retryable upstream error the breaker counts, instead of a connection
        refused or, for a hung server, a wait of ``timeout_s`` per attempt."""
        if self.supervisor is not None and self.supervisor.state is not ServerState.READY:
            raise UpstreamError(
                f"backend {self.config.name}: its vLLM server is {self.supervisor.state.value}"
            )

    @property
    def server_root(self) -> str:
        return self.base_url.removesuffix("/v1")

    async def generate(
        self, req: GenerationRequest, prepared: RemotePrepared | None = None
    ) -> AsyncIterator[TokenEvent | FinishEvent]:
        """The SSE stream, its first ``FinishEvent`` carrying the request's share of busy time
        (and, when it ran alone on a speculative server, its speculation counts)."""
        before = await self._spec_counters()
        mark = self.clock.begin()
        self._began += 1
        began, alone_at_start = self._began, self.clock.in_flight == 1
        ended = False
        completion = 0
        try:
            async for event in super().generate(req, prepared):
                if isinstance(event, TokenEvent):
                    completion += 1
                elif isinstance(event, FinishEvent) and not ended:
                    ended = True
                    # alone throughout: none running when it began, none begun since
                    alone = alone_at_start and self._began == began and self.clock.in_flight == 1
                    share = self.clock.end(mark)
                    spec = None
                    if alone and before is not None:
                        spec = await self._spec_of(before, completion + event.uncounted_tokens)
                    event = dataclasses.replace(event, compute_s=share, spec=spec or event.spec)
                yield event
        finally:
            if not ended:
                self.clock.end(mark)

    async def complete(
        self, req: GenerationRequest, prepared: RemotePrepared | None = None
    ) -> GenerationResult:
        mark = self.clock.begin()
        try:
            result = await super().complete(req, prepared)
        finally:
            share = self.clock.end(mark)
        result.compute_s = share
        return result

    async def _spec_of(self, before: SpecCounters, completion: int) -> SpecStats | None:
        after = await self._spec_counters()
        if after is None:
            return None
        delta = after.minus(before)
        if delta.drafts < 0 or delta.accepted < 0:  # the server restarted in between
            return None
        return spec_stats_of(delta, completion, self.speculative_method or "unknown")

    async def _spec_counters(self) -> SpecCounters | None:
        """The server's speculative counters, when this tier speculates (else no call)."""
        if self.speculative_method is None:
            return None
        if self.supervisor is not None and self.supervisor.state is not ServerState.READY:
            return None
        try:  # a short wait: the counts are worth less than the request's time
            response = await self._http().get(self.server_root + "/metrics", timeout=2.0)
        except httpx.HTTPError:
            return None
        return parse_spec_counters(response.text) if response.status_code == 200 else None

    async def aclose(self) -> None:
        await super().aclose()
        if self.supervisor is not None:
            await asyncio.to_thread(self.supervisor.stop)

    def close(self) -> None:
        super().close()
        if self.supervisor is not None:
            self.supervisor.stop()
