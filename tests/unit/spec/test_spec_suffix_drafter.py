"""SuffixDecoding: literal draft tables with the reason for each, and the request lifecycle."""

from __future__ import annotations

from typing import Any

import pytest

from spec.suffix import SuffixConfig, SuffixDrafter, spec_budget, speculate
from spec.suffix_automaton import SuffixAutomaton

# [2, 3] is followed by 4 three times; [2, 3, 4] by 5 twice and by 6 once; [5, 0] by 1 twice.
DATA = [1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 6]
WIDE: dict[str, Any] = {
    "max_spec_factor": 4.0
}  # lets the cap stay out of the way unless a case is about it


@pytest.mark.parametrize(
    ("context", "k", "config", "expected", "reason"),
    [
        ([9, 2, 3], 8, WIDE, (4, 5, 0, 1, 2, 3, 4, 5), "match [2, 3]; most frequent path"),
        ([7], 8, WIDE, (), "no match: 7 never occurs"),
        ([9, 9, 9], 8, WIDE, (), "no suffix of the context occurs"),
        ([6, 1, 2], 8, WIDE, (3, 4, 5, 0, 1, 2, 3, 4), "match [1, 2]: not [6, 1, 2]"),
        ([5, 0, 1, 2, 3, 4], 8, WIDE, (5, 0, 1, 2, 3, 4, 6), "longest suffix wins: 5 then 6"),
        ([9, 2, 3], 3, WIDE, (4, 5, 0), "k caps the length"),
        ([9, 2, 3], 8, {"max_spec_factor": 1.0}, (4, 5), "cap: 1.0 * match_len 2"),
        ([9, 2, 3], 8, {"max_spec_factor": 0.5, "max_spec_offset": 2}, (4, 5, 0), "0.5*2 + 2"),
        ([9, 2, 3], 8, {"max_spec_factor": 0.0}, (), "a zero cap drafts nothing"),
        ([9, 2, 3], 8, {**WIDE, "min_token_prob": 0.7}, (4,), "adaptive: 1 * 2/3 < 0.7 stops"),
        ([9, 2, 3], 6, {**WIDE, "min_token_prob": 0.6}, (4, 5, 0, 1, 2, 3), "2/3 >= 0.6"),
        ([9, 2, 3], 8, {**WIDE, "max_depth": 1}, (4, 5, 0, 1), "max_depth 1: match [3], cap 4"),
    ],
)
def test_speculate_path_table(
    context: list[int], k: int, config: dict[str, Any], expected: tuple[int, ...], reason: str
) -> None:
    index = SuffixAutomaton()
    index.add(DATA)
    draft = speculate(index, context, k, SuffixConfig(**config))
    assert draft.path_tokens() == expected, reason


def test_scores_are_cumulative_frequencies() -> None:
    index = SuffixAutomaton()
    index.add(DATA)
    draft = speculate(index, [9, 2, 3], 3, SuffixConfig(**WIDE))
    # 4 always follows [2, 3]; 5 follows [2, 3, 4] two times out of three; 0 always follows 5.
    assert draft.scores == pytest.approx((1.0, 2 / 3, 2 / 3))


def test_tree_keeps_the_alternative_the_path_drops() -> None:
    index = SuffixAutomaton()
    index.add(DATA)
    path = speculate(index, [9, 2, 3, 4], 7, SuffixConfig(**WIDE, min_token_prob=0.3))
    tree = speculate(
        index, [9, 2, 3, 4], 7, SuffixConfig(**WIDE, min_token_prob=0.3, use_tree=True)
    )
    # After [2, 3, 4]: 5 (2/3) or 6 (1/3). Along 5 0 1 2 3 4 everything is certain (2/3 each)
    # until [2, 3, 4, 5, 0, 1, 2, 3, 4], seen once before 5 and once before 6 (1/3 each).
    assert path.path_tokens() == (5, 0, 1, 2, 3, 4, 5)
    assert path.scores == pytest.approx((2 / 3,) * 6 + (1 / 3,))
    # The tree spends its 7th node on the root alternative 6 instead (same score, found first).
    assert tree.token_ids == (5, 0, 1, 2, 3, 4, 6)
    assert tree.parents == (-1, 0, 1, 2, 3, 4, -1)
    assert tree.scores == pytest.approx((2 / 3,) * 6 + (1 / 3,))


def test_tree_respects_max_tree_nodes() -> None:
    index = SuffixAutomaton()
    index.add(DATA)
    config = SuffixConfig(**WIDE, min_token_prob=0.0, use_tree=True, max_tree_nodes=2)
    assert len(speculate(index, [9, 2, 3], 8, config)) == 2


@pytest.mark.parametrize(
    ("match_len", "k", "factor", "offset", "expected"),
    [(2, 16, 1.0, 0.0, 2), (2, 16, 2.0, 1.0, 5), (30, 16, 1.0, 0.0, 16), (30, 16, 0.1, 0.0, 3)],
)
def test_spec_budget(match_len: int, k: int, factor: float, offset: float, expected: int) -> None:
    config = SuffixConfig(max_spec_factor=factor, max_spec_offset=offset)
    assert spec_budget(match_len, k, config) == expected  # 0.1 * 30 is 3, not 2 (float error)


