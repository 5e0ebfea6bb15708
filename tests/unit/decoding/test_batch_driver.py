"""The batch driver (decoding.batch_driver): every loop's steps run on its one thread, loops
with work take turns, a done loop leaves, and an idle driver waits instead of spinning."""

from __future__ import annotations

import threading
import time

from decoding.batch_driver import BatchDriver


class _Loop:
    """A loop with ``steps`` steps of work; records which thread ran each."""

    def __init__(self, driver: BatchDriver, name: str, steps: int, log: list[str]) -> None:
        self.driver, self.name, self.left, self.log = driver, name, steps, log
        self.threads: set[str] = set()
        self.turns = 0
        self.done = threading.Event()

    def ready(self) -> bool:
        return self.left > 0

    def turn(self) -> tuple[bool, bool]:
        self.turns += 1
        self.threads.add(threading.current_thread().name)
        self.log.append(self.name)
        self.left -= 1
        if self.left == 0:
            self.done.set()
        return True, self.left == 0


def test_loops_take_turns_on_one_thread() -> None:
    driver = BatchDriver(name="test-driver")
    log: list[str] = []
    with driver.cond:  # both join before the driver runs anything
        a = _Loop(driver, "a", 3, log)
        b = _Loop(driver, "b", 2, log)
        driver.add(a)
        driver.add(b)
    assert a.done.wait(5)
    assert b.done.wait(5)
    assert log == ["a", "b", "a", "b", "a"]
    assert a.threads == b.threads == {"test-driver"}


def test_a_done_loop_leaves_and_an_idle_driver_sleeps() -> None:
    driver = BatchDriver(name="test-driver-2")
    log: list[str] = []
    first = _Loop(driver, "first", 1, log)
    driver.add(first)
    assert first.done.wait(5)
    time.sleep(0.05)  # idle: nothing is ready, so no turn is taken
    assert first.turns == 1
    second = _Loop(driver, "second", 2, log)
    driver.add(second)
    assert second.done.wait(5)
    assert log == ["first", "second", "second"]


class _Stuck:
    """Ready but unable to progress (its work does not fit yet) for a while."""

    def __init__(self) -> None:
        self.turns = 0
        self.freed = threading.Event()

    def ready(self) -> bool:
        return not self.freed.is_set()

    def turn(self) -> tuple[bool, bool]:
        self.turns += 1
        return False, False


def test_a_loop_that_cannot_progress_is_retried_without_spinning() -> None:
    driver = BatchDriver(name="test-driver-3")
    stuck = _Stuck()
    driver.add(stuck)
    time.sleep(0.2)
    stuck.freed.set()
    # one retry per ~10 ms wait, not thousands of turns
    assert 1 <= stuck.turns <= 40
