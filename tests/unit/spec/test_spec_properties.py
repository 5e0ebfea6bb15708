"""Property tests: whatever the data, drafts only propose continuations that were seen."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from hypothesis import given, settings
from hypothesis import strategies as st

from spec.draft import Draft
from spec.stand import StandConfig, StandDrafter
from spec.suffix import SuffixConfig, SuffixDrafter

tokens = st.lists(st.integers(0, 4), max_size=14)
history = st.lists(st.tuples(tokens, tokens), max_size=4)  # earlier (prompt, output) pairs


def node_paths(draft: Draft) -> list[tuple[int, ...]]:
    """Tokens from the root to each node."""
    paths: list[tuple[int, ...]] = []
    for token, parent in zip(draft.token_ids, draft.parents, strict=True):
        paths.append((*(paths[parent] if parent >= 0 else ()), token))
    return paths


def occurs(needle: Sequence[int], haystacks: Sequence[Sequence[int]]) -> bool:
    n = len(needle)
    return any(
        list(hay[i : i + n]) == list(needle) for hay in haystacks for i in range(len(hay) - n + 1)
    )


def check_draft_shape(draft: Draft, k: int) -> None:
    assert len(draft) <= k
    for i, parent in enumerate(draft.parents):
        if parent >= 0:
            assert draft.scores[i] <= draft.scores[parent]  # estimates shrink along a path


@settings(max_examples=200, deadline=None, database=None)
@given(
    past=history,
    prompt=tokens.filter(bool),
    output=tokens,
    k=st.integers(0, 10),
    use_tree=st.booleans(),
    factor=st.sampled_from([0.5, 1.0, 4.0]),
    max_cached=st.sampled_from([None, 1, 2]),
)
def test_suffix_drafts_continue_the_context_as_seen_in_the_data(
    past: list[tuple[list[int], list[int]]],
    prompt: list[int],
    output: list[int],
    k: int,
    use_tree: bool,
    factor: float,
    max_cached: int | None,
) -> None:
    config = SuffixConfig(
        max_depth=6, use_tree=use_tree, max_spec_factor=factor, max_cached_requests=max_cached
    )
    drafter = SuffixDrafter(config)
    for i, (past_prompt, past_output) in enumerate(past):
        drafter.start(i, past_prompt)
        drafter.extend(i, past_output)
        drafter.stop(i)
    cached = [out for _, out in past if out]
    if max_cached is not None:
        cached = cached[len(cached) - max_cached :]
    drafter.start("now", prompt)
    drafter.extend("now", output)
    context = prompt + output
    draft = drafter.propose("now", context, k)
    check_draft_shape(draft, k)
    for path in node_paths(draft):
        # Every node extends the last context token the way some stored sequence did.
        assert occurs([context[-1], *path], [context, *cached]), (context, path)


@settings(max_examples=200, deadline=None, database=None)
@given(
    past=history,
    prompt=tokens,
    output=tokens,
    k=st.integers(0, 10),
    max_n=st.integers(1, 4),
    branching=st.sampled_from([(1,), (2, 1), (3, 2, 1)]),
)
def test_stand_drafts_tokens_seen_after_the_backed_off_context(
    past: list[tuple[list[int], list[int]]],
    prompt: list[int],
    output: list[int],
    k: int,
    max_n: int,
    branching: tuple[int, ...],
) -> None:
    config = StandConfig(max_n=max_n, branching=branching, min_token_prob=0.0, max_stored=64)
    drafter = StandDrafter(config)
    width = max_n - 1
    seen: dict[tuple[int, ...], set[int]] = defaultdict(set)

    def record(sequence: list[int], start: int) -> None:
        for i in range(start, len(sequence)):
            context = tuple(sequence[max(0, i - width) : i])
            for order in range(len(context) + 1):
                seen[context[len(context) - order :]].add(sequence[i])

    for i, (past_prompt, past_output) in enumerate(past):
        drafter.start(i, past_prompt)
        drafter.extend(i, past_output)
        drafter.stop(i)
        record(past_prompt + past_output, len(past_prompt))  # only outputs are shared
    drafter.start("now", prompt)
    drafter.extend("now", output)
    context = prompt + output
    record(context, 0)
    draft = drafter.propose("now", context, k)
    check_draft_shape(draft, k)
    for path in node_paths(draft):
        node_context = tuple(context + list(path[:-1]))
        tail = node_context[len(node_context) - width :] if width else ()
        longest = next(
            tail[len(tail) - order :]
            for order in range(len(tail), -1, -1)
            if tail[len(tail) - order :] in seen
        )
        assert path[-1] in seen[longest], (node_context, path)
