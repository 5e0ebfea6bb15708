"""STAND: model-free drafting from remembered next-token distributions (Song et al. 2025).

"Accelerated Test-Time Scaling with Model-Free Speculative Sampling". Instead of the single
token that followed a context before, an n-gram table (:mod:`spec.ngram_table`) remembers the
target model's distribution there, so a draft can be a tree that also covers the runner-up
tokens. Children are picked with Gumbel-top-k: with a sampling temperature the branches are
distinct samples from the remembered distribution (what a sampling target is likely to produce);
at temperature 0 it is the deterministic top-k, matching greedy verification. The tree is grown
best-first by estimated acceptance (the product of remembered probabilities along the path)
until the token budget is spent or the estimate falls below ``min_token_prob``.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np

from spec._requests import ActiveRequests
from spec.draft import Draft
from spec.ngram_table import NGramTable, context_key, lookup_stats

__all__ = ["StandConfig", "StandDrafter", "draft_tree", "gumbel_top_k"]


@dataclass(frozen=True, slots=True)
class StandConfig:
    """Settings of :class:`StandDrafter`.

    Parameters
    ----------
    max_n:
        Longest n-gram order; lookups back off from ``max_n - 1`` context tokens to none.
    max_stored:
        Tokens remembered per context (the top-k kept from each distribution).
    branching:
        Children drafted per node, by depth (the last entry repeats for deeper nodes). Wide at
        the root, where the remembered distribution is best informed, narrow further down.
    min_token_prob:
        Nodes whose estimated acceptance probability is below this are not drafted.
    max_tree_nodes:
        Upper bound on draft nodes (``k`` bounds them too).
    max_global_contexts:
        Contexts in the shared table before the least recently updated are dropped.

    Raises
    ------
    ValueError
        On out-of-range values.
    """

    max_n: int = 4
    max_stored: int = 8
    branching: tuple[int, ...] = (2, 2, 1)
    min_token_prob: float = 0.1
    max_tree_nodes: int = 64
    max_global_contexts: int | None = 1_000_000

    def __post_init__(self) -> None:
        if self.max_n < 1:
            raise ValueError(f"max_n must be >= 1, got {self.max_n}")
        if self.max_stored < 1:
            raise ValueError(f"max_stored must be >= 1, got {self.max_stored}")
        if not self.branching or min(self.branching) < 1:
            raise ValueError(f"branching must be a non-empty tuple of ints >= 1: {self.branching}")
        if not 0.0 <= self.min_token_prob <= 1.0:
            raise ValueError(f"min_token_prob must be in [0, 1], got {self.min_token_prob}")
        if self.max_tree_nodes < 1:
            raise ValueError(f"max_tree_nodes must be >= 1, got {self.max_tree_nodes}")
        if self.max_global_contexts is not None and self.max_global_contexts < 1:
            raise ValueError(f"max_global_contexts must be >= 1, got {self.max_global_contexts}")


def gumbel_top_k(
    probs: Sequence[float],
    k: int,
    rng: np.random.Generator | None = None,
    temperature: float = 0.0,
) -> list[int]:
    """Indices of ``k`` distinct draws from ``probs`` tempered by ``temperature``, best first.

    Adding independent Gumbel noise to ``log(p) / temperature`` and keeping the ``k`` largest
    keys samples ``k`` items without replacement from ``softmax(log(p) / temperature)``
    (Kool et al. 2019), in one vectorised step. Temperature 0 is the deterministic top-k
    (ties to the lower index); zero-probability items are never drawn.

    Raises
    ------
    ValueError
        If ``temperature`` is negative, or positive without an ``rng``.

    Examples
    --------
    >>> gumbel_top_k([0.1, 0.6, 0.3], 2)
    [1, 2]
    >>> a = gumbel_top_k([0.1, 0.6, 0.3], 2, np.random.default_rng(0), temperature=1.0)
    >>> a == gumbel_top_k([0.1, 0.6, 0.3], 2, np.random.default_rng(0), temperature=1.0)
    True
    """
    if temperature < 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    candidates = [i for i, p in enumerate(probs) if p > 0]
    if temperature == 0:
        candidates.sort(key=lambda i: -probs[i])  # stable: lower index first on ties
        return candidates[:k]
    if rng is None:
        raise ValueError("temperature > 0 needs an rng (np.random.Generator) to sample")
    logits = np.log(np.array([probs[i] for i in candidates])) / temperature
    keys = logits + rng.gumbel(size=len(candidates))
    best = np.argsort(-keys, kind="stable")[:k]
    return [candidates[int(i)] for i in best]


def _rank(item: tuple[int, float]) -> tuple[float, int]:
    """Most probable first, then the smaller token id: the order of greedy top-k."""
    return -item[1], item[0]


def draft_tree(
    tables: Sequence[NGramTable],
    context_ids: Sequence[int],
    k: int,
    config: StandConfig,
    rng: np.random.Generator | None = None,
    temperature: float = 0.0,
) -> Draft:
    """Draft a tree of up to ``k`` tokens after ``context_ids`` from n-gram tables.

    Each node's children come from the pooled distribution at the longest known suffix of
    its context (the context plus the drafted path), chosen by :func:`gumbel_top_k` with the
    depth's branching factor; the most probable frontier node is added next.

    Examples
    --------
    After ``[1, 2]`` the model gave 3 probability 0.6 and 4 probability 0.35; after
    ``[2, 3]`` it gave 5 probability 0.9.

    >>> table = NGramTable(max_n=3)
    >>> table.observe([1, 2], [3, 4], [0.6, 0.35])
    >>> table.observe([2, 3], [5], [0.9])
    >>> config = StandConfig(max_n=3, branching=(2, 1), min_token_prob=0.3)
    >>> draft = draft_tree([table], [1, 2], k=4, config=config)
    >>> draft.token_ids, draft.parents, [round(s, 2) for s in draft.scores]
    ((3, 5, 4), (-1, 0, -1), [0.6, 0.54, 0.35])

    Both children of the root are kept (branching 2); the path through 3 goes on to 5
    (0.6 * 0.9) before 4, the less likely branch. Contexts ``[3, 5]`` and ``[2, 4]`` were
    never seen, so their lookups back off to the unigram distribution, whose best guess
    (5 at 0.9 / 2) scores under ``min_token_prob`` after either path.

    Raises
    ------
    ValueError
        If ``temperature`` is negative, or positive without an ``rng``.
    """
    if temperature < 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature > 0 and rng is None:
        raise ValueError("temperature > 0 needs an rng (np.random.Generator) to sample")
    budget = min(k, config.max_tree_nodes)
    width = config.max_n - 1
    tokens: list[int] = []
    parents: list[int] = []
    scores: list[float] = []
    # (negated score, insertion order for stable ties, token, parent index, depth, context)
    frontier: list[tuple[float, int, int, int, int, tuple[int, ...]]] = []
    order = 0

    def push_children(context: tuple[int, ...], score: float, index: int, depth: int) -> None:
        nonlocal order
        found = lookup_stats(tables, context, config.max_n)
        if found is None:
            return
        _, weight, sums = found
        branching = config.branching[min(depth, len(config.branching) - 1)]
        if temperature == 0:  # the common greedy case, without building probability lists
            if branching == 1:
                chosen = [min(sums.items(), key=_rank)]
            else:
                chosen = sorted(sums.items(), key=_rank)[:branching]
        else:
            candidates = sorted(sums)  # ascending ids, so ties break towards the smaller id
            probs = [sums[t] / weight for t in candidates]
            picks = gumbel_top_k(probs, branching, rng, temperature)
            chosen = [(candidates[i], sums[candidates[i]]) for i in picks]
        for token, total in chosen:
            child_score = score * min(1.0, total / weight)  # never above the parent
            if child_score >= config.min_token_prob and total > 0:
                child_context = (*context, token)[-width:] if width else ()
                heapq.heappush(frontier, (-child_score, order, token, index, depth, child_context))
                order += 1

    start = context_key(context_ids, width)
    if budget > 0:
        push_children(start, 1.0, -1, 0)
    while frontier and len(tokens) < budget:
        neg_score, _, token, parent, depth, context = heapq.heappop(frontier)
        tokens.append(token)
        parents.append(parent)
        scores.append(-neg_score)
        if len(tokens) < budget:  # the last node's children could not be used
            push_children(context, -neg_score, len(tokens) - 1, depth + 1)
    return Draft(tuple(tokens), tuple(parents), tuple(scores))


@dataclass(slots=True)
class _Request:
    table: NGramTable
    tail: list[int]  # last max_n - 1 tokens of prompt + output: the next token's context
    # Observations made on the output, replayed into the shared table at stop().
    learned: list[tuple[tuple[int, ...], tuple[int, ...], tuple[float, ...]]] = field(
        default_factory=list
    )


class StandDrafter:
    """STAND over a per-request table (prompt and output) and a shared table of past outputs.

    Parameters
    ----------
    config:
        Table sizes and tree shape.
    """

    def __init__(self, config: StandConfig | None = None) -> None:
        self.config = config or StandConfig()
        self.global_table = NGramTable(
            self.config.max_n, self.config.max_stored, self.config.max_global_contexts
        )
        self._requests: ActiveRequests[_Request] = ActiveRequests()

    def start(self, req_id: Hashable, prompt_ids: Sequence[int]) -> None:
        """Begin a request; its prompt seeds the request's table as one-hot observations.

        Raises
        ------
        ValueError
            If ``req_id`` is already active.
        """
        if req_id in self._requests:
            raise ValueError(f"Request '{req_id}' is already active")
        table = NGramTable(self.config.max_n, self.config.max_stored)
        table.observe_tokens(prompt_ids)
        tail = list(context_key(prompt_ids, self.config.max_n - 1))
        self._requests.add(req_id, _Request(table, tail))

    def extend(self, req_id: Hashable, token_ids: Sequence[int]) -> None:
        """Record accepted output tokens as one-hot observations.

        Raises
        ------
        ValueError
            If ``req_id`` is not active.
        """
        request = self._requests.get(req_id)
        width = self.config.max_n - 1
        for token in token_ids:
            context = tuple(request.tail)
            request.table.observe(context, (token,), (1.0,))
            request.learned.append((context, (token,), (1.0,)))
            if width:
                request.tail.append(token)
                del request.tail[:-width]

    def observe(
        self,
        req_id: Hashable,
        context_ids: Sequence[int],
        topk_ids: Sequence[int],
        topk_probs: Sequence[float],
    ) -> None:
        """Record the target model's top-k distribution after ``context_ids`` (from verification).

        Raises
        ------
        ValueError
            If ``req_id`` is not active or the distribution is malformed.
        """
        request = self._requests.get(req_id)
        request.table.observe(context_ids, topk_ids, topk_probs)
        width = self.config.max_n - 1
        context = context_key(context_ids, width)
        request.learned.append((context, tuple(topk_ids), tuple(topk_probs)))

    def propose(
        self,
        req_id: Hashable,
        context_ids: Sequence[int],
        k: int,
        *,
        rng: np.random.Generator | None = None,
        temperature: float = 0.0,
    ) -> Draft:
        """Draft a tree of up to ``k`` tokens after ``context_ids``.

        Parameters
        ----------
        rng, temperature:
            Temperature 0 (the default) drafts the deterministic top-k tree; a positive
            temperature samples the branches with Gumbel-top-k and needs ``rng``.

        Raises
        ------
        ValueError
            If ``req_id`` is not active, ``k`` is negative, or the temperature is invalid.
        """
        request = self._requests.get(req_id)
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        tables = [request.table, self.global_table]
        return draft_tree(tables, context_ids, k, self.config, rng, temperature)

    def stop(self, req_id: Hashable) -> None:
        """End the request and add what its output taught to the shared table.

        Raises
        ------
        ValueError
            If ``req_id`` is not active.
        """
        request = self._requests.pop(req_id)
        for context, topk_ids, topk_probs in request.learned:
            self.global_table.observe(context, topk_ids, topk_probs)
