"""Learned deferral: whether a small model's answer is likely wrong, from many signals at once.

A single signal separates right from wrong answers poorly (BENCHMARKS.md: best AUROC 0.73, and
the mean probability is length-biased and even inverted on tool calls), so the rule combines:

* quantiles of the per-token log-probabilities (Gupta et al., ICLR 2024: the low quantiles say
  more than the mean), their minimum, and the entropy;
* grammar agreement (the mass the model put on allowed tokens), defined only where a grammar
  masked the tokens;
* provenance: the share of a tool call's argument values that appear in the conversation (an
  invented city or id is a strong failure sign);
* the output check (valid or not) and the answer's length;
* with tools offered, whether the answer called none (an abstention, right on irrelevant
  requests and wrong elsewhere: without this a text answer looks unconfident only for its
  missing provenance) and how many calls it made.

A logistic regression per kind of request (``text``, ``json``, ``tools``), pure numpy, fitted by
``slmgate calibrate --deferral-out`` from labelled answers and stored as JSON. A feature that is
undefined for a request (no logprobs from a remote tier, no grammar, no call) never makes it
look confident: it takes the value, within the range seen in training, that gives the lowest
success probability, so the rule rests on the features that exist.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from decoding.constraint import Constraint, JsonObject, JsonSchema, NoConstraint, ToolCalls
from decoding.types import TokenEvent

Kind = Literal["text", "json", "tools"]
KINDS: tuple[Kind, ...] = ("text", "json", "tools")
FEATURES = (
    "lp_q10", "lp_q25", "lp_q50", "lp_min", "entropy_mean", "entropy_max",
    "agree_mean", "agree_min", "provenance", "valid", "log_tokens", "abstained", "calls",
)  # fmt: skip
LOGPROB_FLOOR = -20.0  # log-probabilities below this carry no more information
# The rule the default ``auto`` cascade ships with (``gateway.config.DEFAULT_ROUTES``).
BUNDLED_RULE_PATH = Path(__file__).parent / "rules" / "default_deferral.json"


def kind_of(constraint: Constraint) -> Kind:
    if isinstance(constraint, ToolCalls):
        return "tools"
    if isinstance(constraint, JsonObject | JsonSchema):
        return "json"
    return "text"


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of an ascending, non-empty sequence."""
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def token_features(events: Sequence[TokenEvent], masked: bool) -> dict[str, float]:
    """Log-probability quantiles, entropy and (when a grammar ``masked`` the logits) agreement of
    the tokens the model chose itself (grammar-forced tokens and ones without a logprob are
    left out); empty when there are none."""
    picked = [e for e in events if not e.forced and math.isfinite(e.logprob)]
    if not picked:
        return {}
    lps = sorted(max(e.logprob, LOGPROB_FLOOR) for e in picked)
    entropies = [max(e.entropy, 0.0) for e in picked]
    out = {
        "lp_q10": _quantile(lps, 0.10),
        "lp_q25": _quantile(lps, 0.25),
        "lp_q50": _quantile(lps, 0.50),
        "lp_min": lps[0],
        "entropy_mean": sum(entropies) / len(entropies),
        "entropy_max": max(entropies),
        "log_tokens": math.log1p(len(events)),
    }
    if masked:
        agreement = [min(max(e.allowed_mass, 0.0), 1.0) for e in picked]
        out["agree_mean"] = sum(agreement) / len(agreement)
        out["agree_min"] = min(agreement)
    return out


def _leaves(value: Any) -> Iterable[Any]:
    if isinstance(value, dict):
        for v in value.values():
            yield from _leaves(v)
    elif isinstance(value, list):
        for v in value:
            yield from _leaves(v)
    else:
        yield value


def _words(text: str) -> str:
    """Lower-case words joined by single spaces: punctuation and spacing do not matter."""
    return " ".join(re.findall(r"\w+", text.lower()))


def _appears(value: Any, conversation: str, words: str) -> bool | None:
    """Whether an argument value is found in the conversation; None for values that say nothing
    (booleans, null, empty strings, small integers a model may well infer: 0-10)."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        if isinstance(value, int) and 0 <= value <= 10:
            return None
        number = re.escape(repr(value) if isinstance(value, float) else str(value))
        plain = number.removesuffix(r"\.0")
        digits = re.sub(r"(?<=\d)(?=(\d{3})+(?!\d))", ",?", plain)  # 1000000 or 1,000,000
        return re.search(rf"(?<![\d.]){digits}(?![\d])", conversation) is not None
    text = _words(str(value))
    if not text:
        return None
    return f" {text} " in f" {words} "


def provenance(arguments: Sequence[Mapping[str, Any]], conversation: str) -> float | None:
    """Share of the calls' informative argument values found in ``conversation`` (None when
    there are no such values)."""
    words = _words(conversation)
    verdicts = [
        found
        for args in arguments
        for leaf in _leaves(args)
        if (found := _appears(leaf, conversation, words)) is not None
    ]
    return None if not verdicts else sum(verdicts) / len(verdicts)


def conversation_text(messages: Sequence[Mapping[str, Any]]) -> str:
    """The text a model could copy argument values from: every message's content."""
    parts: list[str] = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts += [p.get("text", "") for p in content if isinstance(p, dict)]
    return "\n".join(parts)


