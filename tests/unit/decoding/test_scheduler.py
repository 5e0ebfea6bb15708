"""Scheduler: chunked prefill under a token budget, admission, prefix sharing, ``follows``,
preemption, cancellation and draft shares (pure bookkeeping, no model).

``run`` plays the engine's part after a pass: ``computed += tokens``, one generated token
appended when the work samples (the decoder shares ``seq.tokens``), then ``commit``."""

from __future__ import annotations

import pytest

from decoding.block_manager import BlockManager
from decoding.scheduler import Scheduler, SchedulerConfig, Sequence, Work, draft_budget

NEXT = 99  # the token every sampling pass "generates"


def run(scheduler: Scheduler, work: list[Work]) -> None:
    """Apply one pass's results as the engine does (no draft accepted)."""
    for item in work:
        item.seq.computed += item.tokens
        if item.samples:
            item.seq.tokens.append(NEXT)
        scheduler.commit(item.seq)


def make(
    num_blocks: int, block_size: int, *, batch: int = 256, running: int = 16, draft: int = 0
) -> tuple[BlockManager, Scheduler]:
    manager = BlockManager(num_blocks, block_size)
    return manager, Scheduler(manager, SchedulerConfig(batch, running, draft))


def seq(seq_id: int, prompt: list[int], follows: Sequence | None = None) -> Sequence:
    return Sequence(seq_id, list(prompt), len(prompt), follows)


def test_draft_budget_shares_max_draft_among_decoding_sequences() -> None:
    """Drafts per sequence: the whole budget alone, an even share, nothing in a big batch."""
    assert draft_budget(16, 0) == 16
    assert draft_budget(16, 1) == 16
    assert draft_budget(16, 3) == 5
    assert draft_budget(16, 4) == 4
    assert draft_budget(16, 17) == 0
    assert draft_budget(0, 1) == 0


def test_config_rejects_bad_limits() -> None:
    """A pass needs a row and a running slot; drafts cannot be negative."""
    for bad in ({"max_batch_tokens": 0}, {"max_running": 0}, {"max_draft": -1}):
        with pytest.raises(ValueError, match="max_batch_tokens >= 1"):
            SchedulerConfig(**bad)


def test_long_prompt_is_fed_in_block_aligned_chunks_and_only_the_last_samples() -> None:
    """Chunks end on block boundaries within the budget, whole computed blocks are
    committed after each pass, and the last chunk asks for logits."""
    manager, scheduler = make(8, 4, batch=10)
    a = seq(0, list(range(1, 20)))  # 19 prompt tokens
    scheduler.add(a)
    for chunk, samples, blocks in ((8, False, 2), (8, False, 4), (3, True, 5)):
        assert a.prefilling
        work = scheduler.schedule()
        assert work == [Work(a, chunk, 0, samples)]
        assert a.blocks == list(range(blocks))
        run(scheduler, work)
        assert a.committed == a.computed // 4
    assert not a.prefilling
    assert (a.computed, a.committed, a.tokens[-1]) == (19, 4, NEXT)
    assert manager.lookup(a.tokens, 20) == [0, 1, 2, 3]
    assert scheduler.schedule() == [Work(a, 1, 0, True)]


def test_decode_rows_come_first_and_a_newcomer_chunks_within_what_is_left() -> None:
    """A running sequence's decode row is served before a new prompt, whose chunk takes the
    rest of the budget (block-aligned) and never the whole prompt at once."""
    _, scheduler = make(16, 4, batch=8)
    a, b = seq(0, [1, 2, 3, 4]), seq(1, list(range(10, 22)))
    scheduler.add(a)
    first = scheduler.schedule()
    assert first == [Work(a, 4, 0, True)]
    run(scheduler, first)
    scheduler.add(b)
    for expected_b in (Work(b, 4, 0, False), Work(b, 4, 0, False), Work(b, 4, 0, True)):
        work = scheduler.schedule()
        assert work == [Work(a, 1, 0, True), expected_b]
        assert sum(w.tokens + w.draft for w in work) <= 8
        run(scheduler, work)
    assert (b.computed, len(b.tokens)) == (12, 13)


def test_admission_stops_at_max_running() -> None:
    """No more than ``max_running`` sequences run; the next one waits for a slot."""
    _, scheduler = make(16, 4, running=2)
    a, b, c = seq(0, [1, 2]), seq(1, [3, 4]), seq(2, [5, 6])
    for s in (a, b, c):
        scheduler.add(s)
    work = scheduler.schedule()
    assert work == [Work(a, 2, 0, True), Work(b, 2, 0, True)]
    assert list(scheduler.waiting) == [c]
    run(scheduler, work)
    scheduler.finish(a)
    assert scheduler.schedule() == [Work(b, 1, 0, True), Work(c, 2, 0, True)]
    assert scheduler.running == [b, c]


