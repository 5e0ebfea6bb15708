"""The ledger's writer: a bounded queue drained in batches by one background thread.

``record`` only enqueues, so the response path never waits on the database. A failed batch is
retried briefly, then dropped; every dropped record is counted by reason (``health()``, which
reads memory only and so works during an outage) and reported through ``on_drop``. Failed
database operations are counted and reported through ``on_failure``. Neither is ever raised.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from router.ledger.rows import task_of
from router.records import RequestRecord

log = logging.getLogger("slmgate.ledger")

#: Why records were dropped: refused by ``record`` (queue full, or the ledger closed) …
QUEUE_FULL = "queue_full"
#: … or given up by the writer (retries spent, duplicate request id, unwritten at close).
WRITE_FAILED = "write_failed"

Sink = Callable[[list[RequestRecord]], None]
OnFailure = Callable[[BaseException], None]
OnDrop = Callable[[int, str], None]


class Writer:
    """Queue + batching thread around ``sink`` (which writes one batch in one transaction and
    raises ``SQLAlchemyError`` on failure, ``IntegrityError`` for a request id already stored)."""

    def __init__(
        self,
        sink: Sink,
        *,
        queue_size: int = 10000,
        batch_size: int = 500,
        retries: int = 2,
        backoff_s: float = 0.05,
        on_failure: OnFailure | None = None,
        on_drop: OnDrop | None = None,
        gather_s: float = 0.02,
    ) -> None:
        self._sink = sink
        # How long a batch waits for more records after its first: one transaction for a busy
        # burst instead of one per request (each holds the GIL the event loop needs).
        self._gather_s = gather_s
        self._queue: queue.Queue[RequestRecord] = queue.Queue(maxsize=queue_size)
        self._batch_size = max(1, batch_size)
        self._retries = max(0, retries)
        self._backoff_s = backoff_s
        self._on_failure = on_failure
        self._on_drop = on_drop
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._pending = 0  # enqueued and not yet written or dropped
        self._pending_tasks: Counter[str] = Counter()  # the same, by task id
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._failing = False
        self.written = 0
        self.dropped_queue_full = 0
        self.dropped_write_failed = 0
        self.write_failures = 0
        self.last_error: str | None = None
        self.last_error_at: float | None = None

    # ---- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="slmgate-ledger", daemon=True)
            self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued (up to ``timeout`` seconds) and stop; the rest counts as dropped."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        deadline = time.monotonic() + timeout
        if self._thread is not None:
            self._stop.set()
            self._thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            lost, self._pending = self._pending, 0
            self._pending_tasks.clear()
            self._idle.notify_all()
        if lost:
            self._drop(lost, WRITE_FAILED)
            log.warning("ledger closed with %d unwritten records (dropped)", lost)

    # ---- the response path -------------------------------------------------------------------

    def record(self, req: RequestRecord) -> None:
        """Queue a request (with its attempts). Never blocks, never raises."""
        try:
            task = task_of(req)
            with self._lock:
                closed = self._closed
                if not closed:
                    self._pending += 1
                    self._pending_tasks[task] += 1
            if closed:
                self._drop(1, QUEUE_FULL)
                return
            try:
                self._queue.put_nowait(req)
            except queue.Full:
                self._done([req])
                self._drop(1, QUEUE_FULL)
        except Exception:  # pragma: no cover - defensive: the response path must never fail
            log.exception("ledger.record failed")

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every queued record is written or dropped; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._pending > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def is_pending(self, task_id: str) -> bool:
        """Whether a request of ``task_id`` is queued or being written right now."""
        with self._lock:
            return self._pending_tasks[task_id] > 0

    def health(self) -> dict[str, Any]:
        """Counters from memory only (never the database), so they read during an outage.

        ``dropped`` = ``dropped_queue_full`` (refused by ``record``: queue full, or the ledger
        closed) + ``dropped_write_failed`` (given up after retries, duplicates, or unwritten at
        close). ``write_failures`` counts failed database operations (each retry counts).
        """
        with self._lock:
            return {
                "ok": not self._failing,
                "queued": self._pending,
                "written": self.written,
                "dropped": self.dropped_queue_full + self.dropped_write_failed,
                "dropped_queue_full": self.dropped_queue_full,
                "dropped_write_failed": self.dropped_write_failed,
                "write_failures": self.write_failures,
                "last_error": self.last_error,
                "last_error_at": self.last_error_at,
            }

    # ---- bookkeeping -------------------------------------------------------------------------

    def note_failure(self, exc: BaseException, doing: str) -> None:
        """Count a failed database operation, log the first of a run, tell ``on_failure``."""
        with self._lock:
            self.write_failures += 1
            self.last_error = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
            self.last_error_at = time.time()
            first = not self._failing
            self._failing = True
        if first:
            log.warning("ledger database error while %s: %s", doing, self.last_error)
        else:
            log.debug("ledger database still failing: %s", self.last_error)
        _call(self._on_failure, "on_failure", exc)

    def _note_success(self, n: int) -> None:
        with self._lock:
            self.written += n
            recovered = self._failing
            self._failing = False
        if recovered:
            log.warning("ledger database writes recovered")

    def _drop(self, n: int, reason: str) -> None:
        """Count ``n`` dropped records and tell ``on_drop`` (outside the lock)."""
        with self._lock:
            if reason == QUEUE_FULL:
                self.dropped_queue_full += n
            else:
                self.dropped_write_failed += n
        _call(self._on_drop, "on_drop", n, reason)

    def _done(self, records: Iterable[RequestRecord]) -> None:
        """Records written or dropped: no longer pending."""
        with self._lock:
            for req in records:
                self._pending -= 1
                task = task_of(req)
                self._pending_tasks[task] -= 1
                if self._pending_tasks[task] <= 0:
                    del self._pending_tasks[task]
            self._idle.notify_all()

    # ---- the thread --------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                first = self._queue.get(timeout=0.05)
            except queue.Empty:
                if self._stop.is_set():
                    return
                continue
            batch = [first]
            deadline = time.monotonic() + self._gather_s
            while len(batch) < self._batch_size:
                wait = deadline - time.monotonic()
                try:
                    if wait <= 0 or self._stop.is_set():
                        batch.append(self._queue.get_nowait())
                    else:
                        batch.append(self._queue.get(timeout=wait))
                except queue.Empty:
                    break
            try:
                self._write_with_retry(batch)
            except Exception as exc:  # pragma: no cover - a bug must not kill the writer
                log.exception("ledger writer bug; batch dropped")
                self.note_failure(exc, "writing")
                self._drop(len(batch), WRITE_FAILED)
            self._done(batch)

    def _write_with_retry(self, batch: list[RequestRecord]) -> None:
        unique: dict[str, RequestRecord] = {}
        for req in batch:
            unique.setdefault(req.request_id, req)
        if len(unique) < len(batch):
            self._drop(len(batch) - len(unique), WRITE_FAILED)
            log.warning("ledger: %d duplicate request ids dropped", len(batch) - len(unique))
        records = list(unique.values())
        for attempt in range(self._retries + 1):
            try:
                self._sink(records)
            except IntegrityError as exc:  # a request id already stored: write the rest singly
                self.note_failure(exc, "writing")
                self._write_singly(records)
                return
            except SQLAlchemyError as exc:
                self.note_failure(exc, "writing")
                if attempt < self._retries:
                    time.sleep(self._backoff_s * 4**attempt)
                continue
            self._note_success(len(records))
            return
        self._drop(len(records), WRITE_FAILED)
        tries = self._retries + 1
        log.warning("ledger: dropped a batch of %d records after %d tries", len(records), tries)

    def _write_singly(self, records: list[RequestRecord]) -> None:
        for req in records:
            try:
                self._sink([req])
            except SQLAlchemyError as exc:
                self.note_failure(exc, "writing")
                self._drop(1, WRITE_FAILED)
            else:
                self._note_success(1)


def _call(callback: Callable[..., None] | None, name: str, *args: Any) -> None:
    """A caller's hook must not break the writer: its errors are logged and swallowed."""
    if callback is None:
        return
    try:
        callback(*args)
    except Exception:
        log.exception("ledger %s callback raised", name)
