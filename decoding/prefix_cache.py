"""Prompt KV reuse across requests: agent turns re-send the same system prompt, tools and history.

A tau-bench turn carries a 4-7k-token prompt, of which all but the last few hundred tokens were
in the previous turn's prompt; prefilling it costs ~20 s on a 2-core CPU (SmolLM2-135M, float32)
against ~10 s to decode the turn. The engine therefore prefills prompts in blocks of ``block``
tokens aligned to absolute positions, and this cache keeps the key/value rows of the whole
blocks of recent prompts. A new prompt that shares whole blocks with a stored one starts from a
copy of their rows and prefills only the rest.

Exactness: a block's rows depend only on the tokens up to its end, and every prompt is cut into
the same aligned blocks whether or not it hits, so a hit yields the very tensors a miss would
compute (the same shapes run the same kernels). Greedy output is therefore identical with and
without the cache, which the tests check.

Memory: one stored token costs ``2 * layers * kv_heads * head_dim * bytes`` (46 KB for
SmolLM2-135M in float32); ``max_tokens`` bounds the rows held, least recently used first out.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

__all__ = ["PrefixCache", "PrefixCacheStats", "common_prefix"]

Rows = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [1, heads, n, dim]


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences.

    >>> common_prefix([1, 2, 3, 4], [1, 2, 5])
    2
    """
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@dataclass(slots=True)
class PrefixCacheStats:
    """Counts since the engine started (reported by benchmarks)."""

    lookups: int = 0
    hits: int = 0
    tokens_reused: int = 0
    tokens_stored: int = 0
    evictions: int = 0


class PrefixCache:
    """LRU of prompt prefixes (whole ``block``-token blocks) and their key/value rows.

    Thread-safe: the gateway's worker thread and direct ``generate_sync`` callers may decode at
    the same time; each lookup hands out a copy, so requests never share a cache's tensors.

    Raises
    ------
    ValueError
        If ``block`` < 1 or ``max_tokens`` < 0.
    """

    def __init__(self, block: int = 256, max_tokens: int = 32768) -> None:
        if block < 1:
            raise ValueError(f"block must be >= 1, got {block}")
        if max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
        self.block = block
        self.max_tokens = max_tokens
        self.stats = PrefixCacheStats()
        self._entries: OrderedDict[tuple[int, ...], Rows] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def tokens(self) -> int:
        """Token rows held now."""
        return sum(len(key) for key in self._entries)

    def reusable(self, prompt_ids: Sequence[int]) -> int:
        """Whole-block positions of ``prompt_ids`` that a hit may cover: at least one prompt
        token is always left to feed, since the first pass needs the last token's logits."""
        return (max(len(prompt_ids) - 1, 0) // self.block) * self.block

    def lookup(self, prompt_ids: Sequence[int]) -> tuple[int, DynamicCache]:
        """``(reused, cache)``: a fresh cache holding the rows of the longest stored run of
        whole blocks that ``prompt_ids`` starts with (``reused`` positions, possibly 0)."""
        cache = DynamicCache()
        limit = self.reusable(prompt_ids)
        with self._lock:
            self.stats.lookups += 1
            best_key: tuple[int, ...] | None = None
            best = 0
            for key in self._entries:
                shared = common_prefix(key, prompt_ids[: len(key)])
                reused = min((shared // self.block) * self.block, limit)
                if reused > best:
                    best_key, best = key, reused
            if best_key is None:
                return 0, cache
            self._entries.move_to_end(best_key)
            rows = self._entries[best_key]
            self.stats.hits += 1
            self.stats.tokens_reused += best
            for layer, (keys, values) in enumerate(rows):
                # The first update concatenates onto an empty layer: the cache gets a copy.
                cache.update(keys[..., :best, :], values[..., :best, :], layer)
        return best, cache

    def store(self, prompt_ids: Sequence[int], cache: DynamicCache) -> None:
        """Keep the rows of ``prompt_ids``' whole blocks that ``cache`` holds (copied).

        A stored prefix of the new key is replaced by it; a key already covered by a stored
        one only refreshes that entry's recency."""
        length = min(cache.get_seq_length(), len(prompt_ids))
        length = (length // self.block) * self.block
        if length == 0 or length > self.max_tokens:
            return
        key = tuple(prompt_ids[:length])
        with self._lock:
            for stored in list(self._entries):
                if len(stored) >= length and stored[:length] == key:
                    self._entries.move_to_end(stored)
                    return
                if len(stored) < length and key[: len(stored)] == stored:
                    del self._entries[stored]
        rows = _copy_rows(cache, length)
        with self._lock:
            self._entries[key] = rows
            self.stats.tokens_stored += length
            while self.tokens > self.max_tokens:
                self._entries.popitem(last=False)
                self.stats.evictions += 1

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


def _copy_rows(cache: DynamicCache, length: int) -> Rows:
    rows: Rows = []
    for layer in cache.layers:
        if not isinstance(layer, DynamicLayer) or layer.keys is None or layer.values is None:
            raise TypeError(f"cannot copy rows of a {type(layer).__name__}")
        rows.append((layer.keys[..., :length, :].clone(), layer.values[..., :length, :].clone()))
    return rows
