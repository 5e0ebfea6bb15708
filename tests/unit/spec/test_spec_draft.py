"""Draft validation and helpers, and the Drafter protocol both drafters satisfy."""

from __future__ import annotations

import dataclasses

import pytest

from spec import Draft, Drafter, StandDrafter, SuffixDrafter
from spec.draft import best_nodes, merge_drafts


def test_path_helpers() -> None:
    draft = Draft.path([7, 8, 9], [0.9, 0.8, 0.5])
    assert draft.parents == (-1, 0, 1)
    assert draft.is_path()
    assert draft.path_tokens() == (7, 8, 9)
    assert len(draft) == 3
    assert draft.total_score == pytest.approx(2.2)


def test_empty_draft_is_a_path_of_length_zero() -> None:
    draft = Draft.empty()
    assert len(draft) == 0
    assert draft.is_path()
    assert draft.path_tokens() == ()
    assert draft.total_score == 0.0


def test_tree_is_not_a_path() -> None:
    tree = Draft(token_ids=(7, 9), parents=(-1, -1), scores=(0.6, 0.3))
    assert not tree.is_path()
    with pytest.raises(ValueError, match="tree, not a path"):
        tree.path_tokens()


def test_draft_is_frozen() -> None:
    draft = Draft.path([1], [1.0])
    with pytest.raises(dataclasses.FrozenInstanceError):
        draft.token_ids = (2,)  # type: ignore[misc]


@pytest.mark.parametrize(
    ("token_ids", "parents", "scores", "message"),
    [
        ((1, 2), (-1,), (1.0, 1.0), "differ in length"),
        ((1,), (0,), (1.0,), r"parent 0; it must be in \[-1, -1\]"),  # a node is not its parent
        ((1, 2), (-1, 1), (1.0, 1.0), "parent 1"),  # parents must point to earlier nodes
        ((1, 2), (-1, 5), (1.0, 1.0), "parent 5"),
        ((1,), (-2,), (1.0,), "parent -2"),
        ((-1,), (-1,), (1.0,), "negative token id"),
        ((1,), (-1,), (1.5,), "score 1.5"),
        ((1,), (-1,), (-0.1,), "score -0.1"),
        ((1,), (-1,), (float("nan"),), "score nan"),
    ],
)
def test_validation_rejects(
    token_ids: tuple[int, ...], parents: tuple[int, ...], scores: tuple[float, ...], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        Draft(token_ids=token_ids, parents=parents, scores=scores)


TREE = Draft(token_ids=(5, 6, 7, 8, 7), parents=(-1, -1, 1, 1, 0), scores=(0.5,) * 5)


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ([6, 8, 9], [1, 3]),  # second root branch, then its second child
        ([5, 7], [0, 4]),  # 7 under 5 is node 4, not node 2 (which hangs under 6)
        ([6, 7, 7], [1, 2]),  # node 2 has no children
        ([9], []),  # no root node is 9
        ([], []),
    ],
)
def test_accepted_path_follows_matching_children(target: list[int], expected: list[int]) -> None:
    assert TREE.accepted_path(target) == expected


@pytest.mark.parametrize("drafter", [SuffixDrafter(), StandDrafter()])
def test_drafters_satisfy_the_protocol(drafter: Drafter) -> None:
    assert isinstance(drafter, Drafter)


def test_best_nodes_grows_best_first_and_keeps_parents() -> None:
    tree = Draft((1, 2, 3, 4, 5), (-1, 0, -1, 2, 3), (0.3, 0.2, 0.9, 0.8, 0.1))
    cut = best_nodes(tree, 3)
    assert cut.token_ids == (1, 3, 4)
    assert cut.parents == (-1, -1, 1)
    assert cut.scores == (0.3, 0.9, 0.8)
    assert best_nodes(tree, 5) is tree
    assert len(best_nodes(tree, 0)) == 0


def test_best_nodes_never_keeps_a_child_without_its_parent() -> None:
    # The child outscores its parent's sibling, but it cannot come before its parent.
    tree = Draft((1, 2, 3), (-1, -1, 0), (0.4, 0.45, 0.6))
    assert best_nodes(tree, 1).token_ids == (2,)
    assert best_nodes(tree, 2).token_ids == (1, 2)


def test_merge_shares_prefixes_and_keeps_the_higher_score() -> None:
    chain = Draft.path((1, 2, 3), (0.9, 0.5, 0.2))
    tree = Draft((1, 4, 2), (-1, 0, 0), (0.7, 0.6, 0.55))
    merged = merge_drafts([chain, tree], 8)
    assert merged.token_ids == (1, 2, 3, 4)
    assert merged.parents == (-1, 0, 1, 0)
    assert merged.scores == (0.9, 0.55, 0.2, 0.6)
    assert merge_drafts([chain, tree], 3).token_ids == (1, 2, 4)
    assert len(merge_drafts([], 4)) == 0
