"""A route: the tiers one public model name runs on, cheapest first, and the policy over them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from decoding.constraint import GRAMMAR_ENGINES, GrammarEngine
from decoding.types import Speculation
from router.confidence import DEFAULT_SIGNAL, SIGNALS, EarlyFallback
from router.deferral import DeferralRule
from router.invalid import DEFAULT_MAX_RESAMPLES, MAX_RESAMPLES, ON_INVALID, OnInvalid
from router.memory import MemoryConfig
from router.pre import PreRouter
from spec.specreason import SpecReasonConfig

# shadow: the top tier answers, the first tier answers the same request in the background
# (``router.shadow``).
# specreason: the first tier writes reasoning steps, the top tier scores each and rewrites the
# ones it scores low (``router.specreason``).
Policy = Literal["single", "cascade", "pre", "pre_cascade", "shadow", "specreason"]
POLICIES: tuple[Policy, ...] = (
    "single", "cascade", "pre", "pre_cascade", "shadow", "specreason",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    tiers: tuple[str, ...]  # backend names, cheapest first
    policy: Policy = "single"
    signal: str = DEFAULT_SIGNAL  # which confidence signal the threshold applies to
    threshold: float = 0.0  # escalate when confidence < threshold (0: only on failures)
    early_fallback: EarlyFallback = field(default_factory=EarlyFallback)
    pre: PreRouter = field(default_factory=PreRouter)
    speculation: Speculation | None = None  # None: each backend's default
    # False: embedded tiers decode without the grammar; outputs are still parsed and validated
    # (an invalid one is flagged, and escalates on a cascade). For measuring what the grammar
    # does (``slmgate eval bfcl``), not for production traffic.
    guided_decoding: bool = True
    # A learned rule (``slmgate calibrate --deferral-out``): per kind of request, it replaces
    # ``signal``/``threshold`` with P(success) from many features and its own threshold.
    deferral: DeferralRule | None = None
    # Escalation memory (``router.memory``): verified escalated answers as demonstrations for
    # the first tier of a cascade.
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    stream_commit_tokens: int = 16
    # Structured outputs (``router.invalid``): the grammar engine for requests that name none
    # (None: each model's own), what to do with an output that breaks its schema (None: error
    # for strict requests, flag otherwise) and how often the last tier samples again first.
    grammar_engine: GrammarEngine | None = None
    on_invalid: OnInvalid | None = None
    max_resamples: int = DEFAULT_MAX_RESAMPLES
    # After a call in tool_choice auto, probe whether the model meant a tool nobody offered, and
    # let it answer in text if so (``router.abstain``; embedded tiers only).
    abstain_probe: bool = True
    # Verified escalation (``spec.hint``): the tier a cascade escalates to checks the earlier
    # tier's answer as a speculative draft and keeps what it would have written itself, so the
    # answer is still its own (greedy: token for token) and only the passes change. Backends
    # that cannot (remote servers) regenerate, and the ledger says so.
    verify_escalation: bool = True
    specreason: SpecReasonConfig = field(default_factory=SpecReasonConfig)

    def __post_init__(self) -> None:
        if not self.tiers:
            raise ValueError(f"route {self.name!r} needs at least one tier")
        if self.policy not in POLICIES:
            raise ValueError(f"route {self.name!r}: policy must be one of {POLICIES}")
        if self.policy != "single" and len(self.tiers) < 2:
            raise ValueError(f"route {self.name!r}: policy {self.policy!r} needs two tiers")
        if self.signal not in SIGNALS:
            raise ValueError(f"route {self.name!r}: unknown signal {self.signal!r}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"route {self.name!r}: threshold must be in [0, 1]")
        if self.stream_commit_tokens < 0:
            raise ValueError(f"route {self.name!r}: stream_commit_tokens must be >= 0")
        if self.grammar_engine is not None and self.grammar_engine not in GRAMMAR_ENGINES:
            raise ValueError(
                f"route {self.name!r}: grammar_engine must be one of {GRAMMAR_ENGINES}"
            )
        if self.on_invalid is not None and self.on_invalid not in ON_INVALID:
            raise ValueError(f"route {self.name!r}: on_invalid must be one of {ON_INVALID}")
        if not 0 <= self.max_resamples <= MAX_RESAMPLES:
            raise ValueError(f"route {self.name!r}: max_resamples must be in [0, {MAX_RESAMPLES}]")

    @property
    def cascades(self) -> bool:
        return self.policy in ("cascade", "pre_cascade")
