"""What a drafter hands the engine: a small token tree, and the lifecycle every drafter follows.

A draft is a tree rather than a list so one verification pass can check several guesses; a plain
chain is the special case where node ``i`` hangs under node ``i - 1``. Scores travel with the
tokens because the engine and the simulator need the drafter's own estimate of how many tokens
will be accepted (to compare drafters and to size the next draft), and only the drafter knows it.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

__all__ = ["Draft", "Drafter"]


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
