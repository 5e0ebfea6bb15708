"""What a request produced: its trace (every attempt so far), the plan it ran, the answer it
got, and the ledger row the gateway writes from them whether it succeeded, failed or was cut off.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from decoding.backend import BackendInfo
from decoding.constraint import JsonObject, JsonSchema, NoConstraint, ToolCalls
from decoding.types import GenerationRequest, GenerationResult
from decoding.validate import OutputCheck
from router.records import AttemptRecord, RequestRecord
from router.route import Route
from schemas.errors import GenerationCancelled, RequestTimeoutError, SlmgateError


@dataclass(slots=True)
class Trace:
    """What happened to one request so far; the gateway writes it to the ledger even when the
    request fails, so no attempt is lost."""

    request_id: str
    route: str
    task_id: str | None = None
    created_at: float = field(default_factory=time.time)
    started: float = field(default_factory=time.perf_counter)
    attempts: list[AttemptRecord] = field(default_factory=list)
    first_token_at: float | None = None  # perf_counter of the first byte of content sent
    pre_score: float | None = None
    answer: Answer | None = None  # set when a stream finished: what it answered with
    streaming_from: str | None = None  # backend whose tokens a stream is sending now
    key_id: str | None = None  # the API key record the request came in with
    traceparent: str | None = None  # the caller's W3C trace context: its spans join that trace

    def mark_first_token(self) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()


@dataclass(slots=True)
class Plan:
    """A request checked against its route: where to start and what was prepared up front."""

    route: Route
    start: int  # tier index to try first
    prepared: dict[int, Any]  # tier index -> the backend's prepare() result
    skip_reason: str | None = None  # why tiers before ``start`` were skipped
    # per tier, a request that differs from the caller's (escalation memory's demonstrations)
    requests: dict[int, GenerationRequest] = field(default_factory=dict)
    memory_examples: tuple[str, ...] = ()  # ids of the demonstrations the first tier was shown

    @property
    def last(self) -> int:
        """The last tier the plan may run: the route's top on a cascade, else ``start``."""
        return len(self.route.tiers) - 1 if self.route.cascades else self.start

    @property
    def single_tier(self) -> bool:
        return self.start == self.last


@dataclass(slots=True)
class Answer:
    """The accepted attempt with everything the gateway renders."""

    result: GenerationResult
    checks: list[OutputCheck]  # one per choice
    backend: BackendInfo
    route: str
    cost_usd: float = 0.0  # every attempt of the request, escalated ones included
    counterfactual_cost_usd: float = 0.0
    confidence: float | None = None
    signals: dict[str, float] = field(default_factory=dict)
    fallback_reason: str | None = None
    attempts: list[AttemptRecord] = field(default_factory=list)
    memory_examples: tuple[str, ...] = ()  # demonstrations shown to the first tier
    # The counterfactual is an estimate from a compute-priced top tier's measured cost per token
    # (it did not answer this request itself).
    counterfactual_estimated: bool = False
    # A ``specreason`` answer's steps: who wrote each, the scores (``ReasoningTrace.summary``).
    reasoning: dict[str, Any] | None = None

    @property
    def valid(self) -> bool:
        return all(c.valid for c in self.checks)

    @property
    def executable(self) -> bool | None:
        return executable_of(self.checks, self.result)


def executable_of(checks: Sequence[OutputCheck], result: GenerationResult | None) -> bool | None:
    """Whether the tool calls made can be executed: each names an offered tool and its arguments
    validate. None when no call was made (text answers, or nothing to call)."""
    calls = [c for c in checks if c.parsed is not None and c.parsed.tool_calls]
    if not calls:
        required = any(
            c.parsed is not None and not c.valid and any("requires one" in e for e in c.errors)
            for c in checks
        )
        return False if required else None
    return all(c.valid for c in calls)


def schema_valid_of(req: GenerationRequest, checks: Sequence[OutputCheck]) -> bool | None:
    """Validity where the request asked for structure; None for free text."""
    if isinstance(req.constraint, NoConstraint):
        return None
    return all(c.valid for c in checks)


def error_status(error: BaseException) -> tuple[int, str]:
    """HTTP status and error type a failure is booked with: a bare deadline or cancellation
    counts as the 504 or 499 the gateway answers for it, anything unknown as a 500."""
    if isinstance(error, SlmgateError):
        return error.status, error.type
    if isinstance(error, TimeoutError):
        return RequestTimeoutError.status, RequestTimeoutError.type
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        return GenerationCancelled.status, GenerationCancelled.type
    return 500, "server_error"


def booked_attempt(attempts: Sequence[AttemptRecord]) -> AttemptRecord | None:
    """The attempt a request without an answer is booked under: the last one that consumed
    tokens (a cut-off attempt's tier, never none), else the last one tried."""
    consumed = [a for a in attempts if a.prompt_tokens or a.completion_tokens]
    return consumed[-1] if consumed else attempts[-1] if attempts else None


def request_record(
    trace: Trace,
    req: GenerationRequest,
    *,
    answer: Answer | None = None,
    error: BaseException | None = None,
    stream: bool = False,
) -> RequestRecord:
    """The ledger row for a finished (or failed) request, from its trace."""
    now = time.perf_counter()
    status, error_type = (200, None) if error is None else error_status(error)
    moved_on = [a for a in trace.attempts if a.outcome != "resampled"]
    record = RequestRecord(
        request_id=trace.request_id,
        route=trace.route,
        created_at=trace.created_at,
        latency_s=now - trace.started,
        task_id=trace.task_id,
        status=status,
        error_type=error_type,
        ttft_s=None if trace.first_token_at is None else trace.first_token_at - trace.started,
        cost_usd=sum(a.cost_usd for a in trace.attempts),
        # A resample on the same tier is a retry, not a fallback to another tier.
        fallback=any(a.fallback_reason for a in moved_on),
        fallback_reason=next((a.fallback_reason for a in moved_on if a.fallback_reason), None),
        stream=stream,
        expects_json=isinstance(req.constraint, JsonObject | JsonSchema)
        or (isinstance(req.constraint, ToolCalls) and req.constraint.final is not None),
        expects_tools=isinstance(req.constraint, ToolCalls),
        key_id=trace.key_id,
        attempts=list(trace.attempts),
    )  # fmt: skip
    if answer is not None:
        record.tier = answer.backend.tier
        record.backend = answer.backend.name
        record.prompt_tokens = answer.result.prompt_tokens
        record.completion_tokens = answer.result.completion_tokens
    elif (booked := booked_attempt(trace.attempts)) is not None:
        record.tier, record.backend = booked.tier, booked.backend
        record.prompt_tokens = booked.prompt_tokens
        record.completion_tokens = booked.completion_tokens
    if answer is not None and error is None:
        record.counterfactual_cost_usd = answer.counterfactual_cost_usd
        record.schema_valid = schema_valid_of(req, answer.checks)
        record.executable = answer.executable
        if answer.fallback_reason and not record.fallback_reason:
            record.fallback, record.fallback_reason = True, answer.fallback_reason
    return record
