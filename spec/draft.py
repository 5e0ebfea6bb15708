"""What a drafter hands the engine: a small token tree, and the lifecycle every drafter follows.

A draft is a tree rather than a list so one verification pass can check several guesses; a plain
chain is the special case where node ``i`` hangs under node ``i - 1``. Scores travel with the
tokens because the engine and the simulator need the drafter's own estimate of how many tokens
will be accepted (to compare drafters and to size the next draft), and only the drafter knows it.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

__all__ = ["Draft", "Drafter", "best_nodes", "merge_drafts"]


@dataclass(frozen=True, slots=True)
class Draft:
    """A token tree proposed after the current context.

    Parameters
    ----------
    token_ids:
        Proposed token per node.
    parents:
        Parent index per node; ``-1`` hangs the node directly after the last context token.
        Parents always point to earlier nodes, so a single left-to-right pass visits parents
        before children (the order tree attention masks and verification walk in).
    scores:
        Estimated probability that the node is accepted, cumulative along its path (so a child
        never scores above its parent in the drafters here). ``sum(scores)`` is the expected
        number of accepted draft tokens.

    Raises
    ------
    ValueError
        If the three tuples differ in length, a parent does not point to an earlier node, a
        token id is negative, or a score is not a probability.

    Examples
    --------
    >>> Draft(token_ids=(7, 8), parents=(-1, 0), scores=(0.9, 0.6)).path_tokens()
    (7, 8)
    >>> Draft(token_ids=(7, 9), parents=(-1, -1), scores=(0.6, 0.3)).is_path()
    False
    """

    token_ids: tuple[int, ...]
    parents: tuple[int, ...]
    scores: tuple[float, ...]

    def __post_init__(self) -> None:
        n = len(self.token_ids)
        if len(self.parents) != n or len(self.scores) != n:
            raise ValueError(
                f"Draft fields differ in length: {n} token_ids, {len(self.parents)} parents, "
                f"{len(self.scores)} scores"
            )
        for i, (token, parent, score) in enumerate(
            zip(self.token_ids, self.parents, self.scores, strict=True)
        ):
            if not -1 <= parent < i:
                raise ValueError(f"Draft node {i} has parent {parent}; it must be in [-1, {i - 1}]")
            if token < 0:
                raise ValueError(f"Draft node {i} has negative token id {token}")
            if not (math.isfinite(score) and 0.0 <= score <= 1.0):
                raise ValueError(f"Draft node {i} has score {score}; it must be in [0, 1]")

    @classmethod
    def empty(cls) -> Draft:
        """A draft with no nodes: the engine then decodes one token as usual."""
        return cls(token_ids=(), parents=(), scores=())

    @classmethod
    def path(cls, token_ids: Sequence[int], scores: Sequence[float]) -> Draft:
        """A chain: node ``i`` follows node ``i - 1``."""
        return cls(
            token_ids=tuple(token_ids),
            parents=tuple(range(-1, len(token_ids) - 1)),
            scores=tuple(scores),
        )

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def total_score(self) -> float:
        """Expected number of accepted draft tokens (the sum of the node scores)."""
        return math.fsum(self.scores)

    def is_path(self) -> bool:
        """Whether the draft is a single chain (the empty draft counts as one)."""
        return all(parent == i - 1 for i, parent in enumerate(self.parents))

    def path_tokens(self) -> tuple[int, ...]:
        """The tokens of a chain, in order.

        Raises
        ------
        ValueError
            If the draft branches; walk ``parents`` for trees.
        """
        if not self.is_path():
            raise ValueError("Draft is a tree, not a path; walk `parents` instead")
        return self.token_ids

    def accepted_path(self, target_ids: Sequence[int]) -> list[int]:
        """Node indices of the longest root path whose tokens equal ``target_ids``' prefix.

        This is greedy verification: ``target_ids`` are the tokens the target model picks
        (its argmax after the context, after the context plus its first pick, ...).

        >>> tree = Draft(token_ids=(5, 6, 7, 8), parents=(-1, -1, 1, 1), scores=(0.5,) * 4)
        >>> tree.accepted_path([6, 8, 9])
        [1, 3]
        """
        accepted: list[int] = []
        current = -1
        for target in target_ids:
            for i in range(current + 1, len(self.token_ids)):
                if self.parents[i] == current and self.token_ids[i] == target:
                    accepted.append(i)
                    current = i
                    break
            else:
                break
        return accepted


def best_nodes(draft: Draft, limit: int) -> Draft:
    """The ``limit`` highest-scoring nodes of ``draft`` that still form a tree (every kept
    node's parent is kept), grown best-first from the roots; node order is preserved.

    A verification pass costs more the more nodes it carries, so a wide tree is cut to the
    nodes most likely to be accepted.

    >>> tree = Draft((5, 6, 7, 8), (-1, -1, 0, 1), (0.5, 0.4, 0.45, 0.1))
    >>> best_nodes(tree, 3).token_ids
    (5, 6, 7)
    """
    if len(draft) <= limit:
        return draft
    children: dict[int, list[int]] = {}
    for i, parent in enumerate(draft.parents):
        children.setdefault(parent, []).append(i)
    frontier = [(-draft.scores[i], i) for i in children.get(-1, [])]
    heapq.heapify(frontier)
    kept: list[int] = []
    while frontier and len(kept) < limit:
        _, node = heapq.heappop(frontier)
        kept.append(node)
        for child in children.get(node, []):
            heapq.heappush(frontier, (-draft.scores[child], child))
    kept.sort()
    new_index = {old: new for new, old in enumerate(kept)}
    return Draft(
        tuple(draft.token_ids[i] for i in kept),
        tuple(new_index[draft.parents[i]] if draft.parents[i] >= 0 else -1 for i in kept),
        tuple(draft.scores[i] for i in kept),
    )


def merge_drafts(drafts: Sequence[Draft], limit: int) -> Draft:
    """One tree holding the nodes of every draft (a shared prefix once, with the higher
    score), cut to its ``limit`` best nodes: how several drafters share one pass.

    >>> a = Draft.path((5, 6), (0.8, 0.5))
    >>> b = Draft.path((5, 7), (0.6, 0.4))
    >>> merged = merge_drafts([a, b], 8)
    >>> merged.token_ids, merged.parents, merged.scores
    ((5, 6, 7), (-1, 0, 0), (0.8, 0.5, 0.4))
    """
    tokens: list[int] = []
    parents: list[int] = []
    scores: list[float] = []
    index: dict[tuple[int, int], int] = {}
    for draft in drafts:
        mapped: list[int] = []
        for token, parent, score in zip(draft.token_ids, draft.parents, draft.scores, strict=True):
            key = (mapped[parent] if parent >= 0 else -1, token)
            node = index.get(key)
            if node is None:
                node = index[key] = len(tokens)
                tokens.append(token)
                parents.append(key[0])
                scores.append(score)
            else:
                scores[node] = max(scores[node], score)
            mapped.append(node)
    return best_nodes(Draft(tuple(tokens), tuple(parents), tuple(scores)), limit)


@runtime_checkable
class Drafter(Protocol):
    """The request lifecycle the engine drives; every drafter in ``spec`` satisfies it.

    ``start`` registers a request and its prompt, ``extend`` appends the tokens the target
    model accepted, ``propose`` drafts up to ``k`` tokens after ``context_ids`` (the prompt plus
    everything extended so far), and ``stop`` ends the request, letting the drafter learn from
    its output for later requests. Misuse (starting twice, touching an unknown request) raises
    ``ValueError`` so the engine's bookkeeping bugs surface at once.
    """

    def start(self, req_id: Hashable, prompt_ids: Sequence[int]) -> None: ...

    def extend(self, req_id: Hashable, token_ids: Sequence[int]) -> None: ...

    def propose(self, req_id: Hashable, context_ids: Sequence[int], k: int) -> Draft: ...

    def stop(self, req_id: Hashable) -> None: ...
