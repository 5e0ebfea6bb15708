"""Gateway overhead (``slmgate bench gateway``): what the gateway itself adds to a request, seen
against an instant OpenAI-compatible upstream, next to the LiteLLM proxy, in one run.

The benchmark starts a fake upstream (``benchmarks.soak_upstream.FakeUpstream`` with no fault
and no latency, in its own process) and, each in its own process, the servers in front of it:

- ``direct``: the upstream itself (the floor: client + loopback + a trivial JSON answer);
- ``slmgate ledger=off``, ``ledger=sqlite`` (the default ledger: a SQLite file in the cache
  directory, here a temporary one) and ``ledger=postgres`` (``SLMGATE_LEDGER_URL``; skipped when
  PostgreSQL does not answer): ``slmgate serve`` with one ``kind: openai`` model on the upstream
  and no route but the model itself, an API key configured and sent as ``Authorization: Bearer``;
- ``litellm proxy`` (when its proxy extras import, see ``--litellm-python``): one worker, a
  master key, one ``openai/`` model on the upstream;
- ``slmgate x3 replicas``: three ``slmgate serve`` on a shared PostgreSQL ledger (SQLite files
  of their own without PostgreSQL), the client spreading requests round robin over them;
- with ``--fast-python PATH`` (an interpreter with uvloop and httptools, which ``slmgate serve``
  then picks up): ``slmgate ledger=sqlite`` once more on that interpreter.

The load (``benchmarks.http_load``, its own process: raw asyncio keep-alive HTTP/1.1) sends
non-streaming chat completions (one short user message, ``max_tokens`` 8) with 1 and 8
connections (``--connections``), ``--requests`` per arm after ``--warmup`` uncounted ones. Arms
run one at a time, never together, in a rotated order over ``--rounds`` rounds; the table shows
medians over rounds. A non-200 answer is an error; an arm with errors is flagged.

Targets printed next to the table: the default ledger adds at most 1 ms p50 at 1 connection;
slmgate serves at least 4x the LiteLLM proxy's requests/s.

    slmgate bench gateway --rounds 3 --json gateway.json
    slmgate bench gateway --litellm-python /venv-litellm/bin/python --fast-python /venv/bin/python

``--py-spy OUT`` attaches ``py-spy record --gil`` to the ``ledger=sqlite`` server (raw collapsed
stacks to OUT, the thread holding the GIL only: Python CPU time, writer thread included): a
profile, not a measurement (sampling slows that arm). LiteLLM's proxy extras pull in uvloop and
httptools, which its uvicorn then uses; ``slmgate serve`` uses them too where installed (the
notes under the table name each server's stack).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from benchmarks.host import host_info

ROOT = Path(__file__).resolve().parents[1]
MODEL = "fake"  # the model name requests use: slmgate's model, LiteLLM's model_name
DEFAULT_POSTGRES = "postgresql+psycopg://127.0.0.1:5432/test"
TARGET_ADDED_P50_MS = 1.0  # the default ledger, 1 connection
TARGET_LITELLM_RATIO = 4.0  # slmgate requests/s over the LiteLLM proxy's
ARM_KEYS = ("direct", "off", "sqlite", "postgres", "fast", "litellm", "replicas")
SERVE_PACKAGES = ("uvicorn", "fastapi", "starlette", "h11", "httptools", "uvloop")


@dataclass
class Arm:
    key: str
    name: str
    urls: list[str] = field(default_factory=list)
    headers: list[tuple[str, str]] = field(default_factory=list)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)
    skipped: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    runs: dict[int, list[dict[str, Any]]] = field(default_factory=dict)  # connections -> rounds


# ---- processes -------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(path: Path, chars: int = 2000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def _spawn(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, **(env or {})})  # fmt: skip


def _stop(proc: subprocess.Popen[bytes], timeout: float = 20.0, signalled: bool = False) -> None:
    """SIGINT (a graceful stop: the ledger flushes; not twice, uvicorn would force its exit),
    then SIGKILL."""
    if proc.poll() is not None:
        return
    if not signalled:
        proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _http_status(url: str, headers: list[tuple[str, str]]) -> int | None:
    request = urllib.request.Request(url, headers=dict(headers))
    try:
        with urllib.request.urlopen(request, timeout=3) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (OSError, ValueError):
        return None


def _failure_line(log: Path) -> str:
    """The most telling line of a server's log: an import or config error, else the last."""
    lines = [line.strip() for line in _tail(log, 20000).splitlines() if line.strip()]
    for marker in ("Missing dependency", "ImportError", "ModuleNotFoundError", "invalid config"):
        found = [line for line in lines if marker in line]
        if found:
            return found[-1][:300]
    return lines[-1][:300] if lines else "no output"


