"""What the router writes to the ledger: one row per attempt, one per request, one per task.

Plain dataclasses so the router, the ledger (SQLAlchemy) and tests share one vocabulary without
any of them importing the database layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

AttemptOutcome = Literal[
    "accepted", "escalated", "aborted", "error", "cancelled", "resampled", "rejected", "probe",
    "judge",
]


@dataclass(slots=True)
class AttemptRecord:
    """One backend call made for a request (a cascade makes one per tier it tries).

    ``outcome``: ``accepted`` (this attempt answered the request), ``escalated`` (finished but
    judged unsure or invalid, so the next tier ran), ``aborted`` (stopped mid-generation by
    early fallback), ``error`` (the backend failed; ``error`` says how), ``cancelled`` (cut off
    by a client disconnect or a deadline; ``error`` says which), ``resampled`` (finished but
    invalid, so the same tier sampled again), ``rejected`` (finished but invalid, and the
    request failed with ``invalid_output`` rather than return it), ``probe`` (a short
    unconstrained continuation of another attempt's output, ``router.abstain``), ``judge`` (the
    top tier scoring a reasoning step, ``router.specreason``; the score in its signals). A
    ``specreason`` request books one ``accepted`` attempt per kept step. Every outcome
    carries the tokens
    the attempt consumed up to its end, and their cost.
    """

    request_id: str
    attempt_no: int  # 0, 1, … in the order tried
    route: str
    tier: str
    backend: str
    model: str
    started_at: float  # unix seconds
    latency_s: float
    ttft_s: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    # Worker seconds the attempt used (embedded engines; what compute-priced tiers are priced
    # by); None: not measured (remote backends).
    compute_s: float | None = None
    confidence: float | None = None  # the route's combined score in [0, 1]
    signals: dict[str, float] = field(default_factory=dict)  # mean_entropy, min_top1_prob, …
    schema_valid: bool | None = None  # None: nothing to validate (free text)
    executable: bool | None = None  # None: no tool call expected or made
    outcome: AttemptOutcome = "accepted"
    fallback_reason: str | None = None  # why the next tier ran (low_confidence, invalid, …)
    error: str | None = None
    spec_drafted: int | None = None
    spec_accepted: int | None = None
    spec_steps: int | None = None
    # Verified escalation (``spec.hint``): ``verified`` when this tier checked the earlier
    # tier's answer as a draft (``hint_drafted`` of its tokens offered, ``hint_reused`` kept
    # in the output), ``regenerated`` when it could not (a backend without draft hints) and
    # wrote its answer from scratch; None when no earlier answer was handed over.
    hint_mode: Literal["verified", "regenerated"] | None = None
    hint_drafted: int | None = None
    hint_reused: int | None = None
    energy_j: float | None = None
    energy_measured: bool = False
    task_id: str | None = None
    # The engine whose grammar constrained it (xgrammar, llguidance, outlines-regex); None: none.
    grammar_engine: str | None = None


@dataclass(slots=True)
class RequestRecord:
    """One chat completion request as the caller saw it (its final answer)."""

    request_id: str
    route: str
    created_at: float  # unix seconds
    latency_s: float
    task_id: str | None = None
    status: int = 200  # HTTP status returned (or sent in-stream as an error)
    error_type: str | None = None
    tier: str | None = None  # tier of the accepted attempt (failed: the last that used tokens)
    backend: str | None = None
    ttft_s: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0  # all attempts, escalated ones included
    # same tokens priced at the route's top tier; the request's own cost when that is unknown
    # (a compute-priced top tier that did not answer: see ``router.tier_loop.answer_of``)
    counterfactual_cost_usd: float = 0.0
    schema_valid: bool | None = None
    executable: bool | None = None
    fallback: bool = False
    fallback_reason: str | None = None
    stream: bool = False
    expects_json: bool = False  # response_format json_object / json_schema
    expects_tools: bool = False
    key_id: str | None = None  # the API key record it came in with (gateway.keys)
    attempts: list[AttemptRecord] = field(default_factory=list)

    @property
    def succeeded(self) -> bool:
        """Inferred success: answered, and valid + executable where that applies."""
        return (
            self.status == 200 and self.schema_valid is not False and self.executable is not False
        )

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)
