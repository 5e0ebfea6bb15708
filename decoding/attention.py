"""Grouped-query attention for multi-token passes without copying the KV cache per head.

The embedded models use grouped-query attention (SmolLM2-135M: 9 query heads over 3 KV heads;
Qwen2.5-0.5B: 14 over 2). For a one-token pass transformers' SDPA path folds the query heads
of a group into one KV head's rows; for a pass over several tokens with a mask (prefill blocks
after the first, every speculative verification pass) it expands the whole cache to one copy
per query head first. At a 5k-token context that copy was 39% of a 16-token pass on this CPU
(SmolLM2, float32), and it is why a k-token pass cost far more than a one-token pass.

``grouped_sdpa`` generalises the fold to ``k`` tokens: the ``g`` query heads of a group become
``g * k`` query rows of that group's KV head, and the mask rows are repeated to match. Each
query row still attends to the same keys under the same mask, so the result is the same
attention; only the work is laid out differently.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

__all__ = ["ATTENTION", "grouped_sdpa"]

ATTENTION = "slmgate_grouped_sdpa"


def grouped_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, with query heads folded onto their KV heads for masked
    multi-token passes (``query`` ``[b, heads, q, d]``, ``key``/``value`` ``[b, kv_heads,
    kv, d]``, ``attention_mask`` ``[b | 1, 1, q, kv]``; returns ``[b, q, heads, d]``)."""
    paged = kwargs.get("paged")
    if paged is not None:  # a batched pass (decoding.paged): the rows live in the pool
        from decoding.paged import paged_attention

        return paged_attention(module, query, key, value, paged, scaling), None
    groups = int(getattr(module, "num_key_value_groups", 1))
    batch, heads, q_len, dim = query.shape
    foldable = (
        groups > 1
        and q_len > 1
        and attention_mask is not None
        and attention_mask.dim() == 4
        and attention_mask.shape[1] == 1
        and kwargs.get("position_bias") is None
        and kwargs.get("softcap") is None
        and not kwargs.get("output_attentions", False)
    )
    if not foldable or attention_mask is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs
        )
    kv_heads = heads // groups
    kv_len = key.shape[2]
    mask = attention_mask[..., :kv_len]
    mask_batch = mask.shape[0]
    folded_query = query.reshape(batch, kv_heads, groups * q_len, dim)
    folded_mask = (
        mask[:, :, None].expand(mask_batch, 1, groups, q_len, kv_len)
        .reshape(mask_batch, 1, groups * q_len, kv_len)
    )  # fmt: skip
    out = torch.nn.functional.scaled_dot_product_attention(
        folded_query, key, value, attn_mask=folded_mask, dropout_p=dropout, scale=scaling
    )
    return out.reshape(batch, heads, q_len, dim).transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION, grouped_sdpa)
# The model builds its masks by the attention's name: the same masks as SDPA's.
AttentionMaskInterface.register(ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
