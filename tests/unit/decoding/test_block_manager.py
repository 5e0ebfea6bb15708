"""BlockManager: allocation order, reference counts, content keys and LRU reuse (no model)."""

from __future__ import annotations

import pytest

from decoding.block_manager import BlockManager, BlockStats


def committed_chain(manager: BlockManager, chunks: list[list[int]]) -> list[int]:
    """Allocate one block per chunk and commit them as one sequence's prefix, in order."""
    blocks = manager.allocate(len(chunks))
    previous: int | None = None
    for block, chunk in zip(blocks, chunks, strict=True):
        previous = manager.commit(block, previous, chunk)
    return blocks


def test_rejects_an_empty_pool() -> None:
    """A pool needs at least one block of at least one position."""
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(0, 4)
    with pytest.raises(ValueError, match="block_size"):
        BlockManager(4, 0)


def test_allocates_in_order_until_exhausted() -> None:
    """Fresh blocks come out lowest id first; asking for more than is left raises."""
    manager = BlockManager(3, 4)
    assert [manager.blocks_for(n) for n in (0, 1, 4, 5, 9)] == [0, 1, 1, 2, 3]
    assert manager.allocate(2) == [0, 1]
    assert manager.allocate(1) == [2]
    assert [manager.refs(b) for b in range(3)] == [1, 1, 1]
    assert manager.available == 0
    assert manager.can_allocate(0)
    assert not manager.can_allocate(1)
    with pytest.raises(MemoryError, match="1 blocks wanted, 0 available"):
        manager.allocate(1)


def test_released_uncommitted_blocks_go_back_to_the_free_list() -> None:
    """Uncommitted blocks return to the free list in release order, behind untouched ones."""
    manager = BlockManager(4, 2)
    assert manager.allocate(3) == [0, 1, 2]
    manager.release([2])
    manager.release([0])
    assert manager.available == 3
    assert (manager.refs(0), manager.refs(1), manager.refs(2)) == (0, 1, 0)
    assert manager.allocate(3) == [3, 2, 0]
    assert manager.stats.evictions == 0


def test_released_committed_block_is_found_and_reused_only_after_free_blocks() -> None:
    """A committed block nobody holds stays findable until the free blocks run out; once
    handed out again its content is forgotten."""
    manager = BlockManager(3, 2)
    [block] = committed_chain(manager, [[1, 2]])
    manager.release([block])
    assert manager.available == 3
    assert manager.lookup([1, 2, 3], 3) == [0]
    assert manager.allocate(2) == [1, 2]
    assert manager.lookup([1, 2, 3], 3) == [0]
    assert manager.allocate(1) == [0]
    assert manager.stats.evictions == 1
    assert manager.content_id(0) is None
    assert manager.lookup([1, 2, 3], 3) == []


def test_committed_blocks_are_reused_least_recently_released_first() -> None:
    """Among evictable blocks the one released first is evicted first."""
    manager = BlockManager(2, 2)
    first = manager.allocate(2)
    manager.commit(first[0], None, [1, 2])
    manager.commit(first[1], None, [3, 4])
    manager.release([1])
    manager.release([0])
    assert manager.allocate(1) == [1]
    assert manager.lookup([3, 4, 0], 3) == []
    assert manager.lookup([1, 2, 0], 3) == [0]


def test_acquire_takes_a_released_committed_block_out_of_the_evictable_set() -> None:
    """A block taken back by ``acquire`` is held again: ``allocate`` must not hand it out."""
    manager = BlockManager(3, 2)
    committed_chain(manager, [[1, 2]])
    manager.release([0])
    found = manager.lookup([1, 2, 3], 3)
    assert found == [0]
    manager.acquire(found)
    assert manager.refs(0) == 1
    assert manager.available == 2
    assert manager.allocate(2) == [1, 2]
    with pytest.raises(MemoryError):
        manager.allocate(1)
    manager.release([0])
    assert manager.available == 1
    assert manager.lookup([1, 2], 2) == [0]


def test_a_block_with_two_holders_stays_held_until_both_release() -> None:
    """Reference counts: the first release of a shared block frees nothing."""
    manager = BlockManager(2, 2)
    committed_chain(manager, [[1, 2]])
    manager.acquire([0])
    assert manager.refs(0) == 2
    manager.release([0])
    assert manager.refs(0) == 1
    assert manager.available == 1
    assert manager.allocate(1) == [1]
    with pytest.raises(MemoryError):
        manager.allocate(1)
    manager.release([0])
    assert manager.refs(0) == 0
    assert manager.available == 1


