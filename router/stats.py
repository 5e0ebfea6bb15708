"""Pure helpers behind the ledger's stats: window parsing, percentiles, rates, CPS and buckets.

Kept apart from the database layer so the arithmetic the dashboard shows is tested on literals.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_WINDOW = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$", re.IGNORECASE)
MAX_WINDOW_DAYS = 3650
MAX_WINDOW_S = MAX_WINDOW_DAYS * 86400.0
_BOUNDS = f"window must be more than 0 s and at most {MAX_WINDOW_DAYS} days"


def parse_window(text: str | float | None) -> float | None:
    """Seconds for a window like ``90``, ``30s``, ``15m``, ``24h``, ``7d``, ``2w``.

    ``None``, ``""`` and ``"all"`` mean no window (all data). Raises ``ValueError`` on anything
    else — including zero, negative, non-finite and longer than ``MAX_WINDOW_DAYS`` (3650 days;
    beyond that a start time loses meaning and huge figures overflow) — so the gateway answers
    400 rather than silently showing all data.
    """
    if text is None:
        return None
    if isinstance(text, bool):
        raise ValueError(f"invalid window {text!r}")
    if isinstance(text, int | float):
        try:
            seconds = float(text)
        except OverflowError:  # an int too large for a float
            seconds = math.inf
        return _bounded(seconds, repr(text)[:40])
    if text.strip().lower() in ("", "all"):
        return None
    match = _WINDOW.match(text)
    if match is None:
        raise ValueError(f"invalid window {text[:40]!r}: use e.g. 900, 15m, 24h, 7d or all")
    seconds = float(match.group(1)) * _UNITS[(match.group(2) or "s").lower()]
    return _bounded(seconds, repr(text.strip()[:40]))


def _bounded(seconds: float, shown: str) -> float:
    if not math.isfinite(seconds) or seconds <= 0 or seconds > MAX_WINDOW_S:
        raise ValueError(f"{_BOUNDS} ({MAX_WINDOW_S:.0f} s), got {shown}")
    return seconds


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0–100) with linear interpolation (numpy's default); None if empty."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return float(ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo))


def p50_p95(values: Sequence[float]) -> dict[str, float | None]:
    """The latency summary the stats API serves."""
    ordered = sorted(values)
    return {"p50": percentile(ordered, 50), "p95": percentile(ordered, 95)}


def rate(numerator: float, denominator: float) -> float | None:
    """numerator / denominator, or None when there is nothing to divide by."""
    return None if denominator == 0 else numerator / denominator


def cps(cost_usd: float, successful_tasks: int) -> float | None:
    """Cost per successful task: the cost of a set of tasks over how many of them succeeded.

    None when nothing succeeded: the cost per success is then unbounded, not zero.
    """
    return None if successful_tasks <= 0 else cost_usd / successful_tasks


def savings(counterfactual_usd: float, cost_usd: float) -> float | None:
    """What the window saved against running every request on the route's top tier; None when
    that tier has no price (a counterfactual of 0 makes any saving meaningless, not negative)."""
    return None if counterfactual_usd <= 0 else counterfactual_usd - cost_usd


#: ``outcome_source`` values that carry an outcome; anything else (NULL) is unknown.
BASES = ("reported", "inferred")
Group = tuple[int, int, float]  # tasks, successful tasks, cost in USD


def outcome_figures(tasks: int, successes: int, cost_usd: float) -> dict[str, Any]:
    """Task count, successes, cost, success rate and CPS of one set of tasks."""
    return {
        "tasks": tasks,
        "successful_tasks": successes,
        "cost_usd": cost_usd,
        "success_rate": rate(successes, tasks),
        "cps_usd": cps(cost_usd, successes),
    }


def outcomes(groups: Mapping[str | None, Group]) -> dict[str, dict[str, Any]]:
    """Figures per outcome basis from ``(tasks, successes, cost)`` per ``outcome_source``.

    ``reported`` and ``inferred`` are kept apart; ``combined`` is both together (labelled as
    such, never the headline); ``unknown`` (free-text tasks with no reported
    outcome) counts tasks and cost only: it is neither a success nor a failure.
    """
    reported = groups.get("reported", (0, 0, 0.0))
    inferred = groups.get("inferred", (0, 0, 0.0))
    unknown = _total([g for source, g in groups.items() if source not in BASES])
    return {
        "reported": outcome_figures(*reported),
        "inferred": outcome_figures(*inferred),
        "combined": outcome_figures(*_total([reported, inferred])),
        "unknown": {"tasks": unknown[0], "cost_usd": unknown[2]},
    }


def _total(groups: Sequence[Group]) -> Group:
    return (
        sum(g[0] for g in groups),
        sum(g[1] for g in groups),
        sum((g[2] for g in groups), 0.0),
    )


def cps_basis(reported_tasks: int) -> str:
    """The headline's basis: reported outcomes whenever the window has any, else inferred."""
    return "reported" if reported_tasks > 0 else "inferred"