def answer_features(
    events: Sequence[TokenEvent],
    *,
    masked: bool,
    valid: bool,
    call_arguments: Sequence[Mapping[str, Any]] | None,
    messages: Sequence[Mapping[str, Any]],
    tools_offered: bool = False,
) -> dict[str, float]:
    """Every deferral feature of one answer (a missing key = undefined for it)."""
    out = token_features(events, masked)
    out["valid"] = 1.0 if valid else 0.0
    if tools_offered:
        out["calls"] = float(len(call_arguments or ()))
        out["abstained"] = 0.0 if call_arguments else 1.0
    if call_arguments:
        prov = provenance(call_arguments, conversation_text(messages))
        if prov is not None:
            out["provenance"] = prov
    return out


def is_masked(constraint: Constraint, guided: bool, embedded: bool) -> bool:
    """Whether token events carry grammar agreement: an embedded engine decoding with a grammar."""
    return embedded and guided and not isinstance(constraint, NoConstraint)


# ---- the rule -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LogisticModel:
    """P(success) = sigmoid(bias + weights . (x - mean) / scale) over ``features``."""

    features: tuple[str, ...]
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    weights: tuple[float, ...]
    bias: float
    low: tuple[float, ...]  # training range per feature, for undefined values
    high: tuple[float, ...]
    threshold: float = 0.5  # escalate when P(success) < threshold

    def p_success(self, values: Mapping[str, float]) -> float:
        z = self.bias
        for i, name in enumerate(self.features):
            w = self.weights[i]
            x = values.get(name)
            if x is None or not math.isfinite(x):
                x = self.low[i] if w > 0 else self.high[i]  # the least confident value
            z += w * (x - self.mean[i]) / self.scale[i]
        return 1.0 / (1.0 + math.exp(-max(min(z, 60.0), -60.0)))


@dataclass(frozen=True, slots=True)
class DeferralRule:
    """One logistic model per kind of request. A kind without a model is not deferred on
    confidence (invalid or failed answers still escalate)."""

    models: Mapping[str, LogisticModel] = field(default_factory=dict)

    def covers(self, kind: Kind) -> bool:
        return kind in self.models

    def p_success(self, kind: Kind, values: Mapping[str, float]) -> float | None:
        model = self.models.get(kind)
        return None if model is None else model.p_success(values)

    def threshold(self, kind: Kind) -> float:
        model = self.models.get(kind)
        return 0.0 if model is None else model.threshold

    def to_dict(self) -> dict[str, Any]:
        return {"deferral_rule": 1, "models": {k: _fields(m) for k, m in self.models.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DeferralRule:
        if data.get("deferral_rule") != 1:
            raise ValueError("not a deferral rule file (slmgate calibrate --deferral-out)")
        models = {}
        for kind, m in data["models"].items():
            if kind not in KINDS:
                raise ValueError(f"deferral rule: unknown kind {kind!r}; known: {KINDS}")
            n = len(m["features"])
            parts = [m[k] for k in ("mean", "scale", "weights", "low", "high")]
            if any(len(p) != n for p in parts) or any(s <= 0 for s in m["scale"]):
                raise ValueError(f"deferral rule: malformed model for {kind!r}")
            floats = {k: tuple(float(v) for v in m[k]) for k in ("mean", "scale", "weights")}
            bounds = {k: tuple(float(v) for v in m[k]) for k in ("low", "high")}
            models[kind] = LogisticModel(
                features=tuple(m["features"]), bias=float(m["bias"]),
                threshold=float(m.get("threshold", 0.5)), **floats, **bounds,
            )  # fmt: skip
        return cls(models)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> DeferralRule:
        return cls.from_dict(json.loads(Path(path).read_text()))


def fit_logistic(
    rows: Sequence[tuple[Mapping[str, float], bool]],
    features: Sequence[str] = FEATURES,
    l2: float = 1.0,
    iterations: int = 50,
) -> LogisticModel:
    """L2-regularised logistic regression by Newton's method on standardised features.

    Features never defined in ``rows`` are dropped; undefined values are filled with the
    feature's median for fitting (at prediction they take the least confident value)."""
    if not rows:
        raise ValueError("no labelled rows to fit a deferral rule on")
    used = [f for f in features if any(f in r for r, _ in rows)]
    raw = np.array([[r.get(f, np.nan) for f in used] for r, _ in rows], dtype=float)
    y = np.array([1.0 if ok else 0.0 for _, ok in rows])
    med = np.nanmedian(raw, axis=0) if used else np.zeros(0)
    x = np.where(np.isnan(raw), med, raw)
    low, high = x.min(axis=0), x.max(axis=0)
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale = np.where(scale > 1e-9, scale, 1.0)
    z = np.hstack([np.ones((len(rows), 1)), (x - mean) / scale])
    w = np.zeros(z.shape[1])
    penalty = np.diag([0.0] + [l2] * len(used))
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-np.clip(z @ w, -60, 60)))
        grad = z.T @ (p - y) + penalty @ w
        hess = (z * (p * (1 - p))[:, None]).T @ z + penalty + 1e-9 * np.eye(len(w))
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return LogisticModel(
        tuple(used), tuple(mean.tolist()), tuple(scale.tolist()), tuple(w[1:].tolist()),
        float(w[0]), tuple(low.tolist()), tuple(high.tolist()),
    )  # fmt: skip


