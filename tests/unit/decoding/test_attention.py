"""Grouped attention equals transformers' SDPA attention on the same inputs (random tensors)."""

from __future__ import annotations

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from decoding.attention import grouped_sdpa
from kernels.tree_mask import additive_mask, tree_mask_reference


class Attention(torch.nn.Module):
    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


def tensors(heads: int, kv_heads: int, q: int, kv: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(q * 100 + kv)
    query = torch.randn(1, heads, q, 16, generator=gen)
    key = torch.randn(1, kv_heads, kv, 16, generator=gen)
    value = torch.randn(1, kv_heads, kv, 16, generator=gen)
    return query, key, value


@pytest.mark.parametrize(("heads", "kv_heads"), [(9, 3), (14, 2), (4, 4)])
@pytest.mark.parametrize("parents", [[-1, 0, 1, 2], [-1, 0, 0, -1, 3, 1]], ids=["chain", "tree"])
@pytest.mark.parametrize("dtype", ["bool", "additive"])
def test_grouped_equals_sdpa(heads: int, kv_heads: int, parents: list[int], dtype: str) -> None:
    past, pending = 37, 2
    mask, _ = tree_mask_reference(parents, past, pending)
    attn_mask = mask[None, None] if dtype == "bool" else additive_mask(mask, torch.float32)
    q = pending + len(parents)
    query, key, value = tensors(heads, kv_heads, q, past + q)
    module = Attention(heads // kv_heads)
    expected, _ = sdpa_attention_forward(module, query, key, value, attn_mask, scaling=0.25)
    got, _ = grouped_sdpa(module, query, key, value, attn_mask, scaling=0.25)
    assert got.shape == expected.shape == (1, q, heads, 16)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_one_token_and_unmasked_passes_take_the_sdpa_path() -> None:
    module = Attention(3)
    for q, mask in ((1, None), (5, None)):
        query, key, value = tensors(9, 3, q, q)
        expected, _ = sdpa_attention_forward(module, query, key, value, mask)
        got, _ = grouped_sdpa(module, query, key, value, mask)
        assert torch.equal(got, expected)
