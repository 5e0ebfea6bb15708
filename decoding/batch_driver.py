"""One thread runs every embedded engine's batch loop: torch's CPU work stays on one thread.

torch's CPU kernels run their parallel regions on an OpenMP team that belongs to the thread that
started them, and it stays alive with that thread. GNU OpenMP counts the threads of every live
team; once there are more than cores it stops spinning between regions, so every region of a
decode pass (hundreds per token) pays a sleep and a wake-up. Measured while profiling on the
2-core machine (SmolLM2-135M, bf16, one stream, ad-hoc timing of ``run_batch``): a forward pass
took 97 ms on an engine thread of its own while another thread's team was alive (the one that
loaded the model), 56 ms once no other team was; ``slmgate bench decode``'s ``/team`` arms
reproduce the comparison end to end (BENCHMARKS.md, "Single-stream decode"). So the engines
of a process share one driver thread (each loop takes one step per round, round robin), models
are loaded on short-lived threads (``decoding.models.load_engine``), and on two cores two
models' passes no longer fight for them: they alternate.
"""

from __future__ import annotations

import threading
from typing import Protocol

__all__ = ["BatchDriver", "DrivenLoop", "shared_driver"]


class DrivenLoop(Protocol):
    """What the driver needs from a batch loop (``decoding.batch_engine.BatchLoop``)."""

    def ready(self) -> bool:
        """Whether the loop has arrivals, running sequences or a close to act on (called with
        the driver's lock held)."""
        ...

    def turn(self) -> tuple[bool, bool]:
        """One step; returns (whether it made progress, whether the loop is done)."""
        ...


class BatchDriver:
    """Runs its loops' steps on one daemon thread, started with the first loop."""

    def __init__(self, name: str = "slmgate-batch") -> None:
        self.cond = threading.Condition()
        self._loops: list[DrivenLoop] = []
        self._name = name
        self._thread: threading.Thread | None = None

    def add(self, loop: DrivenLoop) -> None:
        with self.cond:
            self._loops.append(loop)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self.cond.notify()

    def _run(self) -> None:
        while True:
            with self.cond:
                while not (ready := [loop for loop in self._loops if loop.ready()]):
                    self.cond.wait()
            progressed = False
            for loop in ready:
                moved, done = loop.turn()
                progressed = progressed or moved
                if done:
                    with self.cond:
                        self._loops.remove(loop)
            if not progressed:  # nothing fits now in any loop (cannot last): do not spin
                with self.cond:
                    self.cond.wait(timeout=0.01)


_SHARED: BatchDriver | None = None
_SHARED_LOCK = threading.Lock()


def shared_driver() -> BatchDriver:
    """The process's driver (every engine's loop runs on its thread)."""
    global _SHARED
    with _SHARED_LOCK:
        if _SHARED is None:
            _SHARED = BatchDriver()
        return _SHARED
