"""Pick the next token from one row of logits: grammar mask, confidence facts, sampling.

Pure tensor functions (no model, no grammar object) so they are tested on toy logits.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import xgrammar as xgr

from decoding.types import SamplingParams
from schemas.errors import UnsatisfiableSchemaError


@dataclass(frozen=True, slots=True)
class Pick:
    token_id: int
    logprob: float
    entropy: float
    allowed_mass: float
    forced: bool
    top: tuple[tuple[int, float], ...]  # (token id, logprob) of the most likely allowed tokens


def mask_logits(logits: torch.Tensor, bitmask: torch.Tensor | None) -> torch.Tensor:
    """``logits`` ([vocab], float32) with grammar-forbidden tokens at -inf; a copy when masked,
    the same tensor when there is no grammar (callers never modify it in place)."""
    if bitmask is None:
        return logits
    masked = logits.clone()
    xgr.apply_token_bitmask_inplace(masked.unsqueeze(0), bitmask)
    return masked


def pick_token(
    logits: torch.Tensor,
    bitmask: torch.Tensor | None,
    params: SamplingParams,
    generator: torch.Generator | None,
    n_top: int = 0,
    choose: Callable[[torch.Tensor], int] | None = None,
) -> Pick:
    """Choose a token and describe the distribution it came from.

    ``logprob``/``entropy``/``top`` use the model's distribution over grammar-allowed tokens
    (renormalised, temperature 1); ``allowed_mass`` is the raw probability mass on those tokens.
    The choice itself applies temperature, top-k and top-p (argmax when greedy); ``choose``
    (given the masked logits) replaces the multinomial draw when sampling, so speculative
    verification draws from the same distribution with its own randomness.
    """
    logits = logits.float()
    masked = mask_logits(logits, bitmask)
    # Without a grammar every token is allowed (a model's logits are finite): the allowed set
    # is only computed when a mask made some of them -inf.
    allowed = torch.isfinite(masked) if bitmask is not None else None
    n_allowed = int(allowed.sum()) if allowed is not None else masked.numel()
    if n_allowed == 0:
        raise UnsatisfiableSchemaError(
            "the grammar allows no next token: the schema cannot be satisfied from here",
            param="response_format",
        )
    norm = torch.logsumexp(masked, dim=-1)
    logprobs = masked - norm
    allowed_mass = 1.0 if bitmask is None else math.exp(float(norm - torch.logsumexp(logits, -1)))
    probs = logprobs.exp()
    if allowed is None:
        entropy = float(-(probs * logprobs).sum())
    else:
        entropy = float(-(probs[allowed] * logprobs[allowed]).sum())

    if params.greedy or n_allowed == 1:
        token = int(torch.argmax(masked))
    else:
        token = choose(masked) if choose else sample(masked, params, generator)
    top: tuple[tuple[int, float], ...] = ()
    if n_top:
        k = min(n_top, n_allowed)
        values, ids = torch.topk(logprobs, k)
        top = tuple(zip(ids.tolist(), values.tolist(), strict=True))
    return Pick(
        token_id=token,
        logprob=float(logprobs[token]),
        entropy=max(entropy, 0.0),
        allowed_mass=min(allowed_mass, 1.0),
        forced=n_allowed == 1,
        top=top,
    )


def sample(masked: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Temperature, then top-k, then top-p (nucleus), then one multinomial draw."""
    return int(torch.multinomial(sampling_probs(masked, params), 1, generator=generator))


def sampling_probs(masked: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution sampling draws from: temperature, then top-k, then top-p (nucleus)."""
    scores = masked / params.temperature
    if params.top_k > 0 and params.top_k < scores.numel():
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, -math.inf)
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        cumulative = torch.softmax(sorted_scores, -1).cumsum(-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        drop = cumulative - torch.softmax(sorted_scores, -1) >= params.top_p
        scores = scores.scatter(0, order[drop], -math.inf)
    return torch.softmax(scores, -1)