def test_a_shared_prompt_prefix_is_taken_from_committed_blocks() -> None:
    """A later sequence starts after the whole blocks it shares with a committed one and
    holds the same blocks (two references each) instead of computing them."""
    manager, scheduler = make(16, 4)
    a = seq(0, list(range(1, 11)))  # 10 tokens: blocks 0, 1 whole, block 2 partial
    scheduler.add(a)
    run(scheduler, scheduler.schedule())
    assert (a.blocks, a.committed) == ([0, 1, 2], 2)
    b = seq(1, [*range(1, 9), 50, 51, 52])
    scheduler.add(b)
    assert scheduler.schedule() == [Work(a, 1, 0, True), Work(b, 3, 0, True)]
    assert (b.computed, b.reused, b.committed) == (8, 8, 2)
    assert b.blocks == [0, 1, 3]
    assert [manager.refs(block) for block in range(4)] == [2, 2, 1, 1]
    assert (manager.stats.hits, manager.stats.tokens_reused) == (1, 8)
    scheduler.finish(a)
    assert [manager.refs(block) for block in range(4)] == [1, 1, 0, 1]


def test_the_last_prompt_position_is_always_fed() -> None:
    """A prompt cached whole still feeds its last position, for the logits to sample from:
    only blocks within ``len(tokens) - 1`` are reused."""
    _, scheduler = make(16, 4)
    a = seq(0, list(range(1, 11)))
    scheduler.add(a)
    run(scheduler, scheduler.schedule())
    b = seq(1, list(range(1, 9)))  # exactly a's two committed blocks
    scheduler.add(b)
    assert scheduler.schedule() == [Work(a, 1, 0, True), Work(b, 4, 0, True)]
    assert (b.computed, b.blocks) == (4, [0, 3])


def test_a_later_choice_waits_while_the_first_prefills() -> None:
    """A sequence that ``follows`` another is admitted only once that one's prompt is
    computed, and then takes its committed blocks."""
    _, scheduler = make(16, 4, batch=10)
    prompt = list(range(1, 13))
    first = seq(0, prompt)
    second = seq(1, prompt, follows=first)
    scheduler.add(first)
    scheduler.add(second)
    work = scheduler.schedule()
    assert work == [Work(first, 8, 0, False)]
    run(scheduler, work)
    work = scheduler.schedule()
    assert work == [Work(first, 4, 0, True)]
    assert list(scheduler.waiting) == [second]
    run(scheduler, work)
    assert scheduler.schedule() == [Work(first, 1, 0, True), Work(second, 4, 0, True)]
    assert (second.computed, second.blocks[:2]) == (8, first.blocks[:2])


def test_the_youngest_is_preempted_and_finds_its_committed_blocks_again() -> None:
    """When blocks run out the youngest running sequence gives its blocks back and waits
    first in line; re-admitted later, it starts from its blocks still cached."""
    manager, scheduler = make(4, 2)
    a, b = seq(0, [1, 2, 3, 4]), seq(1, [5, 6, 7])
    scheduler.add(a)
    scheduler.add(b)
    work = scheduler.schedule()
    assert work == [Work(a, 4, 0, True), Work(b, 3, 0, True)]
    assert (a.blocks, b.blocks) == ([0, 1], [2, 3])
    run(scheduler, work)
    assert (a.committed, b.committed) == (2, 1)
    later = seq(2, [8, 9])
    scheduler.add(later)
    work = scheduler.schedule()  # a needs a third block: b goes, its uncommitted block serves
    assert work == [Work(a, 1, 0, True)]
    assert scheduler.preemptions == 1
    assert scheduler.running == [a]
    assert list(scheduler.waiting) == [b, later]
    assert (b.blocks, b.computed, b.committed, b.done) == ([], 0, 0, False)
    assert a.blocks == [0, 1, 3]
    assert manager.refs(2) == 0
    assert manager.lookup(b.tokens, 3) == [2]
    run(scheduler, work)
    scheduler.finish(a)
    work = scheduler.schedule()
    assert work[0] == Work(b, 2, 0, True)
    assert (b.blocks, b.computed, b.reused) == ([2, 3], 2, 0)


