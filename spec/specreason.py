"""SpecReason's pure parts (Pan et al. 2025): the small model writes each reasoning step, the
large model only scores it, and writes the step itself when the score is too low.

Scoring a step costs the large model one forward pass (a one-token answer whose next-token
distribution over the digits 0-9 is read as an expected score), where writing it costs one pass
per token; so every step the small model gets right saves the large model most of its work.
Here: the judging prompt, reading the score from top log-probabilities, where a solution's
steps join, and the bookkeeping the router reports (who wrote each step, its score).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "JUDGE_SYSTEM",
    "ReasoningTrace",
    "SpecReasonConfig",
    "Step",
    "digit_score",
    "joined",
    "judge_messages",
]

JUDGE_SYSTEM = (
    "You check one step of a solution at a time. Reply with a single digit from 0 to 9: 9 when "
    "the new step is correct and moves the solution forward, 0 when it is wrong or useless."
)

Author = Literal["slm", "llm"]


@dataclass(frozen=True, slots=True)
class SpecReasonConfig:
    """A ``specreason`` route's settings: ``threshold`` (a step whose expected score is below
    it is rewritten by the large model; 7 as in the paper), ``separator`` (where a step ends:
    a step request stops there), ``step_tokens`` (the most tokens one step may take),
    ``max_steps`` (after that many steps the large model finishes alone), and ``final_by`` (who
    writes the last step, the one with the answer).

    The paper splits at blank lines, which reasoning models write between steps; the small
    instruct models here write one step per line and rarely a blank line (measured on GSM8K:
    the 1.5B's whole solution came back as one "step"), so a line is a step by default."""

    threshold: float = 7.0
    separator: str = "\n"
    step_tokens: int = 96
    max_steps: int = 24
    final_by: Author = "llm"

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 9.0:
            raise ValueError("specreason threshold must be in [0, 9]")
        if self.step_tokens < 1 or self.max_steps < 1:
            raise ValueError("specreason step_tokens and max_steps must be >= 1")
        if not self.separator:
            raise ValueError("specreason separator must not be empty")
        if self.final_by not in ("slm", "llm"):
            raise ValueError("specreason final_by must be 'slm' or 'llm'")


def digit_score(top: Iterable[tuple[str, float]]) -> float | None:
    """The expected digit under a next-token distribution, renormalised over the digit tokens
    among ``top`` (token text, log-probability); None when no digit is among them.

    >>> round(digit_score([("9", math.log(0.5)), ("7", math.log(0.25)), ("x", math.log(0.25))]),
    ...       3)
    8.333
    >>> digit_score([("yes", 0.0)]) is None
    True
    """
    mass: dict[int, float] = {}
    for text, logprob in top:
        digit = text.strip()
        if len(digit) == 1 and digit.isdigit() and math.isfinite(logprob):
            mass[int(digit)] = mass.get(int(digit), 0.0) + math.exp(logprob)
    total = math.fsum(mass.values())
    if total <= 0.0:
        return None
    return math.fsum(d * p for d, p in mass.items()) / total


def joined(steps: Sequence[str], separator: str) -> str:
    """The solution text so far: its steps, separated.

    >>> joined(["a", "b"], "\\n")
    'a\\nb'
    """
    return separator.join(steps)


def judge_messages(
    messages: Sequence[dict[str, Any]], steps: Sequence[str], step: str, separator: str = "\n"
) -> tuple[dict[str, Any], ...]:
    """The large model's judging prompt for ``step`` after ``steps``: the conversation's last
    user message is the problem. The problem and system prompt come first and stay the same
    from step to step, so the prefix cache keeps them."""
    problem = next(
        (m.get("content") for m in reversed(messages) if m.get("role") == "user"), ""
    )
    if not isinstance(problem, str):  # content parts: their text
        problem = " ".join(p.get("text", "") for p in problem or [] if isinstance(p, dict))
    so_far = joined(steps, separator) if steps else "(nothing yet)"
    user = (
        f"Problem:\n{problem}\n\nSolution so far:\n{so_far}\n\nNew step:\n{step}\n\n"
        "Score the new step from 0 to 9. Reply with the digit only."
    )
    return ({"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user})


@dataclass(frozen=True, slots=True)
class Step:
    """One step of the answer: who wrote it, and the small model's step score when it was
    judged (None for a step the large model wrote without one being judged first)."""

    author: Author
    text: str
    tokens: int
    score: float | None = None


@dataclass(slots=True)
class ReasoningTrace:
    """The steps kept so far, and every judgement made (kept or not), for the ``slmgate``
    object and the ledger."""

    config: SpecReasonConfig
    steps: list[Step] = field(default_factory=list)
    judged: list[tuple[float | None, bool]] = field(default_factory=list)  # (score, kept)

    def keeps(self, score: float | None) -> bool:
        """Whether a small-model step with this score is kept (an unreadable score is not)."""
        kept = score is not None and score >= self.config.threshold
        self.judged.append((score, kept))
        return kept

    @property
    def texts(self) -> list[str]:
        return [s.text for s in self.steps]

    @property
    def finishing(self) -> bool:
        """Whether the step budget is spent, so the large model finishes alone."""
        return len(self.steps) >= self.config.max_steps

    def summary(self) -> dict[str, Any]:
        kept = sum(k for _, k in self.judged)
        return {
            "steps": [
                {"author": s.author, "tokens": s.tokens,
                 "score": None if s.score is None else round(s.score, 3)}
                for s in self.steps
            ],
            "judged": len(self.judged),
            "kept": kept,
            "acceptance_rate": kept / len(self.judged) if self.judged else None,
            "slm_tokens": sum(s.tokens for s in self.steps if s.author == "slm"),
            "llm_tokens": sum(s.tokens for s in self.steps if s.author == "llm"),
            "threshold": self.config.threshold,
        }  # fmt: skip
