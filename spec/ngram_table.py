"""An n-gram table of next-token distributions, the memory behind STAND.

Plain n-gram drafters remember which token followed a context. STAND (Song et al. 2025)
remembers the target model's *distribution* there (its top-k probabilities as seen during
verification), averaged over every time the context was seen: a draft can then branch into
the runner-up tokens too, and its scores estimate the model's own probabilities. Plain token
sequences (prompts, or outputs without logits) count as one-hot observations; a one-hot draw of
the sampled token has the model's distribution as its expectation, so both kinds of evidence
can share one running average.

Contexts of length ``0..max_n - 1`` are kept (n-grams of order 1..``max_n``); lookups back off
from the longest context that has been seen. Each context stores at most ``max_stored`` tokens,
the way the paper keeps only the top-k logits to bound memory.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["NGramTable", "Stats", "context_key", "lookup_stats"]


def context_key(context_ids: Sequence[int], width: int) -> tuple[int, ...]:
    """The last ``width`` tokens of a context (all of them if it is shorter), as a table key."""
    return tuple(context_ids[max(0, len(context_ids) - width) :])


class Stats:
    """Observations at one context: how many, and the summed probability per token."""

    __slots__ = ("sums", "weight")

    def __init__(self) -> None:
        self.weight = 0
        self.sums: dict[int, float] = {}

    def probs(self) -> dict[int, float]:
        """The running average: each token's summed probability over the observation count."""
        return {token: total / self.weight for token, total in self.sums.items()}


class NGramTable:
    """Running-average next-token distributions for contexts of up to ``max_n - 1`` tokens.

    Parameters
    ----------
    max_n:
        Longest n-gram order (context length + 1).
    max_stored:
        Tokens kept per context; the table prunes to the most probable ones.
    max_contexts:
        Contexts kept before the least recently updated are dropped; None = no bound.

    Raises
    ------
    ValueError
        On out-of-range settings.

    Examples
    --------
    >>> table = NGramTable(max_n=3)
    >>> table.observe_tokens([5, 6, 7, 5, 6, 8])
    >>> table.lookup([1, 5, 6])  # context [5, 6] seen twice: 7 once, 8 once
    (2, {7: 0.5, 8: 0.5})
    >>> table.observe([5, 6], [7, 8], [0.9, 0.1])  # the model's own distribution after [5, 6]
    >>> order, probs = table.lookup([5, 6])
    >>> order, {token: round(p, 3) for token, p in probs.items()}
    (2, {7: 0.633, 8: 0.367})
    >>> table.lookup([9, 6])[0]  # [9, 6] never seen: back off to [6]
    1
    """

    def __init__(
        self, max_n: int = 4, max_stored: int = 8, max_contexts: int | None = None
    ) -> None:
        if max_n < 1:
            raise ValueError(f"max_n must be >= 1, got {max_n}")
        if max_stored < 1:
            raise ValueError(f"max_stored must be >= 1, got {max_stored}")
        if max_contexts is not None and max_contexts < 1:
            raise ValueError(f"max_contexts must be >= 1 or None, got {max_contexts}")
        self.max_n = max_n
        self.max_stored = max_stored
        self.max_contexts = max_contexts
        self._stats: dict[tuple[int, ...], Stats] = {}

    def __len__(self) -> int:
        """Number of contexts stored."""
        return len(self._stats)

    def stats(self, context: Sequence[int]) -> Stats | None:
        """The observations at exactly ``context`` (no back-off), or None."""
        return self._stats.get(tuple(context))

    def observe(
        self, context_ids: Sequence[int], topk_ids: Sequence[int], topk_probs: Sequence[float]
    ) -> None:
        """Record the target model's top-k distribution for the token after ``context_ids``.

        Raises
        ------
        ValueError
            If ids and probabilities differ in length, repeat a token, or the probabilities
            are not a (partial) distribution.
        """
        if len(topk_ids) != len(topk_probs):
            raise ValueError(f"{len(topk_ids)} topk_ids but {len(topk_probs)} topk_probs")
        if len(set(topk_ids)) != len(topk_ids):
            raise ValueError(f"topk_ids repeat a token: {list(topk_ids)}")
        if not all(math.isfinite(p) and p >= 0.0 for p in topk_probs) or sum(topk_probs) > 1.0001:
            raise ValueError(f"topk_probs must be probabilities summing to <= 1: {topk_probs}")
        self._record(context_ids, list(zip(topk_ids, topk_probs, strict=True)))

    def observe_tokens(self, token_ids: Sequence[int]) -> None:
        """Record each token as a one-hot observation after the tokens before it."""
        width = self.max_n - 1
        for i, token in enumerate(token_ids):
            self._record(token_ids[max(0, i - width) : i], [(token, 1.0)])

    def lookup(self, context_ids: Sequence[int]) -> tuple[int, dict[int, float]] | None:
        """The averaged distribution at the longest known suffix of ``context_ids``.

        Returns ``(context length used, {token: probability})``, or None if the table is empty.
        """
        found = lookup_stats([self], context_ids, self.max_n)
        if found is None:
            return None
        order, weight, sums = found
        return order, {token: total / weight for token, total in sums.items()}

    def _record(self, context_ids: Sequence[int], observed: list[tuple[int, float]]) -> None:
        tail = context_key(context_ids, self.max_n - 1)
        for order in range(len(tail) + 1):
            key = tail[len(tail) - order :]
            stats = self._stats.get(key)
            if stats is None:
                stats = self._stats[key] = Stats()
                if self.max_contexts is not None and len(self._stats) > self.max_contexts:
                    del self._stats[next(iter(self._stats))]
            elif self.max_contexts is not None:
                self._stats[key] = self._stats.pop(key)  # most recently used goes last
            stats.weight += 1
            sums = stats.sums
            for token, prob in observed:
                sums[token] = sums.get(token, 0.0) + prob
            # Prune in batches (at twice the bound) so new tokens get a chance to build up.
            if len(sums) > 2 * self.max_stored:
                kept = sorted(sums.items(), key=lambda item: (-item[1], item[0]))
                stats.sums = dict(kept[: self.max_stored])


def lookup_stats(
    tables: Sequence[NGramTable], context_ids: Sequence[int], max_n: int
) -> tuple[int, int, dict[int, float]] | None:
    """Back off from the longest context: pool the tables that know it.

    Returns ``(context length, observation count, summed probability per token)`` for the
    longest suffix of ``context_ids`` (at most ``max_n - 1`` tokens) that any table has seen,
    pooling the observations of all tables that have seen it, or None if none has any.
    """
    tail = context_key(context_ids, max_n - 1)
    width = len(tail)
    for order in range(width, -1, -1):
        key = tail[width - order :]
        pooled: tuple[int, int, dict[int, float]] | None = None
        for table in tables:
            stats = table._stats.get(key)
            if stats is None or stats.weight == 0:
                continue
            if pooled is None:
                pooled = (order, stats.weight, stats.sums)
            else:
                merged = dict(pooled[2])
                for token, total in stats.sums.items():
                    merged[token] = merged.get(token, 0.0) + total
                pooled = (order, pooled[1] + stats.weight, merged)
        if pooled is not None:
            return pooled
    return None
