"""SuffixDecoding: draft the continuation that followed the longest matching suffix before.

Oliaro et al. 2024, "SuffixDecoding". Agent traffic repeats itself (the same tool-call
skeletons, ids copied from tool results into arguments), so the tokens that followed the
context's longest repeated suffix, in this request or in earlier outputs, are a strong draft.
Two indexes are searched: one per request over its prompt and its own output, and a global one
over the outputs of recent requests (FIFO-bounded); the draft with the higher expected acceptance
wins. The paper indexes with a suffix tree; :mod:`spec.suffix_automaton` answers the same queries
with far fewer nodes. Draft length adapts: growth stops when the estimated probability that the
whole path is accepted falls under ``min_token_prob``, and a short match (weak evidence) caps the
draft at ``max_spec_factor * match_len + max_spec_offset`` tokens.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from spec._requests import ActiveRequests
from spec.draft import Draft
from spec.suffix_automaton import State, SuffixAutomaton, longest_match

__all__ = ["SuffixConfig", "SuffixDrafter", "spec_budget", "speculate"]


@dataclass(frozen=True, slots=True)
class SuffixConfig:
    """Settings of :class:`SuffixDrafter` (defaults follow the paper's reference setup).

    Parameters
    ----------
    max_depth:
        Longest context suffix matched. Longer matches are rarely more predictive, and the
        bound keeps a proposal's cost independent of the context length.
    max_cached_requests:
        Outputs kept in the global index (oldest evicted first); 0 disables it, None = no bound.
    max_spec_factor, max_spec_offset:
        A match of ``m`` tokens allows at most ``floor(max_spec_factor * m + max_spec_offset)``
        drafted tokens.
    min_token_prob:
        Stop growing a path once its estimated acceptance probability is below this.
    use_tree:
        Draft a best-first tree of alternatives instead of the single most frequent path.
    max_tree_nodes:
        Upper bound on tree nodes (``k`` bounds them too).

    Raises
    ------
    ValueError
        On out-of-range values.
    """

    max_depth: int = 64
    max_cached_requests: int | None = 1000
    max_spec_factor: float = 1.0
    max_spec_offset: float = 0.0
    min_token_prob: float = 0.1
    use_tree: bool = False
    max_tree_nodes: int = 64

    def __post_init__(self) -> None:
        if self.max_depth < 1:
            raise ValueError(f"max_depth must be >= 1, got {self.max_depth}")
        if self.max_cached_requests is not None and self.max_cached_requests < 0:
            raise ValueError(
                f"max_cached_requests must be >= 0 or None, got {self.max_cached_requests}"
            )
        if not (math.isfinite(self.max_spec_factor) and self.max_spec_factor >= 0):
            raise ValueError(f"max_spec_factor must be >= 0, got {self.max_spec_factor}")
        if not math.isfinite(self.max_spec_offset):
            raise ValueError(f"max_spec_offset must be finite, got {self.max_spec_offset}")
        if not 0.0 <= self.min_token_prob <= 1.0:
            raise ValueError(f"min_token_prob must be in [0, 1], got {self.min_token_prob}")
        if self.max_tree_nodes < 1:
            raise ValueError(f"max_tree_nodes must be >= 1, got {self.max_tree_nodes}")


def spec_budget(match_len: int, k: int, config: SuffixConfig) -> int:
    """Most tokens a match of ``match_len`` tokens may draft: ``k`` and the match-length cap.

    >>> spec_budget(3, k=16, config=SuffixConfig(max_spec_factor=2.0, max_spec_offset=1.0))
    7
    >>> spec_budget(3, k=4, config=SuffixConfig(max_spec_factor=2.0))
    4
    """
    # The epsilon keeps 0.1 * 30 from flooring to 2 through float error.
    cap = math.floor(config.max_spec_factor * match_len + config.max_spec_offset + 1e-9)
    return max(0, min(k, cap))


def speculate(
    automaton: SuffixAutomaton, context_ids: Sequence[int], k: int, config: SuffixConfig
) -> Draft:
    """Draft up to ``k`` tokens after ``context_ids`` from one index (which is not changed).

    The longest suffix of the context (at most ``max_depth`` tokens) that occurred with a
    continuation is matched; each next token is scored by its empirical frequency after the
    string drafted so far (its count over the counts of all tokens seen there), and a node's
    score is the product along its path: the estimated probability that it is accepted.

    Examples
    --------
    Stored ``[1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 6]``: ``[2, 3]`` was followed by
    4 three times, ``[2, 3, 4]`` by 5 twice and by 6 once.

    >>> index = SuffixAutomaton()
    >>> _ = index.add([1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 6])
    >>> config = SuffixConfig(max_spec_factor=2.0, min_token_prob=0.5)
    >>> draft = speculate(index, [9, 2, 3], k=8, config=config)
    >>> draft.path_tokens(), [round(s, 2) for s in draft.scores]
    ((4, 5, 0, 1), [1.0, 0.67, 0.67, 0.67])

    The match ``[2, 3]`` has 2 tokens, so ``max_spec_factor=2`` allows 4 (not ``k=8``). With
    ``min_token_prob=0.7`` the path stops before 5 (1.0 * 2/3 < 0.7):

    >>> speculate(index, [9, 2, 3], k=8, config=SuffixConfig(min_token_prob=0.7)).token_ids
    (4,)

    A tree spends the budget on the most likely nodes. Stored ``[1, 2, 3, 4, 5, 6, 0, 2, 3, 7,
    8]``: after ``[2, 3]`` came 4 once and 7 once, so the path takes 4 (smaller id on ties)
    while the tree keeps both branches:

    >>> index = SuffixAutomaton()
    >>> _ = index.add([1, 2, 3, 4, 5, 6, 0, 2, 3, 7, 8])
    >>> speculate(index, [9, 2, 3], k=4, config=config).token_ids
    (4, 5, 6, 0)
    >>> tree_config = SuffixConfig(max_spec_factor=2.0, min_token_prob=0.3, use_tree=True)
    >>> draft = speculate(index, [9, 2, 3], k=4, config=tree_config)
    >>> draft.token_ids, draft.parents, draft.scores
    ((4, 7, 5, 8), (-1, -1, 0, 1), (0.5, 0.5, 0.5, 0.5))
    """
    if k <= 0:
        return Draft.empty()
    state, match_len = longest_match(automaton, context_ids, config.max_depth)
    budget = spec_budget(match_len, k, config)
    if match_len == 0 or budget == 0:
        return Draft.empty()
    if config.use_tree:
        return _draft_tree(state, min(budget, config.max_tree_nodes), config.min_token_prob)
    return _draft_path(state, budget, config.min_token_prob)


def _draft_path(state: State, budget: int, min_prob: float) -> Draft:
    """Greedy: follow the most frequent next token (smallest id on ties) while it is likely."""
    tokens: list[int] = []
    scores: list[float] = []
    prob = 1.0
    while len(tokens) < budget:
        total = best_count = 0
        best_token = -1
        best_state = state
        for token, child in state.next.items():
            count = child.count
            total += count
            if count > best_count or (count == best_count and count and token < best_token):
                best_count, best_token, best_state = count, token, child
        if total == 0:
            break
        prob *= best_count / total
        if prob < min_prob:
            break
        tokens.append(best_token)
        scores.append(prob)
        state = best_state
    return Draft.path(tokens, scores)


def _draft_tree(state: State, budget: int, min_prob: float) -> Draft:
    """Best-first: repeatedly add the most likely frontier node until the budget is spent.

    Scores only shrink along a path, so a parent always enters the draft before its children.
    """
    tokens: list[int] = []
    parents: list[int] = []
    scores: list[float] = []
    # (negated score, insertion order for stable ties, token, state, parent index in the draft)
    frontier: list[tuple[float, int, int, State, int]] = []
    order = 0

    def push_children(parent: State, parent_score: float, parent_index: int) -> None:
        nonlocal order
        live = sorted(
            (-child.count, token, child) for token, child in parent.next.items() if child.count
        )
        total = -sum(item[0] for item in live)
        for neg_count, token, child in live:
            score = parent_score * (-neg_count / total)  # never above the parent
            if score < min_prob:
                break  # sorted by count: every later sibling scores lower still
            heapq.heappush(frontier, (-score, order, token, child, parent_index))
            order += 1

    push_children(state, 1.0, -1)
    while frontier and len(tokens) < budget:
        neg_score, _, token, child, parent_index = heapq.heappop(frontier)
        tokens.append(token)
        parents.append(parent_index)
        scores.append(-neg_score)
        if len(tokens) < budget:  # the last node's children could not be used
            push_children(child, -neg_score, len(tokens) - 1)
    return Draft(tuple(tokens), tuple(parents), tuple(scores))


class SuffixDrafter:
    """SuffixDecoding over a per-request index and a global index of recent outputs.

    Parameters
    ----------
    config:
        Match length, global cache bound, and draft-length policy.
    """

    def __init__(self, config: SuffixConfig | None = None) -> None:
        self.config = config or SuffixConfig()
        self.global_index = SuffixAutomaton()
        self._cached: deque[int] = deque()  # global sequence ids, oldest first
        # Per active request: its own index (prompt + output) and its output so far.
        self._requests: ActiveRequests[tuple[SuffixAutomaton, list[int]]] = ActiveRequests()

    @property
    def num_cached(self) -> int:
        """Outputs currently held in the global index."""
        return len(self._cached)

    def start(self, req_id: Hashable, prompt_ids: Sequence[int]) -> None:
        """Begin a request and index its prompt.

        Raises
        ------
        ValueError
            If ``req_id`` is already active.
        """
        if req_id in self._requests:
            raise ValueError(f"Request '{req_id}' is already active")
        index = SuffixAutomaton()
        index.add(prompt_ids)
        self._requests.add(req_id, (index, []))

    def extend(self, req_id: Hashable, token_ids: Sequence[int]) -> None:
        """Append accepted output tokens to the request's index.

        Raises
        ------
        ValueError
            If ``req_id`` is not active.
        """
        index, output = self._requests.get(req_id)
        index.append(token_ids)
        output.extend(token_ids)

    def propose(self, req_id: Hashable, context_ids: Sequence[int], k: int) -> Draft:
        """Draft up to ``k`` tokens after ``context_ids`` from the better of the two indexes.

        ``context_ids`` is the prompt plus the tokens extended so far.

        Raises
        ------
        ValueError
            If ``req_id`` is not active or ``k`` is negative.
        """
        index, _ = self._requests.get(req_id)
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        draft = speculate(index, context_ids, k, self.config)
        if self._cached:
            shared = speculate(self.global_index, context_ids, k, self.config)
            if shared.total_score > draft.total_score:
                draft = shared
        return draft

    def stop(self, req_id: Hashable) -> None:
        """End the request and cache its output globally, evicting the oldest beyond the bound.

        Raises
        ------
        ValueError
            If ``req_id`` is not active.
        """
        _, output = self._requests.pop(req_id)
        limit = self.config.max_cached_requests
        if limit == 0 or not output:
            return
        self._cached.append(self.global_index.add(output))
        while limit is not None and len(self._cached) > limit:
            self.global_index.remove(self._cached.popleft())
