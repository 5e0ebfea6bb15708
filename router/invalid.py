"""What happens to an output that breaks its schema: resample, escalate, refuse or flag.

The grammar enforces what it can (``decoding.grammar``); keywords it cannot enforce are checked
after generation. An invalid output is never returned as a silent 200 where validity was
promised:

* on a cascade's earlier tier it escalates (``router.tier_loop``), as before;
* on the last tier it is sampled again, at most ``max_resamples`` times, with a new seed and a
  temperature of at least ``RESAMPLE_TEMPERATURE`` (a greedy retry would repeat it), and a
  resample that repeats a failed output counts as failed without being returned;
* if every sample fails, ``on_invalid`` decides: ``flag`` returns it with ``valid: false``,
  ``error`` fails the request with 502 ``invalid_output``, ``escalate`` tries the route's next
  tier (then fails like ``error`` when there is none).

The default is ``error`` for requests that asked for ``strict: true`` (what users of OpenAI's
strict mode expect) and ``flag`` otherwise. An output cut at ``max_tokens`` is not resampled or
refused: like OpenAI, it is returned with ``finish_reason: "length"``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

from decoding.constraint import Constraint, JsonObject, JsonSchema, ToolCalls
from decoding.types import GenerationRequest
from schemas.errors import InvalidRequestError

OnInvalid = Literal["flag", "error", "escalate"]
ON_INVALID: tuple[OnInvalid, ...] = ("flag", "error", "escalate")
RESAMPLE_TEMPERATURE = 0.7
DEFAULT_MAX_RESAMPLES = 2
MAX_RESAMPLES = 8  # each resample is a whole generation: bounded per request


def parse_on_invalid(value: object, param: str = "on_invalid") -> OnInvalid:
    """An ``on_invalid`` setting, or a 400 naming the allowed values."""
    if value not in ON_INVALID:
        raise InvalidRequestError(
            f"on_invalid must be one of {', '.join(ON_INVALID)}; got {value!r}", param=param
        )
    return value


def constrained(constraint: Constraint) -> bool:
    """Whether outputs are checked against a schema (JSON or tool calls)."""
    return isinstance(constraint, JsonObject | JsonSchema | ToolCalls)


def promised_strict(constraint: Constraint) -> bool:
    """Whether the request asked for OpenAI's strict mode (a strict schema or strict tool)."""
    if isinstance(constraint, JsonSchema):
        return constraint.strict
    if isinstance(constraint, ToolCalls):
        final = constraint.final
        return any(t.strict for t in constraint.tools) or (
            isinstance(final, JsonSchema) and final.strict
        )
    return False


def invalid_policy(constraint: Constraint, request: OnInvalid | None,
                   route: OnInvalid | None) -> OnInvalid:  # fmt: skip
    """The request's setting, else the route's, else ``error`` for strict requests and
    ``flag`` for the rest."""
    if request is not None:
        return request
    if route is not None:
        return route
    return "error" if promised_strict(constraint) else "flag"


def resample_request(req: GenerationRequest, attempt: int) -> GenerationRequest:
    """``req`` for its ``attempt``-th resample (1, 2, …): another seed, and sampling warm enough
    to leave the output that failed."""
    params = req.params
    base = params.seed if params.seed is not None else int.from_bytes(
        req.request_id.encode()[-8:] or b"\0", "big"
    )
    resampled = replace(
        params,
        seed=(base + 7919 * attempt) % 2**63,
        temperature=max(params.temperature, RESAMPLE_TEMPERATURE),
    )
    return replace(req, params=resampled)