def test_finish_frees_blocks_of_running_and_waiting_sequences() -> None:
    """Cancelling gives every block back, whether the sequence runs or still waits."""
    manager, scheduler = make(8, 4, running=1)
    a, b = seq(0, list(range(1, 7))), seq(1, [7, 8, 9])
    scheduler.add(a)
    scheduler.add(b)
    work = scheduler.schedule()
    assert work == [Work(a, 6, 0, True)]
    run(scheduler, work)
    assert manager.available == 6
    scheduler.finish(b)
    assert (b.done, list(scheduler.waiting), manager.available) == (True, [], 6)
    scheduler.finish(a)
    assert (a.done, a.blocks, manager.available) == (True, [], 8)
    assert scheduler.idle
    assert scheduler.schedule() == []
    assert manager.lookup([1, 2, 3, 4, 5], 5) == [0]  # still cached for a next turn


def test_drafts_are_shared_and_never_exceed_the_budget_left() -> None:
    """Each decoding sequence drafts at most its share of ``max_draft`` and no more than the
    rows the pass has left."""
    manager, scheduler = make(32, 4, batch=8, draft=8)
    a, b = seq(0, [1, 2, 3]), seq(1, [4, 5, 6])
    scheduler.add(a)
    scheduler.add(b)
    work = scheduler.schedule()
    assert work == [Work(a, 3, 0, True), Work(b, 3, 0, True)]  # newcomers draft nothing
    run(scheduler, work)
    work = scheduler.schedule()
    assert work == [Work(a, 1, 4, True), Work(b, 1, 2, True)]
    assert sum(w.tokens + w.draft for w in work) == 8
    for item in work:
        assert manager.blocks_for(item.seq.computed + item.tokens + item.draft) <= len(
            item.seq.blocks
        )


def test_draft_rows_always_have_blocks() -> None:
    """When memory holds the fed tokens but not the draft, the draft must shrink to the
    reserved blocks (the engine writes draft rows at ``seq.blocks[p // size]``)."""
    manager, scheduler = make(3, 4, draft=16)
    a = seq(0, list(range(1, 9)))
    scheduler.add(a)
    run(scheduler, scheduler.schedule())
    [item] = scheduler.schedule()
    assert (item.tokens, a.blocks) == (1, [0, 1, 2])
    assert manager.blocks_for(a.computed + item.tokens + item.draft) <= len(a.blocks)


def test_evicting_part_of_a_finished_prefix_keeps_its_head_findable() -> None:
    """Taking one block from a finished sequence's cached prefix should cost its tail, not
    its head (a lookup walks from the first block, so without it nothing is found)."""
    manager, scheduler = make(4, 2)
    a = seq(0, [1, 2, 3, 4, 5, 6, 7])
    scheduler.add(a)
    run(scheduler, scheduler.schedule())
    assert (a.blocks, a.committed) == ([0, 1, 2, 3], 3)
    scheduler.finish(a)
    c = seq(1, [50, 51, 52])
    scheduler.add(c)
    assert scheduler.schedule() == [Work(c, 3, 0, True)]
    assert manager.stats.evictions == 1
    assert manager.lookup(a.tokens, 7) == [0, 1]


def test_blocks_after_a_cached_prefix_are_committed_under_their_chain() -> None:
    """A sequence admitted on cached blocks commits its own later blocks after them, and
    never under a key that makes them look like the start of another prompt."""
    manager, scheduler = make(16, 2)
    a = seq(0, [1, 2, 3, 4, 5])
    scheduler.add(a)
    run(scheduler, scheduler.schedule())
    b = seq(1, [1, 2, 3, 4, 7, 8, 9])
    scheduler.add(b)
    for _ in range(4):
        run(scheduler, scheduler.schedule())
    assert (b.computed, b.tokens) == (10, [1, 2, 3, 4, 7, 8, 9, NEXT, NEXT, NEXT, NEXT])
    assert manager.lookup([NEXT, NEXT, 5], 2) == []  # b's 5th block is not a prompt's 1st
    assert b.committed == 5
    assert manager.lookup(b.tokens, 10) == b.blocks


def test_a_long_prefill_leaves_room_for_a_newcomer() -> None:
    """While a long prompt is prefilled, a request that arrives is admitted at the next pass
    (the prompt's chunk takes half the budget) and decodes beside the rest of the prefill."""
    _, scheduler = make(64, 4, batch=16)
    long = seq(0, list(range(1, 101)))  # 100 prompt tokens: many passes
    scheduler.add(long)
    run(scheduler, scheduler.schedule())
    assert long.computed == 16  # alone: the whole budget
    short = seq(1, [7, 8, 9])
    scheduler.add(short)
    work = scheduler.schedule()
    assert work == [Work(long, 8, 0, False), Work(short, 3, 0, True)]
    run(scheduler, work)
    work = scheduler.schedule()
    assert work == [Work(long, 12, 0, False), Work(short, 1, 0, True)]  # a row kept for it
