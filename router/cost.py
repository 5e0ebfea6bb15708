"""Cost model: dollars for an attempt, and what the same request would cost on another tier.

Prices live on each backend's ``BackendInfo``. Hosted models are priced per token from
LiteLLM's cost map; OpenAI-compatible servers per token from the config. Embedded models are
priced per token when the config sets a price, else by compute: the worker seconds an attempt
used x the backend's price per hour of compute (defaults in ``decoding.models``). Cost per
successful task (CPS) is computed by the ledger from these.
"""

from __future__ import annotations

from decoding.backend import BackendInfo


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


def counterfactual_cost(
    top: BackendInfo,
    prompt_tokens: int,
    completion_tokens: int,
    top_answer_cost: float | None = None,
) -> float | None:
    """The same request priced at the route's top tier: the honest baseline for savings.

    Per-token prices price the answered tier's tokens (token counts differ between tokenizers;
    they are the best estimate). A compute-priced top tier has no price for tokens it did not
    decode, so the counterfactual is known only when the top tier answered the request itself
    (``top_answer_cost``, the cost of that attempt), else None (unknown)."""
    if compute_priced(top):
        return top_answer_cost
    return attempt_cost(top, prompt_tokens, completion_tokens)


def cost_per_success(total_cost: float, successes: int) -> float | None:
    """CPS: total spend over successful tasks (failures still cost money); None with no success."""
    return total_cost / successes if successes else None
