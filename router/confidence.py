"""Confidence signals: pure functions of a small model's token events.

Each signal is a number in [0, 1] where higher means "more sure", so one threshold rule
("escalate when the score is under t") fits all of them and calibration can compare them.
Tokens the grammar forced (a single allowed token, or jump-forward text) are excluded: the model
made no choice there, and JSON envelopes are mostly forced, which would inflate every score.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from decoding.types import TokenEvent

SIGNALS = (
    "mean_prob",  # geometric mean probability of the chosen tokens = exp(mean logprob)
    "min_prob",  # lowest chosen-token probability (= min top-1 probability under greedy)
    "mean_entropy",  # exp(-mean entropy in nats)
    "max_entropy",  # exp(-max entropy)
    "grammar_agreement",  # mean probability mass the model put on grammar-allowed tokens
    "min_grammar_agreement",
)
DEFAULT_SIGNAL = "mean_prob"


def scored(events: Iterable[TokenEvent]) -> list[TokenEvent]:
    """The events that say something about the model's confidence (not grammar-forced)."""
    return [e for e in events if not e.forced and math.isfinite(e.logprob)]


def signals_of(events: Sequence[TokenEvent]) -> dict[str, float]:
    """All signals of one generated choice; empty when no token was the model's own choice
    (then there is nothing to doubt: the grammar wrote the whole output)."""
    picked = scored(events)
    if not picked:
        return {}
    logprobs = [e.logprob for e in picked]
    entropies = [max(e.entropy, 0.0) for e in picked]
    agreement = [min(max(e.allowed_mass, 0.0), 1.0) for e in picked]
    return {
        "mean_prob": math.exp(sum(logprobs) / len(logprobs)),
        "min_prob": math.exp(min(logprobs)),
        "mean_entropy": math.exp(-sum(entropies) / len(entropies)),
        "max_entropy": math.exp(-max(entropies)),
        "grammar_agreement": sum(agreement) / len(agreement),
        "min_grammar_agreement": min(agreement),
        "scored_tokens": float(len(picked)),
    }


def confidence(signals: dict[str, float], signal: str = DEFAULT_SIGNAL) -> float | None:
    """The route's confidence score: one named signal (None when nothing was scored)."""
    if signal not in SIGNALS:
        raise ValueError(f"unknown confidence signal {signal!r}; known: {', '.join(SIGNALS)}")
    return signals.get(signal)


def combined_signals(per_choice: Sequence[dict[str, float]]) -> dict[str, float]:
    """Signals of a multi-choice answer: the least confident choice decides (n > 1)."""
    present = [s for s in per_choice if s]
    if not present:
        return {}
    keys = set.intersection(*(set(s) for s in present))
    return {k: min(s[k] for s in present) for k in sorted(keys)}


@dataclass(frozen=True, slots=True)
class EarlyFallback:
    """When to abort a small-model attempt mid-generation.

    ``window`` scored tokens with a geometric-mean probability under ``min_window_prob`` mean
    the model has lost the thread; ``repeat_cycles`` exact repetitions of one token cycle
    (length 2..``max_cycle``) at the end of the output mean it is looping (SmolLM2-135M does
    this until max_tokens on some schemas). ``min_tokens`` guards the first tokens, whose
    probabilities are naturally low.
    """

    enabled: bool = True
    window: int = 8
    min_window_prob: float = 0.05
    min_tokens: int = 8
    repeat_cycles: int = 4
    max_cycle: int = 24

    def __post_init__(self) -> None:
        if self.window < 1 or self.min_tokens < 0 or self.repeat_cycles < 2 or self.max_cycle < 2:
            raise ValueError("early_fallback: window >= 1, repeat_cycles >= 2, max_cycle >= 2")
        if not 0.0 <= self.min_window_prob < 1.0:
            raise ValueError("early_fallback.min_window_prob must be in [0, 1)")


class CollapseWatch:
    """Feeds on token events as they stream; ``check`` returns why to abort, or None."""

    def __init__(self, rule: EarlyFallback):
        self.rule = rule
        self._recent: deque[float] = deque(maxlen=rule.window)
        self._tokens: list[int] = []
        self._scored = 0

    def push(self, event: TokenEvent) -> str | None:
        self._tokens.append(event.token_id)
        if not event.forced and math.isfinite(event.logprob):
            self._scored += 1
            self._recent.append(event.logprob)
        return self.check()

    def check(self) -> str | None:
        rule = self.rule
        if not rule.enabled:
            return None
        full = self._scored >= rule.min_tokens and len(self._recent) == rule.window
        if full and math.exp(sum(self._recent) / rule.window) < rule.min_window_prob:
            return "confidence_collapse"
        if repeating_cycle(self._tokens, rule.repeat_cycles, rule.max_cycle):
            return "repetition"
        return None


def repeating_cycle(tokens: Sequence[int], cycles: int, max_cycle: int) -> int | None:
    """Length of a token cycle repeated ``cycles`` times at the end of ``tokens``, if any."""
    for length in range(2, max_cycle + 1):
        span = length * cycles
        if span > len(tokens):
            break
        tail = tokens[-span:]
        unit = tail[:length]
        if len(set(unit)) > 1 and all(
            tail[i] == unit[i % length] for i in range(length, span)
        ):
            return length
    return None