def _wait_ready(arm: Arm, path: str, timeout: float, any_status: bool = False) -> None:
    """Wait until every server of ``arm`` answers ``path`` (200, or any status); on failure
    set ``arm.skipped``."""
    deadline = time.monotonic() + timeout
    pending = list(zip(arm.urls, arm.procs, arm.logs, strict=True))
    while pending and time.monotonic() < deadline:
        url, proc, log = pending[0]
        if proc.poll() is not None:
            arm.skipped = f"exited ({proc.returncode}): {_failure_line(log)}"
            return
        root = url.split("/v1/", 1)[0]
        status = _http_status(root + path, arm.headers)
        if status is not None and (any_status or status == 200):
            pending.pop(0)
            continue
        time.sleep(0.25)
    if pending:
        arm.skipped = f"not ready within {timeout:g} s: {_failure_line(pending[0][2])}"


def _versions(python: str, packages: tuple[str, ...]) -> dict[str, str | None]:
    """Installed versions of ``packages`` as ``python`` sees them (None: not installed)."""
    code = (
        "import json, sys\nfrom importlib.metadata import version, PackageNotFoundError\n"
        "out = {}\nfor p in sys.argv[1:]:\n    try:\n        out[p] = version(p)\n"
        "    except PackageNotFoundError:\n        out[p] = None\nprint(json.dumps(out))"
    )
    try:
        done = subprocess.run([python, "-c", code, *packages], capture_output=True, text=True,
                              timeout=60, check=True)  # fmt: skip
        result: dict[str, str | None] = json.loads(done.stdout.strip().splitlines()[-1])
        return result
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return dict.fromkeys(packages)


def postgres_unreachable(url: str) -> str | None:
    """None when the PostgreSQL behind a SQLAlchemy-style ``url`` accepts a connection, else
    why not (one line)."""
    try:
        import psycopg
    except ImportError:
        return "psycopg is not installed (pip install 'psycopg[binary]')"
    dsn = url.replace("postgresql+psycopg://", "postgresql://", 1)
    try:
        with psycopg.connect(dsn, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except Exception as exc:  # any driver error: the arm is skipped, with the reason
        return f"PostgreSQL not reachable at {url}: {str(exc).strip().splitlines()[0][:200]}"
    return None


# ---- configs -----------------------------------------------------------------------------------


def slmgate_config(
    upstream_port: int, api_key: str, ledger: str, cache_dir: Path
) -> dict[str, Any]:
    """One ``kind: openai`` model on the upstream, no routes beyond it, one API key. ``ledger``:
    ``off``, ``sqlite`` (the default: a file in ``cache_dir``) or ``env`` (the URL comes from
    ``SLMGATE_LEDGER_URL``)."""
    config: dict[str, Any] = {
        "host": "127.0.0.1",
        "cache_dir": str(cache_dir),
        "api_keys": [api_key],
        "models": [{"name": MODEL, "kind": "openai", "tier": "llm",
                    "base_url": f"http://127.0.0.1:{upstream_port}/v1",
                    "remote_model": "fake-large"}],
    }  # fmt: skip
    if ledger == "off":
        config["ledger_url"] = "off"
    return config


def litellm_config(upstream_port: int, master_key: str) -> dict[str, Any]:
    return {
        "model_list": [{"model_name": MODEL, "litellm_params": {
            "model": "openai/fake-large", "api_base": f"http://127.0.0.1:{upstream_port}/v1",
            "api_key": "sk-upstream-unused"}}],
        "general_settings": {"master_key": master_key},
        "litellm_settings": {"telemetry": False},
    }  # fmt: skip


def chat_body() -> bytes:
    return json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Say hi."}],
                       "max_tokens": 8}).encode()  # fmt: skip


