"""Substring counts and longest-suffix matching of the suffix automaton."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import spec.suffix_automaton as automaton_module
from spec.suffix_automaton import SuffixAutomaton, longest_match


def substring_counts(sequences: Sequence[Sequence[int]], max_len: int) -> Counter[tuple[int, ...]]:
    """Brute force: occurrences of every substring of up to ``max_len`` tokens."""
    counts: Counter[tuple[int, ...]] = Counter()
    for seq in sequences:
        for end in range(1, len(seq) + 1):
            for length in range(1, min(max_len, end) + 1):
                counts[tuple(seq[end - length : end])] += 1
    return counts


def test_counts_of_one_sequence() -> None:
    index = SuffixAutomaton()
    index.add([1, 2, 1, 2, 3])
    assert index.count([1, 2]) == 2
    assert index.count([2, 1, 2]) == 1
    assert index.count([3, 1]) == 0  # never adjacent
    assert index.count([]) == 5  # the empty string ends at every position
    assert index.num_tokens == 5


def test_append_grows_the_newest_sequence() -> None:
    index = SuffixAutomaton()
    index.add([1, 2])
    index.append([1, 2])
    assert index.count([2, 1]) == 1  # spans the append boundary
    assert index.sequence(0) == [1, 2, 1, 2]


def test_remove_undoes_exactly_that_sequence() -> None:
    index = SuffixAutomaton()
    first = index.add([1, 2, 3])
    index.add([2, 3, 4])
    index.remove(first)
    assert index.count([1, 2]) == 0
    assert index.count([2, 3]) == 1  # still in the second sequence
    assert len(index) == 1


def test_misuse_raises() -> None:
    index = SuffixAutomaton()
    with pytest.raises(ValueError, match="No open sequence"):
        index.append([1])
    seq = index.add([1])
    index.remove(seq)
    with pytest.raises(ValueError, match="No open sequence"):
        index.append([2])  # the open sequence was removed
    with pytest.raises(ValueError, match="Sequence 0 is not stored"):
        index.remove(seq)


STORED = [1, 2, 3, 9, 2, 3, 7, 1, 2, 3, 4]


@pytest.mark.parametrize(
    ("context", "max_len", "expected_len", "reason"),
    [
        ([1, 2, 3], 8, 3, "match: [1, 2, 3] occurs (twice)"),
        ([5, 6], 8, 0, "no match: 6 never occurs"),
        ([5, 2], 8, 1, "only the last token [2] occurs"),
        ([8, 9, 2, 3], 8, 3, "longest suffix wins: [9, 2, 3], not [2, 3]"),
        ([7, 1, 2, 3], 8, 4, "[7, 1, 2, 3] occurs once, followed by 4"),
        ([7, 1, 2, 3], 2, 2, "only the last max_len tokens are read"),
        ([3, 4], 8, 0, "[3, 4] and [4] only end the data: nothing to continue from"),
    ],
)
def test_longest_match(context: list[int], max_len: int, expected_len: int, reason: str) -> None:
    index = SuffixAutomaton()
    index.add(STORED)
    state, length = longest_match(index, context, max_len)
    assert length == expected_len, reason
    if length:
        assert index.count(context[-length:]) == state.count


def test_match_skips_removed_sequences() -> None:
    index = SuffixAutomaton()
    old = index.add([5, 6, 7])
    index.add([6, 8])
    assert longest_match(index, [5, 6], 8)[1] == 2
    index.remove(old)
    # [5, 6] is gone; [6] still occurs and is followed by 8.
    state, length = longest_match(index, [5, 6], 8)
    assert length == 1
    assert [t for t, child in state.next.items() if child.count] == [8]


sequences_strategy = st.lists(
    st.lists(st.integers(0, 3), min_size=0, max_size=12), min_size=1, max_size=6
)


@settings(max_examples=150, deadline=None, database=None)
@given(sequences=sequences_strategy, removals=st.lists(st.integers(0, 5), max_size=4))
def test_counts_match_brute_force_after_adds_and_removes(
    sequences: list[list[int]], removals: list[int]
) -> None:
    index = SuffixAutomaton()
    ids = [index.add(seq) for seq in sequences]
    live = dict(zip(ids, sequences, strict=True))
    for r in removals:
        if r in live:
            index.remove(r)
            del live[r]
    expected = substring_counts(list(live.values()), max_len=4)
    for substring in substring_counts(sequences, max_len=4):
        assert index.count(substring) == expected[substring], substring


@settings(max_examples=60, deadline=None, database=None)
@given(sequences=sequences_strategy)
def test_rebuild_keeps_counts_and_the_open_sequence(sequences: list[list[int]]) -> None:
    index = SuffixAutomaton()
    index.add([0, 1, 2, 3])
    for seq in sequences:
        index.add(seq)
    root = index.root
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(automaton_module, "_REBUILD_SLACK", -(10**9))  # rebuild on any removal
        index.remove(0)
    assert index.root is not root  # it did rebuild
    index.append([3, 3])  # the newest sequence stays open across the rebuild
    live = [*sequences[:-1], [*sequences[-1], 3, 3]]
    expected = substring_counts(live, max_len=3)
    for substring in substring_counts([[0, 1, 2, 3], *live], max_len=3):
        assert index.count(substring) == expected[substring], substring
