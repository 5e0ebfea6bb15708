"""Pre-routing: decide before generation which tier should answer, as RouteLLM does.

A logistic model over cheap request features estimates the probability that the small model
answers correctly; a route sends the request to the small tier when that probability clears its
threshold, and straight to the large tier otherwise (saving the wasted small attempt). Weights
are learned from labelled outcomes (``slmgate calibrate --pre``) and stored as JSON; without a
learned model a documented prior is used. Pure functions and numpy, no model involved.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from decoding.constraint import Constraint, JsonObject, JsonSchema, ToolCalls
from decoding.types import GenerationRequest
from schemas.jsonschema_utils import iter_subschemas

FEATURES = (
    "bias",
    "log_prompt_chars",  # long conversations are harder for a 135M model
    "messages",
    "tools",  # more tools, more ways to pick the wrong one
    "tool_params",  # total parameters over the offered tools
    "schema_nodes",  # size of the schema(s) the answer must follow (log1p)
    "required_fields",
    "wants_json",
    "wants_tools",
    "parallel",
)

# Prior: the small model is fine on short, simple requests and degrades with size/complexity.
PRIOR_WEIGHTS = {
    "bias": 2.0,
    "log_prompt_chars": -0.25,
    "messages": -0.05,
    "tools": -0.15,
    "tool_params": -0.05,
    "schema_nodes": -0.2,
    "required_fields": -0.05,
    "wants_json": 0.0,
    "wants_tools": 0.0,
    "parallel": -0.3,
}


def _schemas_of(constraint: Constraint) -> list[dict[str, Any]]:
    if isinstance(constraint, JsonSchema):
        return [constraint.schema] if isinstance(constraint.schema, dict) else []
    if isinstance(constraint, ToolCalls):
        out = [t.parameters for t in constraint.tools]
        if constraint.final is not None:
            out.extend(_schemas_of(constraint.final))
        return out
    return []


def _text_of(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def features_of(req: GenerationRequest) -> dict[str, float]:
    """Cheap, model-free features of a request (what is known before generating)."""
    schemas = _schemas_of(req.constraint)
    nodes = sum(sum(1 for _ in iter_subschemas(s)) for s in schemas)
    required = sum(
        len(sub.get("required", [])) for s in schemas for _, sub in iter_subschemas(s)
    )
    tool_params = sum(
        len((t.get("function", {}).get("parameters") or {}).get("properties", {}))
        for t in req.tools
    )
    chars = sum(len(_text_of(m)) for m in req.messages) + sum(len(json.dumps(t)) for t in req.tools)
    constraint = req.constraint
    return {
        "bias": 1.0,
        "log_prompt_chars": math.log1p(chars),
        "messages": float(len(req.messages)),
        "tools": float(len(req.tools)),
        "tool_params": float(tool_params),
        "schema_nodes": math.log1p(nodes),
        "required_fields": float(required),
        "wants_json": float(isinstance(constraint, JsonObject | JsonSchema)),
        "wants_tools": float(isinstance(constraint, ToolCalls)),
        "parallel": float(isinstance(constraint, ToolCalls) and constraint.parallel),
    }


@dataclass(frozen=True, slots=True)
class PreRouter:
    """P(small model succeeds | features) = sigmoid(w · x); route small when >= threshold."""

    weights: dict[str, float] = field(default_factory=lambda: dict(PRIOR_WEIGHTS))
    threshold: float = 0.5
    trained_on: int = 0  # labelled rows behind the weights (0: the prior)

    def score(self, features: dict[str, float]) -> float:
        z = sum(self.weights.get(k, 0.0) * v for k, v in features.items())
        return 1.0 / (1.0 + math.exp(-max(min(z, 50.0), -50.0)))

    def small_is_enough(self, req: GenerationRequest) -> tuple[bool, float]:
        p = self.score(features_of(req))
        return p >= self.threshold, p

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> PreRouter:
        data = json.loads(Path(path).read_text())
        return cls(dict(data["weights"]), float(data["threshold"]), int(data.get("trained_on", 0)))


def fit(
    rows: Sequence[tuple[dict[str, float], bool]],
    *,
    l2: float = 1.0,
    steps: int = 500,
    learning_rate: float = 0.5,
) -> dict[str, float]:
    """Logistic regression (L2, full-batch gradient descent on standardised features)."""
    if not rows:
        raise ValueError("no labelled rows to fit the pre-router on")
    names = [f for f in FEATURES if f != "bias"]
    x = np.array([[r.get(f, 0.0) for f in names] for r, _ in rows], dtype=np.float64)
    y = np.array([1.0 if ok else 0.0 for _, ok in rows])
    mean, std = x.mean(axis=0), x.std(axis=0)
    std[std == 0] = 1.0
    z = (x - mean) / std
    w, b = np.zeros(len(names)), 0.0
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-(z @ w + b)))
        grad_w = z.T @ (p - y) / len(y) + l2 * w / len(y)
        grad_b = float(np.mean(p - y))
        w -= learning_rate * grad_w
        b -= learning_rate * grad_b
    raw = w / std  # back to the unstandardised features
    weights = {n: float(v) for n, v in zip(names, raw, strict=True)}
    weights["bias"] = float(b - np.sum(w * mean / std))
    return weights