def fit_rule(
    rows: Sequence[tuple[Kind, Mapping[str, float], bool]],
    *,
    min_success_rate: float | None = None,
    max_fallback_rate: float | None = None,
    l2: float = 1.0,
) -> tuple[DeferralRule, dict[str, Any]]:
    """A rule with one model per kind that has both successes and failures, each with the
    lowest threshold at which the answers it keeps succeed ``min_success_rate`` of the time, or
    the highest that escalates at most ``max_fallback_rate`` of them (one target, on these
    rows); plus a report per kind (rows, AUROC on these rows, threshold, fallback)."""
    from router.calibrate import calibrate

    models: dict[str, LogisticModel] = {}
    report: dict[str, Any] = {}
    for kind in KINDS:
        labelled = [(values, ok) for k, values, ok in rows if k == kind]
        if len({ok for _, ok in labelled}) < 2:
            report[kind] = {"rows": len(labelled), "fitted": False}
            continue
        model = fit_logistic(labelled, l2=l2)
        scored = [(model.p_success(values), ok) for values, ok in labelled]
        cal = calibrate(scored, signal="deferral", min_success_rate=min_success_rate,
                        max_fallback_rate=max_fallback_rate)  # fmt: skip
        models[kind] = replace(model, threshold=cal.threshold)
        report[kind] = {
            "rows": len(labelled), "fitted": True, "auroc": cal.auroc,
            "threshold": cal.threshold, "fallback_rate": cal.fallback_rate,
            "kept_success_rate": cal.kept_success_rate, "met": cal.met,
            "weights": dict(zip(model.features, model.weights, strict=True)),
        }  # fmt: skip
    return DeferralRule(models), report


def holdout_report(
    rule: DeferralRule,
    rows: Sequence[tuple[Kind, Mapping[str, float], bool]],
    signals: Sequence[str] = (),
) -> dict[str, Any]:
    """How a fitted rule does on rows it was not fitted on, per kind: its AUROC next to each
    single signal's and feature's (over the rows where that one is defined; below 0.5 means
    inverted), and at its own threshold the fallback rate and the kept answers' success rate."""
    from router.calibrate import auroc, rates_at

    report: dict[str, Any] = {}
    for kind in KINDS:
        labelled = [(values, ok) for k, values, ok in rows if k == kind]
        if not labelled:
            continue
        entry: dict[str, Any] = {"rows": len(labelled), "success_rate":
                                 sum(ok for _, ok in labelled) / len(labelled)}  # fmt: skip
        if rule.covers(kind):
            scored = [(rule.p_success(kind, values) or 0.0, ok) for values, ok in labelled]
            fallback, kept = rates_at(scored, rule.threshold(kind))
            entry.update(rule_auroc=auroc(scored), fallback_rate=fallback,
                         kept_success_rate=kept)  # fmt: skip
        single: dict[str, float | None] = {}
        for name in (*signals, *FEATURES):
            defined = [(v[name], ok) for v, ok in labelled if name in v]
            if name not in single and defined:
                single[name] = auroc(defined)
        entry["single"] = single
        report[kind] = entry
    return report


def _fields(model: LogisticModel) -> dict[str, Any]:
    return {
        name: list(v) if isinstance(v := getattr(model, name), tuple) else v
        for name in LogisticModel.__dataclass_fields__
    }