def test_own_tail_does_not_dilute_frequencies() -> None:
    drafter = SuffixDrafter(SuffixConfig(max_spec_factor=2.0))
    drafter.start("r", [1, 2, 3, 1, 2])
    draft = drafter.propose("r", [1, 2, 3, 1, 2], 8)
    # [1, 2] occurred before, followed by 3; its second occurrence (the tail) has no next token
    # yet and must not halve the estimate. The draft stops where the prompt does.
    assert draft.path_tokens() == (3, 1, 2)
    assert draft.scores == (1.0, 1.0, 1.0)


def test_extend_feeds_the_request_index() -> None:
    drafter = SuffixDrafter(SuffixConfig(max_cached_requests=0))
    drafter.start("r", [1, 2])
    assert len(drafter.propose("r", [1, 2], 4)) == 0
    drafter.extend("r", [3, 1, 2])
    assert drafter.propose("r", [1, 2, 3, 1, 2], 4).path_tokens() == (3, 1)


def test_global_index_holds_outputs_not_prompts() -> None:
    drafter = SuffixDrafter(SuffixConfig(max_spec_factor=4.0))
    drafter.start("a", [40, 41, 42])
    drafter.extend("a", [7, 8, 9])
    drafter.stop("a")
    assert drafter.global_index.count([7, 8, 9]) == 1
    assert drafter.global_index.count([41]) == 0
    drafter.start("b", [50])
    assert drafter.propose("b", [50, 7], 4).path_tokens() == (8, 9)


def test_better_of_request_and_global_proposal_wins() -> None:
    drafter = SuffixDrafter(SuffixConfig(max_spec_factor=4.0))
    for name in ("a", "b"):
        drafter.start(name, [0])
        drafter.extend(name, [1, 2, 3, 4, 5, 6, 7])
        drafter.stop(name)
    # The prompt has [1, 2] -> 9 1 2 (total score 3.0, up to the prompt's own tail); the global
    # outputs have [1, 2] -> 3 4 5 6 7 (total 5.0), which wins.
    drafter.start("c", [1, 2, 9, 1, 2])
    assert drafter.propose("c", [1, 2, 9, 1, 2], 8).path_tokens() == (3, 4, 5, 6, 7)
    # A longer continuation in the prompt (8 tokens, total 8.0) beats the global one.
    prompt = [1, 2, 6, 6, 6, 6, 6, 6, 0, 1, 2]
    drafter.start("d", prompt)
    assert drafter.propose("d", prompt, 8).path_tokens() == (6, 6, 6, 6, 6, 6, 0, 1)


def test_eviction_removes_the_oldest_output_counts() -> None:
    drafter = SuffixDrafter(SuffixConfig(max_cached_requests=1, max_spec_factor=4.0))
    drafter.start("old", [0])
    drafter.extend("old", [1, 2, 3])
    drafter.stop("old")
    drafter.start("new", [0])
    drafter.extend("new", [4, 5, 6])
    drafter.stop("new")
    assert drafter.num_cached == 1
    assert drafter.global_index.count([1, 2]) == 0  # evicted (FIFO)
    assert drafter.global_index.count([4, 5]) == 1
    drafter.start("probe", [0])
    assert len(drafter.propose("probe", [0, 1], 4)) == 0
    assert drafter.propose("probe", [0, 4], 4).path_tokens() == (5, 6)


def test_zero_cache_disables_the_global_index() -> None:
    drafter = SuffixDrafter(SuffixConfig(max_cached_requests=0))
    drafter.start("a", [0])
    drafter.extend("a", [1, 2, 3])
    drafter.stop("a")
    assert drafter.num_cached == 0
    assert drafter.global_index.num_tokens == 0


def test_requests_are_isolated() -> None:
    drafter = SuffixDrafter(SuffixConfig(max_spec_factor=4.0))
    drafter.start("a", [1, 2, 3, 1])
    drafter.start("b", [1, 5, 6, 1])
    assert drafter.propose("a", [1, 2, 3, 1], 4).path_tokens()[0] == 2
    assert drafter.propose("b", [1, 5, 6, 1], 4).path_tokens()[0] == 5


def test_default_config_drafts() -> None:
    drafter = SuffixDrafter()
    drafter.start("r", list(range(40)) * 2)
    draft = drafter.propose("r", [*range(40), *range(20)], 16)
    assert draft.path_tokens() == tuple(range(20, 36))  # 16 tokens: the match is long enough


def test_lifecycle_misuse_raises() -> None:
    drafter = SuffixDrafter()
    drafter.start("x", [1])
    with pytest.raises(ValueError, match="Request 'x' is already active"):
        drafter.start("x", [1])
    for call in (
        lambda: drafter.extend("y", [1]),
        lambda: drafter.propose("y", [1], 4),
        lambda: drafter.stop("y"),
    ):
        with pytest.raises(ValueError, match="Request 'y' is not active"):
            call()
    with pytest.raises(ValueError, match="k must be >= 0"):
        drafter.propose("x", [1], -1)
    assert len(drafter.propose("x", [1], 0)) == 0
    drafter.stop("x")
    with pytest.raises(ValueError, match="Request 'x' is not active"):
        drafter.stop("x")
    drafter.start("x", [1])  # an id can be reused once stopped


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_depth", 0),
        ("max_cached_requests", -1),
        ("max_spec_factor", -1.0),
        ("max_spec_factor", float("inf")),
        ("max_spec_offset", float("nan")),
        ("min_token_prob", 1.5),
        ("max_tree_nodes", 0),
    ],
)
def test_config_rejects(field: str, value: float) -> None:
    kwargs: dict[str, Any] = {field: value}
    with pytest.raises(ValueError, match=field):
        SuffixConfig(**kwargs)