def energy_measured(measured: int, with_energy: int) -> bool | None:
    """True if every energy figure was measured, False if any was estimated, None if none exist."""
    if with_energy == 0:
        return None
    return measured == with_energy


def bucket_edges(start: float, end: float, buckets: int) -> list[tuple[float, float]]:
    """``buckets`` equal ``[start, end)`` intervals (the last one closed) covering the range."""
    if buckets < 1:
        raise ValueError(f"buckets must be >= 1, got {buckets}")
    width = (end - start) / buckets
    edges = [(start + i * width, start + (i + 1) * width) for i in range(buckets)]
    edges[-1] = (edges[-1][0], end)  # no float drift on the last edge
    return edges


def bucket_width(start: float, end: float, buckets: int) -> float:
    """Width used to index buckets; 1.0 for an empty range so every row lands in bucket 0."""
    width = (end - start) / buckets
    return width if width > 0 else 1.0


def clamp_bucket(index: float | int | None, buckets: int) -> int:
    """Bucket index in range: the window's end (index == buckets) belongs to the last bucket."""
    if index is None:
        return 0
    return max(0, min(int(index), buckets - 1))


def series(
    edges: Sequence[tuple[float, float]],
    requests: Iterable[tuple[int, int]],
    tasks: Iterable[tuple[int, int, int, float]],
) -> list[dict[str, float | int | None]]:
    """Per-bucket rows from ``(bucket, requests)`` and ``(bucket, tasks, successes, cost)``.

    ``cost_usd`` of a bucket is the cost of the tasks that started in it, so that
    ``cps_usd == cost_usd / successful_tasks`` holds row by row.
    """
    n = len(edges)
    req_counts = [0] * n
    task_counts = [0] * n
    successes = [0] * n
    costs = [0.0] * n
    for index, count in requests:
        req_counts[clamp_bucket(index, n)] += int(count)
    for index, count, ok, cost in tasks:
        b = clamp_bucket(index, n)
        task_counts[b] += int(count)
        successes[b] += int(ok)
        costs[b] += float(cost)
    return [
        {
            "start": lo,
            "end": hi,
            "requests": req_counts[i],
            "tasks": task_counts[i],
            "successful_tasks": successes[i],
            "cost_usd": costs[i],
            "cps_usd": cps(costs[i], successes[i]),
            "success_rate": rate(successes[i], task_counts[i]),
        }
        for i, (lo, hi) in enumerate(edges)
    ]


def verified_escalation(
    verified: int, regenerated: int, drafted: int, reused: int, output_tokens: int
) -> dict[str, float | int | None]:
    """Escalations whose tier verified the earlier answer as a draft (``spec.hint``) and those
    that regenerated it; ``reused_share``: output tokens of the verified escalations that were
    taken from the earlier tier's answer.

    >>> verified_escalation(2, 1, 40, 30, 60)["reused_share"]
    0.5
    """
    return {
        "verified": verified,
        "regenerated": regenerated,
        "drafted_tokens": drafted,
        "reused_tokens": reused,
        "reused_share": rate(reused, output_tokens),
    }


def speculation(drafted: int, accepted: int, steps: int) -> dict[str, float | int | None]:
    """Speculation totals: acceptance rate = accepted / drafted; mean accepted length =
    accepted draft tokens per verification step."""
    return {
        "drafted": drafted,
        "accepted": accepted,
        "steps": steps,
        "acceptance_rate": rate(accepted, drafted),
        "mean_accepted_length": rate(accepted, steps),
    }
