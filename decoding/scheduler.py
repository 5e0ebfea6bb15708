"""Which sequences the next forward pass carries, and how many tokens each (pure bookkeeping).

Continuous batching as vLLM and nano-vllm do it, sized for a CPU: every step is one forward
pass under a token budget (``max_batch_tokens``). Running sequences come first, oldest first:
one decode row each (plus its draft), or the next chunk of a prompt still being prefilled, so
a long prompt is cut into block-aligned chunks and never makes the others wait for its whole
prefill. The budget left admits waiting sequences, first come first served, up to
``max_running``; an admitted sequence starts from the blocks of its prompt that are already
cached (``decoding.block_manager``). When memory runs out the youngest running sequence is
preempted: its blocks are released and it waits to be recomputed (its committed blocks are
usually still cached, so recomputing costs little).

The engine owns the model; this module only counts. Sequences of one request's ``n`` choices
share their prompt: a later choice is admitted once the first one's prompt is cached, so it
takes those blocks instead of computing them again.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from decoding.block_manager import BlockManager

__all__ = ["Scheduler", "SchedulerConfig", "Sequence", "Work", "draft_budget"]


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """``max_batch_tokens``: rows per pass (decode rows, drafts and prefill chunks together);
    ``max_running``: sequences decoding at once; ``max_draft``: draft nodes per pass for the
    whole batch, shared out by ``draft_budget``."""

    max_batch_tokens: int = 256
    max_running: int = 16
    max_draft: int = 16

    def __post_init__(self) -> None:
        if self.max_batch_tokens < 1 or self.max_running < 1 or self.max_draft < 0:
            raise ValueError("need max_batch_tokens >= 1, max_running >= 1, max_draft >= 0")


def draft_budget(max_draft: int, decoding: int) -> int:
    """Draft nodes each of ``decoding`` sequences may verify in one pass.

    A pass on this CPU costs about as much for 16 rows as for 1 (the weights are read once),
    but the rows of a full batch already fill that: drafts are shared out so one pass never
    carries more than ``max_draft`` of them, and a large batch drafts nothing.

    >>> draft_budget(16, 1), draft_budget(16, 4), draft_budget(16, 32)
    (16, 4, 0)
    """
    return max_draft // max(decoding, 1)


@dataclass(eq=False, slots=True)
class Sequence:
    """One choice as the scheduler sees it. ``tokens`` is the choice's whole context (prompt,
    then output; the decoder appends to the same list); the first ``computed`` positions have
    key/value rows in ``blocks``, of which the first ``committed`` are findable by content."""

    seq_id: int
    tokens: list[int]
    prompt_len: int
    follows: Sequence | None = None  # the request's first choice, for a later one
    computed: int = 0
    committed: int = 0
    blocks: list[int] = field(default_factory=list)
    reused: int | None = None  # positions found cached at the first admission
    done: bool = False
    # Draft nodes it could use beyond its share (a draft hint's next chunk): its draft is then
    # what is left of the pass's token budget, up to this.
    wants_draft: int = 0

    @property
    def pending(self) -> int:
        """Context positions without key/value rows (fed by the next passes)."""
        return len(self.tokens) - self.computed

    @property
    def prefilling(self) -> bool:
        """Still computing its prompt (no logits wanted yet)."""
        return not self.done and self.computed < self.prompt_len - 1


@dataclass(frozen=True, slots=True)
class Work:
    """One sequence's part of the next pass: ``tokens`` of its pending positions, and up to
    ``draft`` draft nodes after them; ``samples`` when that is all of them (the pass's last
    rows then give the logits to pick from)."""

    seq: Sequence
    tokens: int
    draft: int
    samples: bool


class Scheduler:
    """Waiting and running sequences over one ``BlockManager``."""

    def __init__(self, blocks: BlockManager, config: SchedulerConfig | None = None) -> None:
        self.blocks = blocks
        self.config = config or SchedulerConfig()
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def finish(self, seq: Sequence) -> None:
        """Forget ``seq`` (finished, failed or cancelled) and release its blocks."""
        seq.done = True
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)

    def _release(self, seq: Sequence) -> None:
        """Give ``seq``'s blocks back, last first: a released prefix is then evicted from its
        tail, so its head stays findable (lookups walk from the first block)."""
        self.blocks.release(seq.blocks[::-1])
        seq.blocks, seq.computed, seq.committed = [], 0, 0

    def schedule(self) -> list[Work]:
        """The next pass's work; may preempt running sequences and admit waiting ones."""
        budget = self.config.max_batch_tokens
        work: list[Work] = []
        each = draft_budget(self.config.max_draft, len(self.running))
        admitting = bool(self.waiting) and len(self.running) < self.config.max_running
        for seq in list(self.running):
            if seq not in self.running or budget <= 0:
                continue  # preempted for an older one, or no room left this pass
            # a row each is kept for the younger ones (fewer once some were preempted)
            later = len(self.running) - self.running.index(seq) - 1
            # A prefill chunk leaves a row for each younger sequence, and half the pass for a
            # newcomer when one waits: a long prompt never holds the others off.
            room = max(budget - later, 1)
            take = self._chunk(seq, max(room // 2, 1) if admitting else room)
            want = max(each, seq.wants_draft)
            draft = max(0, min(want, budget - take - later)) if take == seq.pending else 0
            if not draft or not self._fits(seq, take + draft):  # never preempt for a draft
                draft = 0
                if not self._reserve(seq, take):
                    self._preempt(seq)
                    continue
            work.append(Work(seq, take, draft, take == seq.pending))
            budget -= take + draft
        while self.waiting and len(self.running) < self.config.max_running and budget > 0:
            seq = self.waiting[0]
            if seq.follows is not None and seq.follows.prefilling:
                break  # its prompt's blocks are being computed by the first choice
            take = self._admit(seq, budget)
            if take == 0:
                break
            self.waiting.popleft()
            self.running.append(seq)
            work.append(Work(seq, take, 0, take == seq.pending))
            budget -= take
        return work

    def commit(self, seq: Sequence) -> None:
        """Make ``seq``'s whole computed blocks findable by content."""
        size = self.blocks.block_size
        for index in range(seq.committed, seq.computed // size):
            previous = self.blocks.content_id(seq.blocks[index - 1]) if index else None
            tokens = seq.tokens[index * size : (index + 1) * size]
            self.blocks.commit(seq.blocks[index], previous, tokens)
        seq.committed = max(seq.committed, seq.computed // size)

    # ---- helpers -----------------------------------------------------------------------------

    def _chunk(self, seq: Sequence, budget: int) -> int:
        """Pending positions ``seq`` feeds within ``budget``: all of them, or a chunk that ends
        on a block boundary (so its blocks can be committed) when one fits."""
        take = min(seq.pending, budget)
        if take < seq.pending:
            aligned = take - (seq.computed + take) % self.blocks.block_size
            take = aligned if aligned > 0 else take
        return take

    def _fits(self, seq: Sequence, tokens: int) -> bool:
        """Blocks for ``seq``'s next ``tokens`` positions if they are free (no preemption)."""
        need = self.blocks.blocks_for(seq.computed + tokens) - len(seq.blocks)
        if need > 0 and not self.blocks.can_allocate(need):
            return False
        if need > 0:
            seq.blocks.extend(self.blocks.allocate(need))
        return True

    def _reserve(self, seq: Sequence, tokens: int) -> bool:
        """Blocks for ``seq``'s next ``tokens`` positions, preempting younger sequences when
        memory is short; False when even that is not enough."""
        need = self.blocks.blocks_for(seq.computed + tokens) - len(seq.blocks)
        while need > 0 and not self.blocks.can_allocate(need):
            victim = self.running[-1]
            if victim is seq:
                return False
            self._preempt(victim)
        if need > 0:
            seq.blocks.extend(self.blocks.allocate(need))
        return True

    def _admit(self, seq: Sequence, budget: int) -> int:
        """Take ``seq``'s cached prompt blocks and blocks for its first chunk; returns the
        chunk's length, 0 when memory is short (nothing is then held)."""
        limit = len(seq.tokens) - 1  # the last position is always fed, for its logits
        found = self.blocks.lookup(seq.tokens, limit)
        self.blocks.acquire(found)
        seq.blocks = list(found)
        seq.computed, seq.committed = len(found) * self.blocks.block_size, len(found)
        if seq.reused is None:
            seq.reused = seq.computed
        take = self._chunk(seq, budget)
        need = self.blocks.blocks_for(seq.computed + take) - len(seq.blocks)
        if not self.blocks.can_allocate(need):
            self._release(seq)
            return 0
        seq.blocks.extend(self.blocks.allocate(need))
        return take

    def _preempt(self, seq: Sequence) -> None:
        """Release ``seq``'s blocks and put it first in line; it is recomputed from its tokens."""
        self.running.remove(seq)
        self._release(seq)
        self.waiting.appendleft(seq)
        self.preemptions += 1
