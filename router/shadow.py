"""Shadow mode: prove SLM-first on live traffic at zero risk.

On a route with ``policy: shadow`` the client is answered by the route's top tier alone, exactly
as a single-tier route to it would answer. Afterwards, in the background, the first tier answers
the same request; both are written to the ledger, the shadow one as request ``<id>~shadow`` on
route ``<route>~shadow`` under task ``<task>~shadow``, and that task's outcome is whether the
small model agreed with the top tier (``agreement``), so ``slmgate calibrate --ledger URL
--route <route>~shadow`` fits thresholds and deferral rules from it. The queue is bounded:
when ``max_pending`` shadow answers are in flight, further ones are dropped and counted, never
queued behind the client.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from decoding.constraint import Constraint, JsonObject, JsonSchema, ToolCalls
from decoding.types import GenerationRequest
from decoding.validate import OutputCheck
from router.answer import Answer, Trace
from router.route import Route

log = logging.getLogger(__name__)

SHADOW_SUFFIX = "~shadow"


def shadow_route(route: Route) -> Route:
    """The single-tier route the shadow answer runs on: the route's first tier, same decoding
    settings."""
    return Route(
        route.name + SHADOW_SUFFIX, (route.tiers[0],), policy="single",
        speculation=route.speculation, guided_decoding=route.guided_decoding,
    )  # fmt: skip


def _calls(check: OutputCheck) -> Counter[tuple[str, str]]:
    calls = check.parsed.tool_calls if check.parsed is not None else ()
    return Counter(
        (c.name, json.dumps(json.loads(c.arguments), sort_keys=True)) for c in calls
    )


def agreement(
    constraint: Constraint, top: Sequence[OutputCheck], top_texts: Sequence[str],
    shadow: Sequence[OutputCheck], shadow_texts: Sequence[str],
) -> bool | None:  # fmt: skip
    """Whether the shadow's first choice agrees with the top tier's, or None when that cannot be
    judged (free text; a top answer that is itself invalid).

    Tool calls agree when both make the same calls (names and arguments, in any order); one
    calling and the other not is a disagreement; neither calling is free text. JSON agrees when
    both parse to the same value; an invalid shadow answer never agrees."""
    if not top or not shadow or not top[0].valid:
        return None
    if not shadow[0].valid:
        return False
    if isinstance(constraint, ToolCalls):
        mine, theirs = _calls(shadow[0]), _calls(top[0])
        if not mine and not theirs:
            return None
        return mine == theirs
    if isinstance(constraint, JsonObject | JsonSchema):
        return bool(json.loads(shadow_texts[0]) == json.loads(top_texts[0]))
    return None


def _texts(answer: Answer) -> list[str]:
    return [c.text for c in answer.result.choices]


@dataclass(slots=True)
class ShadowRunner:
    """Runs shadow answers in the background, at most ``max_pending`` at a time.

    ``run`` answers a request on a route (the router's ``plan_async`` + ``complete``),
    ``record`` writes a finished trace to the ledger, ``label`` stores a task outcome."""

    run: Callable[[Route, GenerationRequest, Trace], Any]  # async -> Answer
    record: Callable[..., None]
    label: Callable[[str, bool], Any] | None = None  # async (task id, agreed)
    max_pending: int = 16
    counts: Counter[str] = field(default_factory=Counter)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def submit(self, route: Route, req: GenerationRequest, client: Answer, trace: Trace) -> bool:
        """Start the shadow answer for a request the client already has; False when dropped."""
        if len(self._tasks) >= self.max_pending:
            self.counts["dropped"] += 1
            return False
        self.counts["submitted"] += 1
        task = asyncio.get_running_loop().create_task(self._shadow(route, req, client, trace))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _shadow(
        self, route: Route, req: GenerationRequest, client: Answer, trace: Trace
    ) -> None:
        shadow = shadow_route(route)
        task_id = (trace.task_id or trace.request_id) + SHADOW_SUFFIX
        strace = Trace(trace.request_id + SHADOW_SUFFIX, shadow.name, task_id)
        try:
            answer = await self.run(shadow, req, strace)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.counts["failed"] += 1
            self.record(strace, req, error=exc)
            return
        self.record(strace, req, answer=answer)
        self.counts["answered"] += 1
        agreed = agreement(
            req.constraint, client.checks, _texts(client), answer.checks, _texts(answer)
        )
        if agreed is None:
            self.counts["unjudged"] += 1
            return
        if self.label is not None:
            try:
                await self.label(task_id, agreed)
            except Exception:
                log.exception("could not label shadow task %s", task_id)
        self.counts["agreed" if agreed else "disagreed"] += 1  # counted once labelled

    async def close(self) -> None:
        """Cancel what is still running (server shutdown)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
