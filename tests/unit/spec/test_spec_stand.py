"""STAND: n-gram back-off, running averages, Gumbel-top-k, tree drafting, lifecycle."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pytest

from spec.ngram_table import NGramTable
from spec.stand import StandConfig, StandDrafter, draft_tree, gumbel_top_k


def assert_lookup(found: Any, length: int, probs: dict[int, float]) -> None:
    """``lookup`` gave (matched context length, next-token probabilities) close to these."""
    assert found is not None
    assert found[0] == length
    assert found[1] == pytest.approx(probs)


def make_table() -> NGramTable:
    # 4-gram [1, 2, 3] -> 4, trigram [9, 2, 3] -> 5 (so [2, 3] saw 4 and 5), bigram [7] -> 8.
    table = NGramTable(max_n=4)
    table.observe([1, 2, 3], [4], [1.0])
    table.observe([9, 2, 3], [5], [1.0])
    table.observe([7], [8], [1.0])
    return table


@pytest.mark.parametrize(
    ("context", "order", "probs", "reason"),
    [
        ([0, 1, 2, 3], 3, {4: 1.0}, "longest context [1, 2, 3] known: only tokens seen there"),
        ([8, 2, 3], 2, {4: 0.5, 5: 0.5}, "[8, 2, 3] unseen: back off to [2, 3]"),
        ([6, 3], 1, {4: 0.5, 5: 0.5}, "[6, 3] unseen: back off to [3]"),
        ([5, 7], 1, {8: 1.0}, "[5, 7] unseen: back off to [7]"),
        ([42], 0, {4: 1 / 3, 5: 1 / 3, 8: 1 / 3}, "nothing known: the unigram distribution"),
        ([], 0, {4: 1 / 3, 5: 1 / 3, 8: 1 / 3}, "empty context: the unigram distribution"),
    ],
)
def test_back_off_from_the_longest_context(
    context: list[int], order: int, probs: dict[int, float], reason: str
) -> None:
    found = make_table().lookup(context)
    assert found is not None
    assert found[0] == order, reason
    assert found[1] == pytest.approx(probs), reason


def test_short_contexts_are_stored_whole() -> None:
    # Regression: a context shorter than max_n - 1 once lost its first tokens (negative slice).
    table = NGramTable(max_n=4)
    table.observe([2, 0], [5], [1.0])
    assert table.stats([2, 0]) is not None
    assert table.lookup([7, 2, 0]) == (2, {5: 1.0})


def test_empty_table_has_nothing() -> None:
    assert NGramTable().lookup([1, 2]) is None


def test_running_average_of_observed_distributions() -> None:
    table = NGramTable(max_n=2)
    table.observe([1], [2, 3], [0.8, 0.2])
    table.observe([1], [2, 4], [0.4, 0.5])
    found = table.lookup([1])
    assert found is not None
    # Averages over 2 observations; a token missing from one counts as 0 there.
    assert found[1] == pytest.approx({2: 0.6, 3: 0.1, 4: 0.25})


def test_tokens_count_as_one_hot_observations() -> None:
    table = NGramTable(max_n=2)
    table.observe_tokens([1, 2, 1, 3, 1, 2])
    assert_lookup(table.lookup([1]), 1, {2: 2 / 3, 3: 1 / 3})
    table.observe([1], [3], [0.9])  # a model distribution joins the same average
    assert_lookup(table.lookup([1]), 1, {2: 0.5, 3: 1.9 / 4})


def test_pruning_keeps_the_most_probable_tokens() -> None:
    table = NGramTable(max_n=1, max_stored=2)
    for token in (1, 1, 1, 2, 2, 3, 4):
        table.observe([], [token], [1.0])
    stats = table.stats([])
    assert stats is not None
    assert set(stats.sums) == {1, 2, 3, 4}  # up to 2 * max_stored before pruning
    table.observe([], [5], [1.0])
    assert set(stats.sums) == {1, 2}  # pruned to the max_stored largest sums
    found = table.lookup([])
    assert found is not None
    assert found[1] == pytest.approx({1: 3 / 8, 2: 2 / 8})  # pruned mass stays out


def test_max_contexts_drops_the_least_recently_updated() -> None:
    table = NGramTable(max_n=2, max_contexts=3)
    table.observe([1], [5], [1.0])  # contexts () and (1,)
    table.observe([2], [5], [1.0])  # (2,) added; () refreshed
    table.observe([3], [5], [1.0])  # (3,) added: (1,) is the least recently updated
    assert table.stats([1]) is None
    assert table.stats([2]) is not None
    assert table.stats([3]) is not None
    assert len(table) == 3


@pytest.mark.parametrize(
    ("ids", "probs", "message"),
    [
        ([1, 2], [0.5], "2 topk_ids but 1 topk_probs"),
        ([1, 1], [0.5, 0.5], "repeat a token"),
        ([1], [-0.1], "probabilities"),
        ([1, 2], [0.7, 0.7], "probabilities"),
        ([1], [float("nan")], "probabilities"),
    ],
)
def test_observe_rejects_malformed_distributions(
    ids: list[int], probs: list[float], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        NGramTable().observe([0], ids, probs)


@pytest.mark.parametrize(
    ("probs", "k", "expected", "reason"),
    [
        ([0.1, 0.6, 0.3], 2, [1, 2], "top-2 by probability"),
        ([0.1, 0.6, 0.3], 5, [1, 2, 0], "k beyond the support returns all"),
        ([0.4, 0.2, 0.4], 2, [0, 2], "ties go to the lower index"),
        ([0.0, 1.0], 2, [1], "zero-probability items are never drawn"),
        ([], 3, [], "nothing to draw"),
    ],
)
def test_gumbel_top_k_at_temperature_zero(
    probs: list[float], k: int, expected: list[int], reason: str
) -> None:
    assert gumbel_top_k(probs, k) == expected, reason
    # The rng is ignored when the draw is deterministic.
    assert gumbel_top_k(probs, k, np.random.default_rng(1), 0.0) == expected


def test_gumbel_top_k_is_deterministic_for_a_seed() -> None:
    probs = [0.05, 0.3, 0.25, 0.2, 0.2]
    draws = [gumbel_top_k(probs, 3, np.random.default_rng(seed), 1.0) for seed in range(20)]
    again = [gumbel_top_k(probs, 3, np.random.default_rng(seed), 1.0) for seed in range(20)]
    assert draws == again
    assert len({tuple(d) for d in draws}) > 1  # different seeds do sample differently
    assert all(len(set(d)) == 3 for d in draws)  # without replacement


def test_gumbel_top_k_samples_the_tempered_distribution() -> None:
    rng = np.random.default_rng(0)
    probs = [0.5, 0.3, 0.2]
    firsts = Counter(gumbel_top_k(probs, 1, rng, 1.0)[0] for _ in range(4000))
    for index, p in enumerate(probs):
        assert firsts[index] / 4000 == pytest.approx(p, abs=0.03)
    # Temperature 0.5 squares the probabilities before normalising: 25/38, 9/38, 4/38.
    firsts = Counter(gumbel_top_k(probs, 1, rng, 0.5)[0] for _ in range(4000))
    for index, p in enumerate([25 / 38, 9 / 38, 4 / 38]):
        assert firsts[index] / 4000 == pytest.approx(p, abs=0.03)


def test_gumbel_top_k_rejects_bad_temperature() -> None:
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        gumbel_top_k([1.0], 1, np.random.default_rng(0), -1.0)
    with pytest.raises(ValueError, match="needs an rng"):
        gumbel_top_k([1.0], 1, None, 1.0)


def tree_table() -> NGramTable:
    table = NGramTable(max_n=3)
    table.observe([1, 2], [3, 4, 6], [0.6, 0.3, 0.1])
    table.observe([2, 3], [5], [0.9])
    table.observe([2, 4], [7], [0.8])
    return table


def test_greedy_tree_is_the_deterministic_top_k() -> None:
    config = StandConfig(max_n=3, branching=(2, 1), min_token_prob=0.2)
    draft = draft_tree([tree_table()], [1, 2], 4, config)
    # Root: 3 (0.6) and 4 (0.3), not 6 (branching 2). Then 5 under 3 (0.54), 7 under 4 (0.24).
    assert draft.token_ids == (3, 5, 4, 7)
    assert draft.parents == (-1, 0, -1, 2)
    assert draft.scores == pytest.approx((0.6, 0.54, 0.3, 0.24))


@pytest.mark.parametrize(
    ("k", "min_prob", "expected", "reason"),
    [
        (2, 0.2, (3, 5), "k=2: the two most likely nodes"),
        (8, 0.5, (3, 5), "min_token_prob 0.5 cuts 4 (0.3) and everything after 5"),
        (0, 0.2, (), "k=0 drafts nothing"),
    ],
)
def test_tree_budget_and_threshold(
    k: int, min_prob: float, expected: tuple[int, ...], reason: str
) -> None:
    config = StandConfig(max_n=3, branching=(2, 1), min_token_prob=min_prob)
    assert draft_tree([tree_table()], [1, 2], k, config).token_ids == expected, reason


def test_sampled_tree_is_reproducible_with_a_seed() -> None:
    config = StandConfig(max_n=3, branching=(2, 1), min_token_prob=0.0)
    table = tree_table()

    def sampled(seed: int) -> tuple[int, ...]:
        rng = np.random.default_rng(seed)
        return draft_tree([table], [1, 2], 4, config, rng, temperature=1.0).token_ids

    assert [sampled(s) for s in range(10)] == [sampled(s) for s in range(10)]
    # Root branches are 2 distinct tokens out of {3, 4, 6}; 6 is sometimes picked.
    roots = {frozenset(sampled(s)) & {3, 4, 6} for s in range(40)}
    assert any(6 in r for r in roots)


def test_tables_pool_their_observations() -> None:
    local, shared = NGramTable(max_n=2), NGramTable(max_n=2)
    local.observe([1], [2], [1.0])
    shared.observe([1], [3], [1.0])
    shared.observe([1], [3], [1.0])
    config = StandConfig(max_n=2, branching=(2,), min_token_prob=0.0)
    draft = draft_tree([local, shared], [1], 3, config)
    roots = [i for i, parent in enumerate(draft.parents) if parent < 0]
    # Three observations of [1] in all: 3 twice (shared), 2 once (local).
    assert [draft.token_ids[i] for i in roots] == [3, 2]
    assert [draft.scores[i] for i in roots] == pytest.approx([2 / 3, 1 / 3])


def test_drafter_learns_from_prompt_output_and_observations() -> None:
    drafter = StandDrafter(StandConfig(max_n=3, branching=(1,)))
    drafter.start("r", [5, 6, 7, 5, 6, 7])
    assert drafter.propose("r", [5, 6, 7, 5, 6], 3).token_ids == (7, 5, 6)
    drafter.extend("r", [8, 9])
    drafter.observe("r", [8, 9], [10, 11], [0.7, 0.2])
    draft = drafter.propose("r", [5, 6, 7, 5, 6, 7, 8, 9], 1)
    assert draft.token_ids == (10,)
    assert draft.scores == pytest.approx((0.7,))


def test_stop_shares_the_output_but_not_the_prompt() -> None:
    drafter = StandDrafter(StandConfig(max_n=3, branching=(1,)))
    drafter.start("a", [40, 41, 42])
    drafter.extend("a", [1, 2, 3])
    drafter.observe("a", [1, 2, 3], [4], [0.9])
    drafter.stop("a")
    shared = drafter.global_table
    assert shared.stats([41]) is None  # prompt contexts stay private
    assert shared.lookup([1, 2]) == (2, {3: 1.0})
    assert_lookup(shared.lookup([2, 3]), 2, {4: 0.9})
    drafter.start("b", [0])
    assert drafter.propose("b", [0, 1, 2], 2).token_ids == (3, 4)


def test_propose_passes_rng_and_temperature() -> None:
    drafter = StandDrafter(StandConfig(max_n=2, branching=(1,), min_token_prob=0.0))
    drafter.start("r", [1, 2, 1, 3, 1, 4])
    greedy = drafter.propose("r", [1], 1)
    assert greedy.token_ids == (2,)  # ties: the smallest id
    picks = {
        drafter.propose("r", [1], 1, rng=np.random.default_rng(s), temperature=1.0).token_ids
        for s in range(30)
    }
    assert picks == {(2,), (3,), (4,)}
    with pytest.raises(ValueError, match="needs an rng"):
        drafter.propose("r", [1], 1, temperature=1.0)
    drafter.start("empty", [])
    with pytest.raises(ValueError, match="needs an rng"):  # even with nothing to draft from
        drafter.propose("empty", [], 1, temperature=1.0)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        drafter.propose("r", [1], 1, temperature=-0.5)


def test_lifecycle_misuse_raises() -> None:
    drafter = StandDrafter()
    drafter.start("x", [1])
    with pytest.raises(ValueError, match="Request 'x' is already active"):
        drafter.start("x", [1])
    for call in (
        lambda: drafter.extend("y", [1]),
        lambda: drafter.observe("y", [1], [2], [1.0]),
        lambda: drafter.propose("y", [1], 4),
        lambda: drafter.stop("y"),
    ):
        with pytest.raises(ValueError, match="Request 'y' is not active"):
            call()
    with pytest.raises(ValueError, match="k must be >= 0"):
        drafter.propose("x", [1], -1)
    drafter.stop("x")
    drafter.start("x", [1])  # an id can be reused once stopped


def test_unigram_only_drafter() -> None:
    drafter = StandDrafter(StandConfig(max_n=1, branching=(1,), min_token_prob=0.0))
    drafter.start("r", [3, 3, 4])
    drafter.extend("r", [3])
    assert drafter.propose("r", [3, 3, 4, 3], 2).token_ids == (3, 3)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_n", 0),
        ("max_stored", 0),
        ("branching", ()),
        ("branching", (2, 0)),
        ("min_token_prob", -0.1),
        ("max_tree_nodes", 0),
        ("max_global_contexts", 0),
    ],
)
def test_config_rejects(field: str, value: object) -> None:
    kwargs: dict[str, Any] = {field: value}
    with pytest.raises(ValueError, match=field):
        StandConfig(**kwargs)
