"""Tree verification's pure parts: pruning a draft, and keeping the accepted branch's cache rows."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache

from decoding.draft_tree import child_map, keep_accepted_rows, prune_draft
from spec.draft import Draft

TREE = Draft(  # two branches: 1 -> 2 -> 3 and 4 -> 5, plus 6 under 4
    token_ids=(1, 2, 3, 4, 5, 6),
    parents=(-1, 0, 1, -1, 3, 3),
    scores=(0.5, 0.4, 0.3, 0.4, 0.3, 0.1),
)


class PrefixGrammar:
    """Allows token sequences that are prefixes of one of ``allowed`` (a toy matcher)."""

    def __init__(self, *allowed: Sequence[int]) -> None:
        self.allowed = [list(a) for a in allowed]
        self.calls: list[list[int]] = []

    def validate_tokens(self, tokens: Sequence[int]) -> int:
        self.calls.append(list(tokens))
        best = 0
        for allowed in self.allowed:
            n = 0
            while n < min(len(tokens), len(allowed)) and tokens[n] == allowed[n]:
                n += 1
            best = max(best, n)
        return best


def test_prune_keeps_a_clean_draft_as_is() -> None:
    assert prune_draft(TREE, depth=16, stop_ids={99}, grammar=None) is TREE


def test_prune_drops_stop_tokens_and_their_subtrees() -> None:
    pruned = prune_draft(TREE, depth=16, stop_ids={4}, grammar=None)
    assert pruned.token_ids == (1, 2, 3)
    assert pruned.parents == (-1, 0, 1)


def test_prune_bounds_depth() -> None:
    pruned = prune_draft(TREE, depth=2, stop_ids=set(), grammar=None)
    assert pruned.token_ids == (1, 2, 4, 5, 6)
    assert pruned.parents == (-1, 0, -1, 2, 2)


def test_prune_checks_each_leaf_path_once_against_the_grammar() -> None:
    grammar = PrefixGrammar([1, 2], [4, 6])
    pruned = prune_draft(TREE, depth=16, stop_ids=set(), grammar=grammar)  # type: ignore[arg-type]
    assert pruned.token_ids == (1, 2, 4, 6)
    assert pruned.parents == (-1, 0, -1, 2)
    assert pruned.scores == (0.5, 0.4, 0.4, 0.1)
    assert sorted(grammar.calls) == [[1, 2, 3], [4, 5], [4, 6]]  # leaves only


def test_prune_of_a_chain_asks_the_grammar_once() -> None:
    grammar = PrefixGrammar([7, 8])
    pruned = prune_draft(Draft.path((7, 8, 9), (0.9, 0.8, 0.7)), 16, set(), grammar)  # type: ignore[arg-type]
    assert pruned.token_ids == (7, 8)
    assert grammar.calls == [[7, 8, 9]]


def test_children_map_the_walk() -> None:
    children = child_map(TREE)
    assert children[(-1, 1)] == 0
    assert children[(-1, 4)] == 3
    assert children[(3, 6)] == 5
    assert (0, 3) not in children


def filled_cache(length: int, layers: int = 2) -> DynamicCache:
    """A cache whose row ``i`` holds the value ``i`` (keys) and ``-i`` (values) everywhere."""
    cache = DynamicCache()
    rows = torch.arange(length, dtype=torch.float32)[None, None, :, None].expand(1, 2, length, 3)
    for layer in range(layers):
        cache.update(rows.clone(), -rows.clone(), layer)
    return cache


def cache_rows(cache: DynamicCache) -> list[list[int]]:
    return [
        [int(v) for v in layer.keys[0, 0, :, 0]]  # type: ignore[union-attr]
        for layer in cache.layers
    ]


def test_keep_crops_a_chain_prefix() -> None:
    cache = filled_cache(10)
    keep_accepted_rows(cache, base=4, accepted=[0, 1])
    assert cache_rows(cache) == [list(range(6))] * 2


def test_keep_gathers_a_later_branch_into_place() -> None:
    cache = filled_cache(10)  # 4 cached/pending positions, then draft nodes 0..5 at rows 4..9
    keep_accepted_rows(cache, base=4, accepted=[3, 5])
    assert cache_rows(cache) == [[0, 1, 2, 3, 7, 9]] * 2
    assert [int(v) for v in cache.layers[0].values[0, 1, :, 2]] == [0, -1, -2, -3, -7, -9]  # type: ignore[index]
    assert cache.get_seq_length() == 6


def test_keep_nothing_accepted_drops_every_node() -> None:
    cache = filled_cache(10)
    keep_accepted_rows(cache, base=4, accepted=[])
    assert cache_rows(cache) == [list(range(4))] * 2
