"""PrefixCache on literal caches: block-aligned reuse, copies, replacement and LRU eviction."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from decoding.prefix_cache import PrefixCache, common_prefix


def cache_of(tokens: list[int], layers: int = 2) -> DynamicCache:
    """A cache whose row ``i`` holds ``tokens[i]`` (keys) and ``-tokens[i]`` (values)."""
    cache = DynamicCache()
    rows = torch.tensor(tokens, dtype=torch.float32)[None, None, :, None].expand(1, 2, -1, 4)
    for layer in range(layers):
        cache.update(rows.clone(), -rows.clone(), layer)
    return cache


def rows_of(cache: DynamicCache) -> list[int]:
    return [int(v) for v in cache.layers[0].keys[0, 0, :, 0]]  # type: ignore[index]


def test_common_prefix() -> None:
    assert common_prefix([], [1]) == 0
    assert common_prefix([1, 2], [1, 2]) == 2
    assert common_prefix([1, 2, 3], [1, 9, 3]) == 1


def test_miss_gives_an_empty_cache() -> None:
    prefix = PrefixCache(block=4)
    reused, cache = prefix.lookup(list(range(10)))
    assert (reused, cache.get_seq_length()) == (0, 0)
    assert prefix.stats.lookups == 1
    assert prefix.stats.hits == 0


def test_hit_reuses_whole_shared_blocks_only() -> None:
    prefix = PrefixCache(block=4)
    stored = list(range(100, 111))  # 11 tokens: 2 whole blocks stored
    prefix.store(stored, cache_of(stored))
    assert prefix.tokens == 8
    # Shares 10 tokens, so 2 whole blocks (8 positions).
    reused, cache = prefix.lookup([*stored[:10], 7, 7, 7])
    assert reused == 8
    assert rows_of(cache) == stored[:8]
    assert [int(v) for v in cache.layers[1].values[0, 1, :, 3]] == [-t for t in stored[:8]]  # type: ignore[index]
    # Shares 6 tokens: 1 block.
    assert prefix.lookup([*stored[:6], 0, 0, 0, 0])[0] == 4
    assert prefix.stats.hits == 2
    assert prefix.stats.tokens_reused == 12


def test_at_least_one_prompt_token_is_left_to_feed() -> None:
    prefix = PrefixCache(block=4)
    prompt = list(range(8))
    prefix.store(prompt, cache_of(prompt))
    assert prefix.lookup(prompt)[0] == 4  # 8 stored, but the 8th token must be fed
    assert prefix.lookup([*prompt, 9])[0] == 8


def test_lookup_hands_out_copies() -> None:
    prefix = PrefixCache(block=2)
    prompt = [1, 2, 3, 4, 5]
    prefix.store(prompt, cache_of(prompt))
    _, first = prefix.lookup(prompt)
    first.layers[0].keys.zero_()  # type: ignore[union-attr]
    _, second = prefix.lookup(prompt)
    assert rows_of(second) == [1, 2, 3, 4]


def test_a_longer_prompt_replaces_its_stored_prefix_and_a_covered_one_is_not_stored() -> None:
    prefix = PrefixCache(block=2)
    prefix.store([1, 2, 3, 4], cache_of([1, 2, 3, 4]))
    prefix.store([1, 2, 3, 4, 5, 6], cache_of([1, 2, 3, 4, 5, 6]))
    assert prefix.tokens == 6  # the 4-token entry was dropped
    prefix.store([1, 2, 3, 4, 5], cache_of([1, 2, 3, 4, 5]))  # covered
    assert prefix.tokens == 6
    assert prefix.stats.tokens_stored == 10


def test_least_recently_used_prompts_are_evicted_past_the_budget() -> None:
    prefix = PrefixCache(block=2, max_tokens=8)
    a, b, c = [1] * 4, [2] * 4, [3] * 4
    prefix.store(a, cache_of(a))
    prefix.store(b, cache_of(b))
    assert prefix.lookup([*a, 0])[0] == 4  # a is now more recent than b
    prefix.store(c, cache_of(c))
    assert prefix.tokens == 8
    assert prefix.stats.evictions == 1
    assert prefix.lookup([*b, 0])[0] == 0
    assert prefix.lookup([*a, 0])[0] == 4
    too_long = list(range(10))
    prefix.store(too_long, cache_of(too_long))
    assert prefix.lookup([*too_long, 0])[0] == 0


def test_bad_settings_raise() -> None:
    with pytest.raises(ValueError, match="block"):
        PrefixCache(block=0)
    with pytest.raises(ValueError, match="max_tokens"):
        PrefixCache(max_tokens=-1)
