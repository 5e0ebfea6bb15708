"""Typed messages between the router and the decoding backends."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from decoding.constraint import Constraint, GrammarEngine, NoConstraint
from schemas.errors import InvalidRequestError

FinishReason = Literal["stop", "length", "tool_calls", "cancelled"]
Speculation = Literal["none", "suffix", "stand", "both"]


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick tokens. ``temperature == 0`` means greedy (argmax)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: all tokens
    seed: int | None = None
    max_tokens: int | None = None  # None: up to the context length
    stop: tuple[str, ...] = ()
    n: int = 1
    logprobs: bool = False
    top_logprobs: int = 0
    # Tokens all choices together may generate when ``max_tokens`` is None (the gateway's
    # ``limits.max_generated_tokens``); never sent upstream, unlike ``max_tokens``.
    token_budget: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.temperature <= 2.0:
            raise InvalidRequestError("temperature must be in [0, 2]", param="temperature")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError("top_p must be in (0, 1]", param="top_p")
        if self.top_k == 0 or self.top_k < -1:
            raise InvalidRequestError("top_k must be -1 (off) or >= 1", param="top_k")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise InvalidRequestError("max_tokens must be >= 1", param="max_tokens")
        if self.n < 1:
            raise InvalidRequestError("n must be >= 1", param="n")
        if not 0 <= self.top_logprobs <= 20:
            raise InvalidRequestError("top_logprobs must be in [0, 20]", param="top_logprobs")
        if len(self.stop) > 4 or any(not s for s in self.stop):
            raise InvalidRequestError("stop takes at most 4 non-empty strings", param="stop")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One chat request for one backend: messages in OpenAI's shape plus decoding settings."""

    messages: tuple[dict[str, Any], ...]
    params: SamplingParams = field(default_factory=SamplingParams)
    constraint: Constraint = field(default_factory=NoConstraint)
    tools: tuple[dict[str, Any], ...] = ()  # OpenAI tool objects, rendered into the prompt
    request_id: str = ""
    task_id: str | None = None
    speculation: Speculation | None = None  # None: the backend's default for this request
    # False: no grammar while decoding (the output is still parsed and validated afterwards);
    # set by a route's ``guided_decoding``. Embedded engines only: a remote server decodes as it
    # is configured to.
    guided: bool = True
    # Which grammar engine compiles the constraint (embedded engines); None: the model's own.
    grammar_engine: GrammarEngine | None = None
    # What to do with an output that breaks its schema (``router.invalid``); None: the route's.
    on_invalid: Literal["flag", "error", "escalate"] | None = None
    # Token ids the assistant turn already holds (appended after the rendered prompt; the output
    # continues them). Embedded engines only: the router probes what a model would write next.
    continue_ids: tuple[int, ...] = ()
    # Assistant text the output continues, tokenised by the engine (after ``continue_ids``):
    # SpecReason's steps so far. Embedded engines only.
    continue_text: str = ""
    # Text an earlier tier wrote for this request (verified escalation, ``spec.hint``): the
    # engine verifies it as a speculative draft, so the output is still this model's own and
    # only the number of passes changes. Backends without ``supports_draft_hint`` ignore it.
    draft_hint: str = ""
    # False: nothing reads the tokens as they come (a client that does not stream, no early
    # fallback watching), so a remote backend may ask its server for the whole answer at once
    # instead of parsing a server-sent-event stream.
    incremental: bool = True


@dataclass(frozen=True, slots=True)
class SpecStats:
    """What speculation did for one choice: reported in the ``slmgate`` object and the ledger.

    ``histogram[i]`` counts verification steps that emitted ``i + 1`` tokens (accepted draft
    tokens plus the one token the target model adds per step)."""

    drafter: str
    drafted: int = 0
    accepted: int = 0
    steps: int = 0
    histogram: tuple[int, ...] = ()
    draft_us: float = 0.0  # total time the drafters spent proposing, in microseconds

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per verification step (1.0 = no gain)."""
        emitted = sum((i + 1) * n for i, n in enumerate(self.histogram))
        return emitted / self.steps if self.steps else 0.0


@dataclass(frozen=True, slots=True)
class HintStats:
    """What verifying a ``draft_hint`` did for one choice: hint tokens offered to verification
    and ``reused`` (accepted: output tokens taken from the earlier tier's text), in passes."""

    drafted: int = 0
    reused: int = 0
    passes: int = 0


@dataclass(frozen=True, slots=True)
class TopLogprob:
    token_id: int
    token: str
    logprob: float


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """One emitted token and the facts the router scores confidence with.

    ``logprob``, ``entropy`` and ``top_logprobs`` describe the model's distribution restricted
    to the tokens the grammar allows (renormalised, before temperature/top-p/top-k), i.e. the
    distribution the constrained output is drawn from. ``allowed_mass`` is the model's
    probability mass on grammar-allowed tokens *before* masking (grammar agreement; 1.0 when
    unconstrained). ``forced`` marks tokens the grammar fixed (a single allowed token or a
    jump-forward string); they carry no information about the model's confidence.
    """

    index: int  # choice index (n > 1)
    token_id: int
    text: str  # detokenised text this token adds (may be "" while a UTF-8 char is incomplete)
    logprob: float
    entropy: float
    allowed_mass: float
    forced: bool
    top_logprobs: tuple[TopLogprob, ...] = ()
    finish_reason: FinishReason | None = None  # set on the last event of a choice


@dataclass(slots=True)
class Choice:
    index: int
    text: str
    token_ids: list[int]
    events: list[TokenEvent]
    finish_reason: FinishReason
    spec: SpecStats | None = None
    hint: HintStats | None = None
    stop_string: str | None = None  # the stop string that ended it (embedded engines)


@dataclass(slots=True)
class GenerationResult:
    """A finished generation: what ``Backend.complete`` returns."""

    choices: list[Choice]
    prompt_tokens: int
    model: str
    cached_tokens: int = 0  # of ``prompt_tokens``, reused from an earlier request's KV
    compute_s: float = 0.0  # worker seconds over all choices (0.0: not measured, e.g. remote)

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.choices)