def test_releasing_an_unreferenced_block_raises() -> None:
    """A double release is a caller bug, not a silent negative count."""
    manager = BlockManager(2, 2)
    with pytest.raises(ValueError, match="block 1 is not referenced"):
        manager.release([1])
    manager.allocate(1)
    manager.release([0])
    with pytest.raises(ValueError, match="block 0 is not referenced"):
        manager.release([0])
    assert manager.refs(0) == 0


def test_lookup_finds_whole_blocks_within_the_limit_only() -> None:
    """Only whole blocks inside the first ``limit`` positions count, and the run stops at
    the first block that differs."""
    manager = BlockManager(4, 2)
    assert committed_chain(manager, [[1, 2], [3, 4], [5, 6]]) == [0, 1, 2]
    tokens = [1, 2, 3, 4, 5, 6, 7]
    assert manager.lookup(tokens, 7) == [0, 1, 2]
    assert manager.lookup(tokens, 6) == [0, 1, 2]
    assert manager.lookup(tokens, 5) == [0, 1]
    assert manager.lookup(tokens, 1) == []
    assert manager.lookup([1, 2, 3], 3) == [0]  # the partial second block never matches
    assert manager.lookup([1, 2, 3, 4], 100) == [0, 1]
    assert manager.lookup([1, 2, 9, 4, 5, 6], 6) == [0]
    assert manager.lookup([9, 2, 3, 4], 4) == []


def test_keys_chain_on_the_previous_block() -> None:
    """The same tokens after a different previous block are different content."""
    manager = BlockManager(4, 2)
    assert committed_chain(manager, [[1, 2], [3, 4]]) == [0, 1]
    assert committed_chain(manager, [[5, 6], [3, 4]]) == [2, 3]
    assert manager.content_id(1) != manager.content_id(3)
    assert manager.lookup([5, 6, 3, 4], 4) == [2, 3]
    assert manager.lookup([1, 2, 3, 4], 4) == [0, 1]
    assert manager.lookup([7, 8, 3, 4], 4) == []
    assert manager.lookup([3, 4], 2) == []  # [3, 4] was only ever a second block


def test_same_content_in_two_blocks_survives_eviction_of_one() -> None:
    """Equal content gets one id; the block found is the first committed, and the other
    copy is found once that one is evicted."""
    manager = BlockManager(2, 2)
    manager.allocate(2)
    content = manager.commit(0, None, [1, 2])
    assert manager.commit(1, None, [1, 2]) == content
    assert manager.lookup([1, 2, 3], 3) == [0]
    manager.release([0])
    assert manager.allocate(1) == [0]
    assert manager.stats.evictions == 1
    assert manager.lookup([1, 2, 3], 3) == [1]
    assert manager.content_id(1) == content


def test_commit_checks_the_length_and_keeps_the_first_content() -> None:
    """A block holds exactly ``block_size`` tokens; committing it again changes nothing."""
    manager = BlockManager(2, 2)
    manager.allocate(1)
    for tokens in ([1], [1, 2, 3]):
        with pytest.raises(ValueError, match="a block holds 2 tokens"):
            manager.commit(0, None, tokens)
    assert manager.content_id(0) is None
    content = manager.commit(0, None, [1, 2])
    assert manager.commit(0, None, [3, 4]) == content
    assert manager.lookup([3, 4], 2) == []
    assert manager.lookup([1, 2], 2) == [0]


def test_stats_count_lookups_hits_reused_tokens_and_evictions() -> None:
    """``stats`` counts every lookup, the ones that found something, the positions they
    found, and committed blocks handed out again."""
    manager = BlockManager(3, 2)
    committed_chain(manager, [[1, 2], [3, 4]])
    assert manager.lookup([1, 2, 3, 4, 5], 5) == [0, 1]
    assert manager.lookup([9, 9], 2) == []
    assert manager.lookup([1, 2, 9, 9], 4) == [0]
    manager.release([0, 1])
    assert manager.allocate(2) == [2, 0]
    assert manager.stats == BlockStats(lookups=3, hits=2, tokens_reused=6, evictions=1)
