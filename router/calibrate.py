"""Threshold calibration: pick a route's escalation threshold from labelled outcomes.

Input: one row per small-model answer, ``(score, success)`` — the confidence signal it had and
whether it turned out right (a BFCL checker verdict, or a task outcome from the ledger). A
cascade escalates when ``score < threshold``. Two targets:

* ``max_fallback_rate``: the highest threshold whose fallback rate stays within budget (the most
  quality the budget buys);
* ``min_success_rate``: the lowest threshold at which the answers the small model *keeps*
  succeed at least that often (the least fallback that meets the bar).

Pure functions; the CLI (``slmgate calibrate``) only loads rows and prints the result.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from router.confidence import SIGNALS


@dataclass(frozen=True, slots=True)
class Calibration:
    signal: str
    threshold: float
    target: str  # "max_fallback_rate=0.3" or "min_success_rate=0.9"
    rows: int
    fallback_rate: float  # share of rows escalated at this threshold
    kept_success_rate: float | None  # success among the rows kept on the small model
    slm_success_rate: float  # success with no cascade (all kept)
    auroc: float | None  # how well the signal separates successes from failures
    met: bool  # whether the target is reachable on these rows

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _candidates(scores: Sequence[float]) -> list[float]:
    """Thresholds worth trying: 0 (never escalate), each distinct score, and just above the max
    (escalate everything). Escalating means ``score < t``, so t = a score keeps that score."""
    distinct = sorted(set(scores))
    above = (distinct[-1] + 1e-9) if distinct else 1.0
    return [0.0, *distinct, above]


def rates_at(rows: Sequence[tuple[float, bool]], threshold: float) -> tuple[float, float | None]:
    """(fallback rate, success rate of the kept rows) when escalating ``score < threshold``."""
    if not rows:
        return 0.0, None
    kept = [ok for score, ok in rows if score >= threshold]
    fallback = 1.0 - len(kept) / len(rows)
    return fallback, (sum(kept) / len(kept)) if kept else None


def auroc(rows: Sequence[tuple[float, bool]]) -> float | None:
    """Probability that a random success scores higher than a random failure (ties count half)."""
    pos = [s for s, ok in rows if ok]
    neg = [s for s, ok in rows if not ok]
    if not pos or not neg:
        return None
    ranked = sorted([(s, 1) for s in pos] + [(s, 0) for s in neg])
    rank_sum = 0.0
    i = 0
    while i < len(ranked):  # average ranks over ties
        j = i
        while j < len(ranked) and ranked[j][0] == ranked[i][0]:
            j += 1
        mean_rank = (i + 1 + j) / 2
        rank_sum += mean_rank * sum(label for _, label in ranked[i:j])
        i = j
    return (rank_sum - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))


def calibrate(
    rows: Sequence[tuple[float, bool]],
    *,
    signal: str,
    max_fallback_rate: float | None = None,
    min_success_rate: float | None = None,
) -> Calibration:
    """The threshold for one signal that meets exactly one of the two targets."""
    if (max_fallback_rate is None) == (min_success_rate is None):
        raise ValueError("give exactly one target: max_fallback_rate or min_success_rate")
    if not rows:
        raise ValueError("no labelled rows to calibrate on")
    slm_success = sum(ok for _, ok in rows) / len(rows)
    candidates = _candidates([s for s, _ in rows])
    if max_fallback_rate is not None:
        if not 0.0 <= max_fallback_rate <= 1.0:
            raise ValueError("max_fallback_rate must be in [0, 1]")
        target = f"max_fallback_rate={max_fallback_rate:g}"
        within = [t for t in candidates if rates_at(rows, t)[0] <= max_fallback_rate + 1e-12]
        threshold, met = max(within), True  # t = 0 always qualifies
    else:
        assert min_success_rate is not None
        if not 0.0 <= min_success_rate <= 1.0:
            raise ValueError("min_success_rate must be in [0, 1]")
        target = f"min_success_rate={min_success_rate:g}"
        meeting = [
            t for t in candidates
            if (rate := rates_at(rows, t)[1]) is not None and rate >= min_success_rate - 1e-12
        ]  # fmt: skip
        threshold, met = (min(meeting), True) if meeting else (candidates[-1], False)
    fallback, kept = rates_at(rows, threshold)
    return Calibration(
        signal, threshold, target, len(rows), fallback, kept, slm_success, auroc(rows), met
    )


def calibrate_all(
    labelled: Sequence[tuple[dict[str, float], bool]],
    *,
    signals: Sequence[str] = SIGNALS,
    max_fallback_rate: float | None = None,
    min_success_rate: float | None = None,
) -> list[Calibration]:
    """Calibrate every signal, best separating signal (highest AUROC) first.

    A row whose answer had no scored token (the grammar wrote all of it) has no signal; it is
    never escalated, so it is left out of the threshold search.
    """
    results = []
    for signal in signals:
        rows = [(s[signal], ok) for s, ok in labelled if signal in s]
        if rows:
            results.append(
                calibrate(
                    rows, signal=signal, max_fallback_rate=max_fallback_rate,
                    min_success_rate=min_success_rate,
                )
            )  # fmt: skip
    return sorted(results, key=lambda c: (c.met, c.auroc or 0.0), reverse=True)
