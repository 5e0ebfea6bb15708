"""``slmgate replay``: what a route would have done on logged traffic, without serving anyone.

Each logged request is answered again by the route's small tier; the route's own rule (the
output check, then its deferral rule or signal threshold) says whether it would have kept that
answer, and the kept answer is compared with the recorded one: the same tool calls, or the same
JSON value, agree; free text, or a request logged without its answer, cannot be judged
(``abstain``, reported as coverage). The cost per success counts the small tier's cost on every
request plus the recorded answer's cost on the ones it would have escalated, and counts as
successes the kept answers that agree and the escalated ones (the recorded answer stands).

Pure functions over OpenAI wire bodies; ``benchmarks.replay_run`` sends the requests.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from router.deferral import Kind
from router.route import Route


@dataclass(frozen=True, slots=True)
class LoggedCall:
    """One line of the log: the request body and, when recorded, the answer and its cost."""

    request: dict[str, Any]
    response: dict[str, Any] | None = None
    cost_usd: float | None = None


def parse_log_line(line: str, number: int) -> LoggedCall:
    """``{"request": {...}, "response": {...}, "cost_usd": x}`` or a bare request body."""
    try:
        data = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"line {number}: not JSON ({exc.msg})") from None
    if not isinstance(data, dict):
        raise ValueError(f"line {number}: expected an object")
    if "request" not in data:
        data = {"request": data}
    request, response = data["request"], data.get("response")
    if not isinstance(request, dict) or not isinstance(request.get("messages"), list):
        raise ValueError(f"line {number}: the request needs a 'messages' list")
    if response is not None and not isinstance(response, dict):
        raise ValueError(f"line {number}: 'response' must be an object")
    cost = data.get("cost_usd")
    cost = float(cost) if isinstance(cost, int | float) and not isinstance(cost, bool) else None
    return LoggedCall(request, response, cost)


def kind_of_body(body: Mapping[str, Any]) -> Kind:
    if body.get("tools") and body.get("tool_choice") != "none":
        return "tools"
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema"):
        return "json"
    return "text"


def _message(response: Mapping[str, Any] | None) -> dict[str, Any] | None:
    choices = response.get("choices") if response else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return None
    message = choices[0].get("message")
    return message if isinstance(message, dict) else None


def _calls(message: Mapping[str, Any]) -> list[tuple[str, str]] | None:
    """Sorted (name, canonical arguments) of a message's tool calls; None if unreadable."""
    out = []
    for call in message.get("tool_calls") or []:
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict):
            return None
        try:
            args = json.loads(fn.get("arguments") or "{}")
        except (TypeError, json.JSONDecodeError):
            return None
        out.append((str(fn.get("name")), json.dumps(args, sort_keys=True)))
    return sorted(out)


def wire_agreement(
    kind: Kind, recorded: Mapping[str, Any] | None, replayed: Mapping[str, Any]
) -> bool | None:
    """Whether the replayed answer agrees with the recorded one (None: cannot be judged)."""
    mine, theirs = _message(replayed), _message(recorded)
    if mine is None or theirs is None:
        return None
    if kind == "tools":
        a, b = _calls(mine), _calls(theirs)
        if a is None or b is None or (not a and not b):
            return None
        return a == b
    if kind == "json":
        try:
            return bool(json.loads(mine.get("content") or "") == json.loads(
                theirs.get("content") or ""))  # fmt: skip
        except json.JSONDecodeError:
            return False
    return None


def would_keep(route: Route, kind: Kind, facts: Mapping[str, Any]) -> tuple[bool, str | None]:
    """Whether the route's first tier would have kept this answer, and why not.

    The same order as the live cascade: an invalid or non-executable answer escalates, then the
    route's deferral rule for this kind (when it has one), else its signal threshold."""
    if facts.get("valid") is False:
        return False, "invalid"
    if facts.get("executable") is False:
        return False, "not_executable"
    signals = facts.get("signals") if isinstance(facts.get("signals"), dict) else {}
    assert isinstance(signals, dict)
    values = {k: float(v) for k, v in signals.items() if isinstance(v, int | float)}
    if route.deferral is not None:
        p = route.deferral.p_success(kind, values)
        if p is not None:
            confident = p >= route.deferral.threshold(kind)
            return (True, None) if confident else (False, "low_confidence")
    score = values.get(route.signal)
    if score is not None and score < route.threshold:
        return False, "low_confidence"
    return True, None


