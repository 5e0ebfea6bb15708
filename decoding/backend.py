"""The one interface every decoding backend implements."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from decoding.types import (
    Choice,
    FinishReason,
    GenerationRequest,
    GenerationResult,
    HintStats,
    SpecStats,
    TokenEvent,
)


@dataclass(frozen=True, slots=True)
class BackendInfo:
    name: str
    tier: str  # "slm" | "llm" | free-form for user tiers
    model: str  # what the weights are, for logs and /v1/models
    context_length: int
    supports_logprobs: bool
    supports_grammar: bool
    device: str = "cpu"
    dtype: str = "float32"
    price_in_per_mtok: float = 0.0
    price_out_per_mtok: float = 0.0
    # Compute pricing (embedded models without per-token prices): $ per hour of the compute
    # this backend holds while it decodes (its cores x price per core-hour on CPU, its GPU's
    # price per hour on CUDA). None: priced per token. ``compute_cores``: the torch threads
    # it decodes with (0 for remote backends, which report no compute).
    compute_price_per_hour: float | None = None
    compute_cores: int = 0


@dataclass(frozen=True, slots=True)
class FinishEvent:
    """End of one choice. ``text`` is any held-back text released at the end."""

    index: int
    reason: FinishReason
    text: str = ""
    prompt_tokens: int = 0
    spec: SpecStats | None = None  # set when the choice was decoded with speculation
    cached_tokens: int = 0  # prompt positions reused from the prefix cache
    # Tokens the choice produced without a token event each (a remote server's tool-call deltas
    # or merged chunks, known from its usage count): counted, never lost from the books.
    uncounted_tokens: int = 0
    # Wall seconds the backend's worker spent on this choice (prefill + decode); the embedded
    # engine has one worker, so this is exclusive time. 0.0: not measured (remote backends).
    compute_s: float = 0.0
    hint: HintStats | None = None  # set when the request carried a draft hint it verified
    # The stop string that ended the choice (vLLM's ``stop_reason``); None: an end-of-turn
    # token, a grammar's end, or a length cut. Embedded engines only.
    stop_string: str | None = None


class Backend(Protocol):
    info: BackendInfo

    def generate(
        self, req: GenerationRequest, prepared: Any = None
    ) -> AsyncIterator[TokenEvent | FinishEvent]:
        """Stream token events; each choice ends with a ``FinishEvent``. ``prepared`` is what
        the backend's ``prepare(req)`` returned, if the caller called it first."""
        ...


def collect(events: Sequence[TokenEvent | FinishEvent], model: str) -> GenerationResult:
    """Fold a stream of events into per-choice results (``Backend.complete`` for any backend)."""
    by_index: dict[int, Choice] = {}
    prompt_tokens = 0
    cached_tokens: int | None = None  # the first choice's, as the prompt is counted once
    compute_s = 0.0  # every choice's: each was decoded on its own
    for event in events:
        choice = by_index.setdefault(event.index, Choice(event.index, "", [], [], "stop"))
        choice.text += event.text
        if isinstance(event, FinishEvent):
            choice.finish_reason = event.reason
            choice.spec = event.spec
            choice.hint = event.hint
            choice.stop_string = event.stop_string
            prompt_tokens = prompt_tokens or event.prompt_tokens
            cached_tokens = event.cached_tokens if cached_tokens is None else cached_tokens
            compute_s += event.compute_s
            choice.token_ids.extend([-1] * event.uncounted_tokens)  # unknown ids, as counted
        else:
            choice.token_ids.append(event.token_id)
            choice.events.append(event)
    choices = [by_index[i] for i in sorted(by_index)]
    return GenerationResult(choices, prompt_tokens, model, cached_tokens or 0, compute_s)
