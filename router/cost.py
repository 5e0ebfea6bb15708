"""Cost model: dollars for an attempt, and what the same tokens would cost on another tier.

Prices live on each backend's ``BackendInfo`` ($ per 1M tokens): hosted models take them from
LiteLLM's cost map, embedded and self-hosted models from the config (defaults in
``decoding.models``). Cost per successful task (CPS) is computed by the ledger from these.
"""

from __future__ import annotations

from decoding.backend import BackendInfo


def attempt_cost(info: BackendInfo, prompt_tokens: int, completion_tokens: int) -> float:
    """What one call to ``info``'s backend cost."""
    return (
        prompt_tokens * info.price_in_per_mtok + completion_tokens * info.price_out_per_mtok
    ) / 1e6


def counterfactual_cost(top: BackendInfo, prompt_tokens: int, completion_tokens: int) -> float:
    """The same request's tokens priced at the route's top tier: the honest baseline for savings
    (token counts differ between tokenizers; the answered tier's counts are the best estimate)."""
    return attempt_cost(top, prompt_tokens, completion_tokens)


def cost_per_success(total_cost: float, successes: int) -> float | None:
    """CPS: total spend over successful tasks (failures still cost money); None with no success."""
    return total_cost / successes if successes else None