@dataclass(slots=True)
class ReplayRow:
    line: int
    kind: str
    kept: bool
    reason: str | None
    agreed: bool | None  # kept answers only; None: abstain (cannot be judged)
    slm_cost_usd: float
    recorded_cost_usd: float | None
    error: str | None = None  # the small tier could not answer (counted as escalated)


def summarize(rows: Sequence[ReplayRow]) -> dict[str, Any]:
    """Keep rate, agreement and coverage of the kept answers, and the cost per success."""
    kept = [r for r in rows if r.kept]
    judged = [r for r in kept if r.agreed is not None]
    agreed = sum(bool(r.agreed) for r in judged)
    escalated = [r for r in rows if not r.kept]
    unpriced = sum(r.recorded_cost_usd is None for r in escalated)
    cost = sum(r.slm_cost_usd for r in rows) + sum(r.recorded_cost_usd or 0.0 for r in escalated)
    recorded = [r.recorded_cost_usd for r in rows]
    baseline = None if any(c is None for c in recorded) else sum(c or 0.0 for c in recorded)
    successes = agreed + len(escalated)
    per_kind: dict[str, dict[str, Any]] = {}
    for r in rows:
        k = per_kind.setdefault(r.kind, {"requests": 0, "kept": 0, "judged": 0, "agreed": 0})
        k["requests"] += 1
        k["kept"] += int(r.kept)
        k["judged"] += int(r.kept and r.agreed is not None)
        k["agreed"] += int(r.kept and bool(r.agreed))
    return {
        "requests": len(rows),
        "kept": len(kept),
        "keep_rate": None if not rows else len(kept) / len(rows),
        "coverage": None if not kept else len(judged) / len(kept),
        "agreement": None if not judged else agreed / len(judged),
        "escalated": len(escalated),
        "escalated_unpriced": unpriced,
        "slm_errors": sum(r.error is not None for r in rows),
        "cost_usd": cost,
        "successes_inferred": successes,
        "cps_usd": None if successes == 0 else cost / successes,
        "recorded_cost_usd": baseline,
        "recorded_cps_usd": None if baseline is None or not rows else baseline / len(rows),
        "per_kind": per_kind,
        "reasons": _count(r.reason for r in escalated),
    }


def _count(values: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        key = v or "error"
        out[key] = out.get(key, 0) + 1
    return out


def render(summary: Mapping[str, Any]) -> str:
    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.1f}%"

    def usd(x: float | None) -> str:
        return "-" if x is None else f"{x:.3g}"

    lines = [
        "| requests | kept by the SLM | agreement (kept, judged) | coverage | escalated "
        "| CPS $ (inferred) | recorded CPS $ |",
        "|---|---|---|---|---|---|---|",
        f"| {summary['requests']} | {summary['kept']} ({pct(summary['keep_rate'])}) "
        f"| {pct(summary['agreement'])} | {pct(summary['coverage'])} | {summary['escalated']} "
        f"| {usd(summary['cps_usd'])} | {usd(summary['recorded_cps_usd'])} |",
        "",
        "| kind | requests | kept | judged | agreed |",
        "|---|---|---|---|---|",
    ]
    for kind, k in sorted(summary["per_kind"].items()):
        lines.append(f"| {kind} | {k['requests']} | {k['kept']} | {k['judged']} | {k['agreed']} |")
    return "\n".join(lines)


def row_dict(row: ReplayRow) -> dict[str, Any]:
    return asdict(row)
