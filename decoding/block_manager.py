"""Key/value memory in fixed-size blocks, shared by content across sequences (pure bookkeeping).

The pool's slots are cut into ``num_blocks`` blocks of ``block_size`` token positions. A
sequence holds a table of blocks, one per ``block_size`` positions of its context. A block
whose positions are all computed can be *committed* under its content: the tokens it holds and
the content of every block before it (an exact key, not a hash that could collide). A later
sequence whose prompt starts with the same tokens takes those blocks instead of computing them
(prefix sharing without copying rows): each block counts the sequences holding it, and is
written only by the one sequence that allocated it, before it is committed.

A block nobody holds any more stays findable by content until its slots are needed: freed
uncommitted blocks are reused first, then committed ones least recently released first (the
cross-request prefix cache of an agent's next turn). The scheduler asks ``can_allocate``
before it admits or grows a sequence and preempts one when memory runs out.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["BlockManager", "BlockStats"]

ContentKey = tuple[int, tuple[int, ...]]  # (content id of the previous block or -1, tokens)


@dataclass(slots=True)
class BlockStats:
    """Counts since the engine started (reported by benchmarks and ``/metrics``)."""

    lookups: int = 0
    hits: int = 0
    tokens_reused: int = 0
    evictions: int = 0


class BlockManager:
    """Allocation, reference counts and content sharing of ``num_blocks`` blocks.

    Raises
    ------
    ValueError
        If ``num_blocks`` or ``block_size`` is below 1.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(
                f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.stats = BlockStats()
        self._refs = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))  # unreferenced, holding nothing
        self._evictable: OrderedDict[int, None] = OrderedDict()  # unreferenced, committed
        self._content_of: dict[int, tuple[ContentKey, int]] = {}  # block -> (key, content id)
        # key -> (content id, blocks holding it; the first one is found by ``lookup``)
        self._by_content: dict[ContentKey, tuple[int, list[int]]] = {}
        self._ids = itertools.count()

    # ---- queries ---------------------------------------------------------------------------

    @property
    def available(self) -> int:
        """Blocks an allocation may take now (free, or committed and unreferenced)."""
        return len(self._free) + len(self._evictable)

    def blocks_for(self, tokens: int) -> int:
        """Blocks needed to hold ``tokens`` positions."""
        return -(-tokens // self.block_size)

    def can_allocate(self, blocks: int) -> bool:
        return blocks <= self.available

    def refs(self, block: int) -> int:
        return self._refs[block]

    def content_id(self, block: int) -> int | None:
        """The committed content's id of ``block`` (None: not committed)."""
        entry = self._content_of.get(block)
        return entry[1] if entry else None

    def lookup(self, tokens: Sequence[int], limit: int) -> list[int]:
        """Blocks holding the longest run of ``tokens``' whole blocks within its first
        ``limit`` positions (the caller's to ``acquire``; nothing is taken here)."""
        self.stats.lookups += 1
        found: list[int] = []
        previous = -1
        size = self.block_size
        for start in range(0, (limit // size) * size, size):
            entry = self._by_content.get((previous, tuple(tokens[start : start + size])))
            if entry is None:
                break
            previous = entry[0]
            found.append(entry[1][0])
        if found:
            self.stats.hits += 1
            self.stats.tokens_reused += len(found) * size
        return found

    # ---- changes ---------------------------------------------------------------------------

    def acquire(self, blocks: Sequence[int]) -> None:
        """Take a reference on committed ``blocks`` found by ``lookup``."""
        for block in blocks:
            if self._refs[block] == 0:
                self._evictable.pop(block, None)
            self._refs[block] += 1

    def allocate(self, count: int) -> list[int]:
        """``count`` blocks for new rows, each referenced once.

        Raises
        ------
        MemoryError
            If fewer than ``count`` are available (ask ``can_allocate`` first).
        """
        if count > self.available:
            raise MemoryError(f"{count} blocks wanted, {self.available} available")
        blocks: list[int] = []
        for _ in range(count):
            if self._free:
                block = self._free.popleft()
            else:
                block, _ = self._evictable.popitem(last=False)
                self._forget(block)
                self.stats.evictions += 1
            self._refs[block] = 1
            blocks.append(block)
        return blocks

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one reference on each of ``blocks``; an unreferenced committed block stays
        findable until its slots are needed."""
        for block in blocks:
            if self._refs[block] <= 0:
                raise ValueError(f"block {block} is not referenced")
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._content_of:
                    self._evictable[block] = None
                else:
                    self._free.append(block)

    def commit(self, block: int, previous: int | None, tokens: Sequence[int]) -> int:
        """Record that ``block`` holds the rows of ``tokens`` (a whole block) after the block
        whose content id is ``previous`` (None: the first block). Returns this content's id;
        when the same content is already committed elsewhere, that one stays the one found."""
        if len(tokens) != self.block_size:
            raise ValueError(f"a block holds {self.block_size} tokens, got {len(tokens)}")
        existing = self._content_of.get(block)
        if existing is not None:
            return existing[1]
        key: ContentKey = (-1 if previous is None else previous, tuple(tokens))
        entry = self._by_content.setdefault(key, (next(self._ids), []))
        entry[1].append(block)
        self._content_of[block] = (key, entry[0])
        return entry[0]

    def _forget(self, block: int) -> None:
        key, _ = self._content_of.pop(block)
        holders = self._by_content[key][1]
        holders.remove(block)
        if not holders:
            del self._by_content[key]
