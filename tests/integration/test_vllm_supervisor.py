"""The supervisor of launched vLLM servers, on a stand-in server process (tests/integration/
health_server.py): ready only once healthy, restarted after a crash, killed and restarted when
hung, backoff in a crash loop, and the whole process group gone after ``stop``. The same
supervisor against a real vLLM: tests/integration/test_vllm_real.py."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from decoding.vllm_launch import LaunchSpec, ServerState, VllmSupervisor

ROOT = Path(__file__).resolve().parents[2]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped) is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def eventually(check: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)


def launch(tmp_path: Path, *args: str, **kw: float) -> VllmSupervisor:
    spec = LaunchSpec(
        model=str(tmp_path), python=sys.executable, module="tests.integration.health_server",
        args=("--pidfile", str(tmp_path / "pids"), *args), env={"PYTHONPATH": str(ROOT)},
        log_file=str(tmp_path / "server.log"), **kw,
    )  # fmt: skip
    return VllmSupervisor("stand-in", spec, str(tmp_path), "stand-in", poll_s=0.05)


def pids(tmp_path: Path) -> tuple[int, int]:
    eventually(lambda: (tmp_path / "pids").exists() and bool((tmp_path / "pids").read_text()))
    own, child = (tmp_path / "pids").read_text().split()
    return int(own), int(child)


def test_ready_crash_restart_hang_restart_and_stop(tmp_path: Path) -> None:
    sup = launch(tmp_path, restart_backoff_s=0.1, unhealthy_restart_s=1.0)
    sup.start()
    try:
        assert sup.wait_ready(30)
        assert sup.state is ServerState.READY
        first, first_child = pids(tmp_path)
        assert sup.pid == first

        (tmp_path / "pids").unlink()
        os.kill(first, signal.SIGKILL)  # a crash
        eventually(lambda: sup.restarts == 1 and sup.state is ServerState.READY)
        assert sup.last_exit == -signal.SIGKILL
        second, _ = pids(tmp_path)
        assert second != first
        assert not alive(first_child)  # the crashed server's group went with it

        (tmp_path / "pids").unlink()
        os.kill(second, signal.SIGSTOP)  # a hang: alive, no answers
        eventually(lambda: sup.state is ServerState.UNHEALTHY, 5)
        eventually(lambda: sup.restarts == 2 and sup.state is ServerState.READY)
        assert not alive(second)
        third, third_child = pids(tmp_path)
    finally:
        sup.stop(grace_s=5)
    assert sup.state is ServerState.STOPPED
    eventually(lambda: not alive(third) and not alive(third_child), 10)


def test_crash_loop_backs_off_and_never_turns_ready(tmp_path: Path) -> None:
    sup = launch(tmp_path, "--exit-at-once", restart_backoff_s=0.2, restart_backoff_max_s=10.0)
    sup.start()
    try:
        assert not sup.wait_ready(2.5)
        # waits of 0.2, 0.4, 0.8, 1.6 s: at most 4 restarts in 2.5 s (not one per poll)
        assert 2 <= sup.restarts <= 4
        assert sup.last_exit == 3
        assert sup.state in (ServerState.RESTARTING, ServerState.STARTING)
    finally:
        sup.stop()
    assert sup.state is ServerState.STOPPED


@pytest.mark.parametrize("grace_s", [0.0, 5.0])
def test_stop_takes_the_process_group(tmp_path: Path, grace_s: float) -> None:
    sup = launch(tmp_path)
    sup.start()
    assert sup.wait_ready(30)
    own, child = pids(tmp_path)
    sup.stop(grace_s=grace_s)
    eventually(lambda: not alive(own) and not alive(child), 10)