# ---- arms --------------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path):
        self.args = args
        self.workdir = workdir
        self.api_key = "sk-bench-" + secrets.token_hex(8)
        self.upstream: subprocess.Popen[bytes] | None = None
        self.upstream_port = 0
        self.arms: list[Arm] = []
        self.profiler: subprocess.Popen[bytes] | None = None

    def start_upstream(self) -> Arm:
        port = _free_port()
        log = self.workdir / "upstream.log"
        cmd = [sys.executable, "-m", "benchmarks.gateway_bench", "--serve-upstream", str(port)]
        self.upstream, self.upstream_port = _spawn(cmd, log), port
        arm = Arm("direct", "direct (fake upstream)", [f"http://127.0.0.1:{port}/v1/chat/completions"],
                  procs=[self.upstream], logs=[log])  # fmt: skip
        _wait_ready(arm, "/", 30, any_status=True)
        if arm.skipped:
            raise RuntimeError(f"the fake upstream did not start: {arm.skipped}")
        return arm

    def slmgate(self, key: str, name: str, ledger: str, replicas: int = 1,
                python: str | None = None, redis_url: str | None = None) -> Arm:  # fmt: skip
        """``replicas`` x ``slmgate serve``; ``ledger``: off, sqlite or a postgres URL."""
        arm = Arm(key, name, headers=[("Authorization", f"Bearer {self.api_key}")])
        env = {} if ledger in ("off", "sqlite") else {"SLMGATE_LEDGER_URL": ledger}
        if redis_url:
            env["SLMGATE_REDIS_URL"] = redis_url
        python = python or sys.executable
        for i in range(replicas):
            where = self.workdir / f"{key}-{i}"
            where.mkdir()
            kind = "off" if ledger == "off" else "sqlite"
            config = slmgate_config(self.upstream_port, self.api_key, kind, where / "cache")
            path = where / "gateway.yaml"
            path.write_text(yaml.safe_dump(config, sort_keys=False))
            port = _free_port()
            cmd = [python, "-m", "gateway.cli", "serve", "--config", str(path), "--host",
                   "127.0.0.1", "--port", str(port), "--log-level", "warning"]  # fmt: skip
            arm.procs.append(_spawn(cmd, where / "server.log", env))
            arm.logs.append(where / "server.log")
            arm.urls.append(f"http://127.0.0.1:{port}/v1/chat/completions")
        arm.info["python"] = python
        arm.info["ledger"] = ledger if ledger in ("off", "sqlite") else "postgres"
        arm.info["replicas"] = replicas
        arm.info["redis"] = bool(redis_url)
        return arm

    def litellm(self) -> Arm:
        python = self.args.litellm_python
        master = "sk-litellm-" + secrets.token_hex(8)
        arm = Arm("litellm", "litellm proxy", headers=[("Authorization", f"Bearer {master}")])
        version = _versions(python, ("litellm",))["litellm"]
        if version is None:
            arm.skipped = f"litellm is not installed for {python}"
            return arm
        arm.name = f"litellm proxy {version}"
        arm.info.update(python=python, version=version, workers=1,
                        serving=_versions(python, SERVE_PACKAGES))  # fmt: skip
        path = self.workdir / "litellm.yaml"
        path.write_text(yaml.safe_dump(litellm_config(self.upstream_port, master), sort_keys=False))
        port = _free_port()
        cmd = [python, "-m", "litellm.proxy.proxy_cli", "--config", str(path),
               "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"]  # fmt: skip
        env = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR",
               "DISABLE_SCHEMA_UPDATE": "True"}  # fmt: skip
        env = {k: v for k, v in env.items() if k not in os.environ}
        arm.procs.append(_spawn(cmd, self.workdir / "litellm.log", env))
        arm.logs.append(self.workdir / "litellm.log")
        arm.urls.append(f"http://127.0.0.1:{port}/v1/chat/completions")
        return arm

    def build(self) -> None:
        """Start every wanted server (they start together), then wait for each to be ready."""
        args, wanted = self.args, set(self.args.arms)
        self.arms.append(self.start_upstream())
        starting: list[tuple[Arm, str, float]] = []  # arm, readiness path, timeout

        def add(arm: Arm, path: str = "/readyz", timeout: float = 120.0) -> None:
            self.arms.append(arm)  # at once: close() stops whatever was started
            if not arm.skipped:
                starting.append((arm, path, timeout))

        pg_reason = None
        if wanted & {"postgres", "replicas"}:
            pg_reason = postgres_unreachable(args.postgres_url)
        if "off" in wanted:
            add(self.slmgate("off", "slmgate ledger=off", "off"))
        if "sqlite" in wanted:
            add(self.slmgate("sqlite", "slmgate ledger=sqlite", "sqlite"))
        if "postgres" in wanted:
            name = "slmgate ledger=postgres"
            add(Arm("postgres", name, skipped=pg_reason) if pg_reason
                else self.slmgate("postgres", name, args.postgres_url))  # fmt: skip
        if args.fast_python:
            fast = _versions(args.fast_python, ("uvloop", "httptools"))
            name = "slmgate ledger=sqlite, uvloop+httptools"
            missing = ", ".join(k for k, v in fast.items() if v is None)
            add(Arm("fast", name, skipped=f"{args.fast_python} lacks {missing}") if missing
                else self.slmgate("fast", name, "sqlite", python=args.fast_python))  # fmt: skip
        if "litellm" in wanted:
            add(self.litellm(), "/health/liveliness", args.litellm_startup_timeout)
        if "replicas" in wanted:
            ledger = "sqlite" if pg_reason else args.postgres_url
            label = "sqlite each" if pg_reason else "postgres, shared"
            label += " + redis" if args.redis_url else ""
            arm = self.slmgate("replicas", f"slmgate x{args.replicas} replicas ({label})", ledger,
                               replicas=args.replicas, redis_url=args.redis_url)  # fmt: skip
            arm.info["single"] = "sqlite" if pg_reason else "postgres"
            if pg_reason:
                arm.info["why_sqlite"] = pg_reason
            add(arm)
        for arm, path, timeout in starting:
            _wait_ready(arm, path, timeout)
            if arm.key == "litellm" and arm.skipped:
                arm.skipped = f"the proxy did not start (litellm[proxy] extras?): {arm.skipped}"
        self.arms.sort(key=lambda a: ARM_KEYS.index(a.key))
        sqlite = next((a for a in self.arms if a.key == "sqlite" and not a.skipped), None)
        if args.py_spy and sqlite is not None:  # attached once the server is up
            cmd = [*_py_spy_cmd(args.py_spy), "--pid", str(sqlite.procs[0].pid)]
            self.profiler = _spawn(cmd, self.workdir / "py-spy.log")
        for arm in self.arms:
            if arm.key not in ("direct", "litellm") and not arm.skipped:
                arm.info["serving"] = _versions(arm.info["python"], SERVE_PACKAGES)

    def close(self) -> None:
        if self.profiler is not None:  # SIGINT: py-spy writes its file and detaches
            _stop(self.profiler, 60)
            if self.profiler.returncode:
                print(f"py-spy: {_failure_line(self.workdir / 'py-spy.log')}", file=sys.stderr)
        procs = [p for arm in self.arms if arm.key != "direct" for p in arm.procs]
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in procs:
            _stop(p, signalled=True)
        if self.upstream is not None:  # last: the servers may still call it while stopping
            _stop(self.upstream)


