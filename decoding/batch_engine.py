"""The embedded engine's batched loop: one forward pass per step over every sequence.

The loop's steps run on the process's batch driver thread (``decoding.batch_driver``: one
thread for every engine, so torch's CPU work has one OpenMP team). Requests arrive from any
thread (``submit``); each choice becomes a ``Sequence`` for the
scheduler and a ``ChoiceDecoder`` for its tokens. A step is: schedule (admit, chunk, preempt)
→ draft for the sequences that sample → one ``run_batch`` pass → walk each sampling
sequence's rows → keep accepted draft rows, commit whole blocks → send each request its
events. Cancellation (client gone, timeout) is read at every step and frees the sequence's
blocks; an error in one sequence fails its request only.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from decoding.backend import FinishEvent
from decoding.batch_driver import BatchDriver, shared_driver
from decoding.block_manager import BlockManager
from decoding.choice import ChoiceDecoder
from decoding.paged import KVPool, SequencePass, block_slots, run_batch
from decoding.scheduler import Scheduler, SchedulerConfig, Sequence, Work
from decoding.types import TokenEvent
from schemas.errors import GenerationCancelled
from spec.draft import Draft

if TYPE_CHECKING:
    from decoding.engine import EmbeddedEngine, PreparedRequest

log = logging.getLogger(__name__)

__all__ = ["BatchConfig", "BatchLoop"]

Sink = Callable[[TokenEvent | FinishEvent | BaseException | None], None]


@dataclass(frozen=True, slots=True)
class BatchConfig:
    """``kv_cache_mb``: key/value memory, or ``kv_cache_tokens`` positions when set (tests);
    a request must fit in it alone (``capacity``, checked when it is prepared);
    ``block_size``: positions per block; the rest is ``SchedulerConfig``."""

    kv_cache_mb: int = 1024
    kv_cache_tokens: int | None = None
    block_size: int = 16
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)


@dataclass(eq=False, slots=True)
class _Request:
    """One submitted request: its choices and where their events go (``None`` ends it)."""

    sink: Sink
    cancel: threading.Event
    open: int  # choices not yet finished
    failed: bool = False

    def send(self, item: TokenEvent | FinishEvent | BaseException | None) -> None:
        """Hand ``item`` to the consumer; one that is gone (its event loop closed) cancels the
        request instead of failing the loop."""
        try:
            self.sink(item)
        except Exception:
            self.cancel.set()


class BatchLoop:
    """Serves one engine's requests, many sequences per pass, on the batch driver's thread."""

    def __init__(
        self, engine: EmbeddedEngine, config: BatchConfig, driver: BatchDriver | None = None
    ) -> None:
        self.engine = engine
        model = engine.model
        slots = config.kv_cache_tokens or config.kv_cache_mb * 2**20 // KVPool.bytes_per_token(
            model
        )
        self.blocks = BlockManager(-(-slots // config.block_size), config.block_size)
        self.pool = KVPool(model, self.blocks.num_blocks * config.block_size)
        self.scheduler = Scheduler(self.blocks, config.scheduler)
        # The longest context one sequence may reach (its last position needs no row).
        self.capacity = self.pool.num_slots
        self._decoders: dict[Sequence, tuple[ChoiceDecoder, _Request]] = {}
        self._inbox: list[tuple[PreparedRequest, _Request]] = []
        self._ids = itertools.count()
        self._driver = driver or shared_driver()
        self._cond = self._driver.cond
        self._closed = False
        self._driver.add(self)

    # ---- from any thread -----------------------------------------------------------------------

    def submit(self, prepared: PreparedRequest, cancel: threading.Event, sink: Sink) -> None:
        """Queue ``prepared``'s choices; their events go to ``sink`` (from the loop's thread),
        then ``None``; an error goes to ``sink`` as the exception, then ``None``."""
        request = _Request(sink, cancel, prepared.request.params.n)
        with self._cond:
            if self._closed:
                raise RuntimeError("the engine is closed")
            self._inbox.append((prepared, request))
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    # ---- the driver's thread (decoding.batch_driver) ------------------------------------------

    def ready(self) -> bool:
        return bool(self._inbox) or not self.scheduler.idle or self._closed

    def turn(self) -> tuple[bool, bool]:
        """Take the arrivals and run one step; returns (progress, done). A closed loop fails
        whatever it still holds and is done."""
        with self._cond:
            closed = self._closed
            arrivals, self._inbox = self._inbox, []
        if closed:
            for _, request in arrivals:
                request.send(RuntimeError("the engine was closed"))
                request.send(None)
            self._fail_all(RuntimeError("the engine was closed"))
            return True, True
        try:
            for prepared, request in arrivals:
                self._add(prepared, request)
            self._drop_cancelled()
            work = self.scheduler.schedule()
            if not work:  # nothing fits now (cannot last: running sequences always get rows)
                return bool(arrivals), False
            self._step(work)
        except Exception as exc:  # a bug in the loop: fail everyone, keep serving
            log.exception("batch step failed")
            self._fail_all(exc)
        return True, False

    def _fail_all(self, exc: BaseException) -> None:
        """End every request with ``exc``; nothing here may stop the loop's thread."""
        for seq in list(self._decoders):
            try:
                self._fail(seq, exc)
            except Exception:
                log.exception("could not end a sequence")
                self._decoders.pop(seq, None)

    def _add(self, prepared: PreparedRequest, request: _Request) -> None:
        first: Sequence | None = None
        for index in range(prepared.request.params.n):
            decoder = self.engine.decoder(prepared, index)
            seq = Sequence(next(self._ids), decoder.context, len(prepared.prompt_ids), first)
            seq.wants_draft = decoder.wants_draft
            first = first or seq
            self._decoders[seq] = (decoder, request)
            self.scheduler.add(seq)

    def _drop_cancelled(self) -> None:
        for seq, (_, request) in list(self._decoders.items()):
            if request.cancel.is_set():
                self._fail(seq, GenerationCancelled("generation cancelled: the client went away"))

    def _step(self, work: list[Work]) -> None:
        """One pass: drafts, the forward, the walks."""
        drafts: list[Draft] = []
        passes: list[SequencePass] = []
        for item in work:
            seq = item.seq
            decoder = self._decoders[seq][0]
            draft = decoder.draft(item.draft) if item.samples else Draft.empty()
            ids = seq.tokens[seq.computed : seq.computed + item.tokens] + list(draft.token_ids)
            logits = 1 + len(draft) if item.samples else 0
            slots = block_slots(seq.blocks, self.blocks.block_size, seq.computed + len(ids))
            passes.append(SequencePass(ids, seq.computed, slots, draft.parents, logits))
            drafts.append(draft)
        started = time.perf_counter()
        with torch.inference_mode():
            rows = run_batch(self.engine.model, self.pool, passes)
        share = (time.perf_counter() - started) / sum(len(p.ids) for p in passes)
        for item, fed, found, draft in zip(work, passes, rows, drafts, strict=True):
            seq = item.seq
            if seq not in self._decoders:
                continue  # failed with another choice of its request during this step
            decoder, request = self._decoders[seq]
            decoder.compute_s += share * len(fed.ids)
            seq.computed += item.tokens
            if seq.reused is not None:
                decoder.reused = seq.reused
            if not item.samples:
                self.scheduler.commit(seq)
                continue
            try:
                walked = decoder.walk(found, draft)
            except Exception as exc:
                self._fail(seq, exc)
                continue
            self._keep(seq, fed.slots, walked.accepted)
            seq.wants_draft = decoder.wants_draft
            self.scheduler.commit(seq)
            for event in walked.events:
                request.send(event)
            if walked.finished:
                self._end(seq)

    def _keep(self, seq: Sequence, slots: torch.Tensor, accepted: list[int]) -> None:
        """Move the accepted draft nodes' rows to the positions after the fed tokens (``slots``:
        the pass's slots of every position it fed, drafts included)."""
        base = seq.computed
        moves = [(int(slots[base + node]), int(slots[base + depth]))
                 for depth, node in enumerate(accepted)]  # fmt: skip
        moved = [(src, dst) for src, dst in moves if src != dst]
        self.pool.copy_rows([s for s, _ in moved], [d for _, d in moved])
        seq.computed += len(accepted)

    def _end(self, seq: Sequence) -> None:
        decoder, request = self._decoders.pop(seq)
        decoder.close()
        self.scheduler.finish(seq)
        request.open -= 1
        if request.open == 0 and not request.failed:
            request.send(None)

    def _fail(self, seq: Sequence, exc: BaseException) -> None:
        """End ``seq``'s request with ``exc`` (its other choices are dropped too); a choice
        already ended with a sibling is left alone."""
        if seq not in self._decoders:
            return
        decoder, request = self._decoders.pop(seq)
        decoder.close()
        self.scheduler.finish(seq)
        if not request.failed:
            request.failed = True
            request.send(exc)
            request.send(None)
        for other, (_, owner) in list(self._decoders.items()):
            if owner is request:
                self._fail(other, exc)
