"""Cost model: dollars for an attempt, and what the same request would cost on another tier.

Prices live on each backend's ``BackendInfo``. Hosted models are priced per token from
LiteLLM's cost map; OpenAI-compatible servers per token from the config. Embedded models are
priced per token when the config sets a price, else by compute: the worker seconds an attempt
used x the backend's price per hour of compute (defaults in ``decoding.models``). Cost per
successful task (CPS) is computed by the ledger from these.
"""

from __future__ import annotations

from dataclasses import dataclass

from decoding.backend import BackendInfo

# Finished attempts a compute-priced backend must have answered before its per-token rates are
# used to estimate what it would have spent on a request it did not answer.
MIN_RATE_OBSERVATIONS = 8


def compute_priced(info: BackendInfo) -> bool:
    return info.compute_price_per_hour is not None


def attempt_cost(
    info: BackendInfo, prompt_tokens: int, completion_tokens: int, compute_s: float = 0.0
) -> float:
    """What one call to ``info``'s backend cost: its compute seconds at the backend's price
    per hour when compute-priced, else its tokens at the per-token prices."""
    if info.compute_price_per_hour is not None:
        return compute_s * info.compute_price_per_hour / 3600.0
    return (
        prompt_tokens * info.price_in_per_mtok + completion_tokens * info.price_out_per_mtok
    ) / 1e6


@dataclass(slots=True)
class ComputeRate:
    """What one compute-priced backend spends per prompt token and per completion token,
    fitted by non-negative least squares (cost = a x prompt + b x completion) over its finished
    attempts. Running sums only: O(1) memory, whatever the traffic.

    Why: a compute-priced top tier has no list price, so without this the saving on a request
    the small tier kept is unknown and a cascade that pays shows no saving at all. Its own
    measured cost per token, on the same machine and load, is the honest estimate."""

    n: int = 0
    pp: float = 0.0  # sum of prompt^2
    pc: float = 0.0  # sum of prompt x completion
    cc: float = 0.0  # sum of completion^2
    py: float = 0.0  # sum of prompt x cost
    cy: float = 0.0  # sum of completion x cost

    def observe(self, prompt_tokens: int, completion_tokens: int, cost_usd: float) -> None:
        p, c = float(prompt_tokens), float(completion_tokens)
        self.n += 1
        self.pp, self.pc, self.cc = self.pp + p * p, self.pc + p * c, self.cc + c * c
        self.py, self.cy = self.py + p * cost_usd, self.cy + c * cost_usd

    def rates(self) -> tuple[float, float]:
        """(per prompt token, per completion token), both >= 0: the least-squares solution when
        it is non-negative, else the better of the two one-rate fits."""
        det = self.pp * self.cc - self.pc * self.pc
        if det > 1e-9 * max(self.pp * self.cc, 1.0):
            a = (self.py * self.cc - self.cy * self.pc) / det
            b = (self.cy * self.pp - self.py * self.pc) / det
            if a >= 0 and b >= 0:
                return a, b
        # One-rate fits (costs are >= 0, so their rates are too); the residual of each shrinks
        # by (sum x*y)^2 / sum x^2: keep the fit that shrinks it more.
        gain_p = self.py * self.py / self.pp if self.pp > 0 else 0.0
        gain_c = self.cy * self.cy / self.cc if self.cc > 0 else 0.0
        if gain_p >= gain_c:
            return (self.py / self.pp if self.pp > 0 else 0.0), 0.0
        return 0.0, self.cy / self.cc

    def estimate(self, prompt_tokens: int, completion_tokens: int) -> float | None:
        """The estimated cost of a request of these sizes; None before enough observations."""
        if self.n < MIN_RATE_OBSERVATIONS:
            return None
        a, b = self.rates()
        return a * prompt_tokens + b * completion_tokens


def counterfactual_cost(
    top: BackendInfo,
    prompt_tokens: int,
    completion_tokens: int,
    top_answer_cost: float | None = None,
    top_rate: ComputeRate | None = None,
) -> float | None:
    """The same request priced at the route's top tier: the honest baseline for savings.

    Per-token prices price the answered tier's tokens (token counts differ between tokenizers;
    they are the best estimate). A compute-priced top tier has no price for tokens it did not
    decode: the counterfactual is that attempt's cost when the top tier answered the request
    itself (``top_answer_cost``), else an estimate from the top tier's own measured cost per
    token (``top_rate``), else None (unknown)."""
    if compute_priced(top):
        if top_answer_cost is not None:
            return top_answer_cost
        return None if top_rate is None else top_rate.estimate(prompt_tokens, completion_tokens)
    return attempt_cost(top, prompt_tokens, completion_tokens)


def cost_per_success(total_cost: float, successes: int) -> float | None:
    """CPS: total spend over successful tasks (failures still cost money); None with no success."""
    return total_cost / successes if successes else None