def _py_spy_cmd(out: Path) -> list[str]:
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    # --gil: only the thread holding the GIL is sampled, i.e. Python CPU time, not idle waits
    return [exe, "record", "--format", "raw", "--rate", "250", "--gil", "-o", str(out)]


# ---- the load ----------------------------------------------------------------------------------


def load_once(arm: Arm, connections: int, args: argparse.Namespace) -> dict[str, Any]:
    """One measured load on ``arm`` from a fresh ``benchmarks.http_load`` process."""
    cmd = [sys.executable, "-m", "benchmarks.http_load", *arm.urls,
           "--connections", str(connections), "--requests", str(args.requests),
           "--warmup", str(args.warmup), "--timeout", str(args.load_timeout),
           "--body", chat_body().decode()]  # fmt: skip
    for name, value in arm.headers:
        cmd += ["--header", f"{name}: {value}"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT,
                          timeout=2 * args.load_timeout + 60)  # fmt: skip
    lines = done.stdout.strip().splitlines()
    try:
        result: dict[str, Any] = json.loads(lines[-1])
    except (IndexError, ValueError):
        result = {"failed": (done.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    return result


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over rounds of p50, p95 and requests/s; errors and requests summed."""
    ok = [r for r in runs if "failed" not in r and r.get("p50_ms") is not None]
    out: dict[str, Any] = {"rounds": len(runs), "failed_rounds": len(runs) - len(ok)}
    for key in ("p50_ms", "p95_ms", "p99_ms", "requests_per_s"):
        values = [float(r[key]) for r in ok if r.get(key) is not None]
        out[key] = statistics.median(values) if values else None
    out["errors"] = sum(int(r.get("errors", 0)) for r in ok)
    out["requests"] = sum(int(r.get("requests", 0)) for r in ok)
    samples = [r["error_sample"] for r in ok if r.get("error_sample")]
    samples += [r["failed"] for r in runs if "failed" in r]
    out["error_sample"] = samples[0] if samples else None
    return out


def run_rounds(bench: Bench, args: argparse.Namespace) -> None:
    live = [a for a in bench.arms if not a.skipped]
    for n in range(args.rounds):
        for connections in args.connections:
            order = live[n % len(live) :] + live[: n % len(live)]  # rotate: drift hits all alike
            for arm in order:
                dead = [p.returncode for p in arm.procs if p.poll() is not None]
                if dead:
                    why = _failure_line(arm.logs[0])
                    arm.skipped = f"a server exited mid-run ({dead[0]}): {why}"
                    continue
                if arm.skipped:
                    continue
                print(f"round {n + 1}/{args.rounds}, {connections} conn: {arm.name} …",
                      file=sys.stderr, flush=True)  # fmt: skip
                arm.runs.setdefault(connections, []).append(load_once(arm, connections, args))


# ---- the report --------------------------------------------------------------------------------


def build_report(arms: list[Arm], connections: list[int]) -> dict[str, Any]:
    """Per arm and connection count: medians over rounds, added p50 vs direct, requests/s ratio
    vs the LiteLLM proxy; the replicas' ratio to one replica; the targets."""
    report: dict[str, Any] = {"arms": {}, "replicas": {}, "targets": {}}
    by_key = {a.key: a for a in arms}
    for arm in arms:
        entry: dict[str, Any] = {"name": arm.name, "skipped": arm.skipped, "info": arm.info,
                                 "by_connections": {}}  # fmt: skip
        for c in connections:
            if arm.runs.get(c):
                entry["by_connections"][str(c)] = {**median_run(arm.runs[c]), "runs": arm.runs[c]}
        report["arms"][arm.key] = entry

    def med(key: str, c: int, what: str) -> float | None:
        entry = report["arms"].get(key, {}).get("by_connections", {}).get(str(c))
        value = None if entry is None else entry.get(what)
        return None if value is None else float(value)

    for c in connections:
        direct_p50, litellm_rps = med("direct", c, "p50_ms"), med("litellm", c, "requests_per_s")
        for key in report["arms"]:
            entry = report["arms"][key]["by_connections"].get(str(c))
            if entry is None:
                continue
            p50, rps = entry.get("p50_ms"), entry.get("requests_per_s")
            entry["added_p50_ms"] = None if p50 is None or direct_p50 is None else p50 - direct_p50
            entry["vs_litellm"] = (None if rps is None or not litellm_rps or key == "direct"
                                   else rps / litellm_rps)  # fmt: skip
        replicas = by_key.get("replicas")
        if replicas is not None and not replicas.skipped:
            single_key = str(replicas.info.get("single"))
            many, one = med("replicas", c, "requests_per_s"), med(single_key, c, "requests_per_s")
            report["replicas"][str(c)] = {
                "single_arm": single_key, "replicas_rps": many, "single_rps": one,
                "ratio": many / one if many and one else None,
            }  # fmt: skip
    added = med("sqlite", 1, "added_p50_ms") if 1 in connections else None
    report["targets"]["added_p50_ms_sqlite_1conn"] = {
        "target": f"<= {TARGET_ADDED_P50_MS:g} ms", "value": added,
        "met": None if added is None else added <= TARGET_ADDED_P50_MS,
    }  # fmt: skip
    for c in connections:
        ratio = med("sqlite", c, "vs_litellm")
        report["targets"][f"vs_litellm_rps_sqlite_{c}conn"] = {
            "target": f">= {TARGET_LITELLM_RATIO:g}x", "value": ratio,
            "met": None if ratio is None else ratio >= TARGET_LITELLM_RATIO,
        }  # fmt: skip
    return report


def _num(value: Any, fmt: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{fmt}}{suffix}"


def render(report: dict[str, Any], connections: list[int]) -> str:
    out: list[str] = []
    for c in connections:
        out += [f"\n{c} connection{'s' if c > 1 else ''} (medians over rounds)",
                "| arm | p50 ms | p95 ms | req/s | added p50 vs direct ms | req/s vs LiteLLM "
                "| errors |", "|---|---|---|---|---|---|---|"]  # fmt: skip
        for entry in report["arms"].values():
            if entry["skipped"] and str(c) not in entry["by_connections"]:
                out.append(f"| {entry['name']} | skipped: {entry['skipped']} ||||||")
                continue
            r = entry["by_connections"].get(str(c))
            if r is None:
                continue
            failed = f" (failed rounds: {r['failed_rounds']})" if r["failed_rounds"] else ""
            errors = f"{r['errors']}{failed}"
            flag = " ⚠" if r["errors"] or r["failed_rounds"] else ""
            added = r.get("added_p50_ms")
            cells = [
                f"{entry['name']}{flag}", _num(r["p50_ms"], ".3f"), _num(r["p95_ms"], ".3f"),
                _num(r["requests_per_s"], ".0f"), _num(added, "+.3f"),
                _num(r.get("vs_litellm"), ".2f", "x"), errors,
            ]  # fmt: skip
            out.append("| " + " | ".join(cells) + " |")
        rep = report["replicas"].get(str(c))
        if rep is not None:
            out.append(f"x3 replicas vs 1 ({rep['single_arm']}): "
                       f"{_num(rep['ratio'], '.2f', 'x')} requests/s")  # fmt: skip
    for entry in report["arms"].values():
        for c, r in entry["by_connections"].items():
            if r.get("error_sample"):
                out.append(f"errors, {entry['name']} at {c} conn: {r['error_sample']}")
    out.append("")
    for name, t in report["targets"].items():
        verdict = "not measured" if t["met"] is None else ("met" if t["met"] else "MISSED")
        value = t["value"]
        shown = _num(value, "+.3f", " ms") if "added" in name else _num(value, ".2f", "x")
        out.append(f"target {name}: {t['target']}, measured {shown}: {verdict}")
    return "\n".join(out)


def notes(arms: list[Arm], machine: dict[str, Any]) -> list[str]:
    """What to know when reading the table: each server stack, and too few cores for replicas."""
    out = []
    for arm in arms:
        serving = arm.info.get("serving")
        if serving and not arm.skipped:
            stack = ", ".join(f"{k} {v}" for k, v in serving.items() if v)
            out.append(f"{arm.name} served by {stack} (uvicorn picks httptools/uvloop when "
                       "installed)")  # fmt: skip
    replicas = next((a for a in arms if a.key == "replicas" and not a.skipped), None)
    cores = machine.get("cores_available") or machine.get("cores") or 0
    if replicas is not None and cores < len(replicas.procs) + 2:
        out.append(f"{len(replicas.procs)} replicas + upstream + client on {cores} cores: the "
                   "replicas ratio says nothing about scaling here")  # fmt: skip
    return out


# ---- the upstream's own process ----------------------------------------------------------------


def serve_upstream(port: int) -> None:
    """The instant fake upstream: no fault window, no latency, until SIGINT/SIGTERM."""
    from benchmarks.soak_plan import FaultWindow
    from benchmarks.soak_upstream import FakeUpstream

    async def serve() -> None:
        upstream = FakeUpstream(FaultWindow(0.0, 0.0, "500"), latency_s=0.0)
        await upstream.start(port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await upstream.close()

    asyncio.run(serve())


# ---- main --------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser("slmgate bench gateway", description=__doc__, formatter_class=raw)
    add = p.add_argument
    add("--connections", default="1,8", help="comma-separated connection counts")
    add("--requests", type=int, default=500, help="measured requests per arm, per connection "
        "count, per round")  # fmt: skip
    add("--warmup", type=int, default=100, help="uncounted requests before each measured load")
    add("--rounds", type=int, default=3)
    add("--arms", default=",".join(k for k in ARM_KEYS if k != "fast"),
        help="comma-separated, of direct (always run), off, sqlite, postgres, litellm, "
        "replicas")  # fmt: skip
    add("--replicas", type=int, default=3, help="servers in the replicas arm")
    add("--postgres-url", default=os.environ.get("SLMGATE_BENCH_POSTGRES", DEFAULT_POSTGRES),
        help="the postgres arm's SLMGATE_LEDGER_URL")  # fmt: skip
    add("--redis-url", default=None, help="the replicas arm's SLMGATE_REDIS_URL (shared rate "
        "limits, budgets, breakers); none: each replica keeps its own")  # fmt: skip
    add("--litellm-python", default=sys.executable,
        help="interpreter with litellm[proxy] (a benchmark-only install)")  # fmt: skip
    add("--litellm-startup-timeout", type=float, default=180.0)
    add("--fast-python", default=None, help="interpreter with uvloop and httptools: adds "
        "'slmgate ledger=sqlite' served by it")  # fmt: skip
    add("--py-spy", type=Path, default=None, help="record the ledger=sqlite server with py-spy "
        "(raw collapsed stacks) to this file")  # fmt: skip
    add("--load-timeout", type=float, default=300.0, help="seconds per load phase")
    add("--keep", action="store_true", help="keep configs and server logs")
    add("--json", type=Path, default=None)
    add("--serve-upstream", type=int, default=None, help=argparse.SUPPRESS)  # the child
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = _parser()
    args = parser.parse_args(argv)
    if args.serve_upstream is not None:
        serve_upstream(args.serve_upstream)
        return 0
    try:
        args.connections = sorted({int(c) for c in args.connections.split(",") if c.strip()})
    except ValueError:
        parser.error("--connections: comma-separated integers")
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = set(args.arms) - set(ARM_KEYS)
    if unknown or not args.connections or min(args.connections) < 1:
        parser.error(f"--arms of {', '.join(ARM_KEYS)}; --connections >= 1")
    if args.requests < 1 or args.rounds < 1 or args.warmup < 0 or args.replicas < 1:
        parser.error("--requests, --rounds, --replicas >= 1 and --warmup >= 0")
    workdir = Path(tempfile.mkdtemp(prefix="slmgate-gwbench-"))
    bench = Bench(args, workdir)
    started = time.monotonic()
    try:
        bench.build()
        run_rounds(bench, args)
    finally:
        bench.close()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    report = build_report(bench.arms, args.connections)
    command = "slmgate bench gateway " + shlex.join(argv)
    machine = {**host_info(), "client": "benchmarks.http_load (raw asyncio HTTP/1.1, own process)"}
    report.update(command=command, machine=machine, wall_s=round(time.monotonic() - started, 1),
                  settings={"connections": args.connections, "requests": args.requests,
                            "warmup": args.warmup, "rounds": args.rounds,
                            "body": json.loads(chat_body())})  # fmt: skip
    report["notes"] = notes(bench.arms, machine)
    print(f"command: {command}\nmachine: {machine}\n"
          f"{args.requests} requests (+{args.warmup} warm-up) per arm x connection count x round, "
          f"{args.rounds} rounds, non-streaming chat, max_tokens 8")  # fmt: skip
    for note in report["notes"]:
        print(f"note: {note}")
    print(render(report, args.connections))
    if args.keep:
        print(f"kept: {workdir}")
    if args.py_spy:
        print(f"py-spy profile of the ledger=sqlite server: {args.py_spy}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
