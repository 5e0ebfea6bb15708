"""A live ``slmgate serve`` subprocess shared by the integration tests that drive it over HTTP."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests import postgres

KEY = "sk-test-slmgate"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


MODELS = (
    "models:\n  - {name: slm, source: 'builtin:smollm2-135m-instruct', tier: slm,"
    " price_in_per_mtok: 0.02, price_out_per_mtok: 0.04}\n"
    "  - {name: llm, source: 'builtin:qwen2.5-coder-0.5b-instruct', tier: llm,"
    " price_in_per_mtok: 0.08, price_out_per_mtok: 0.16}\n"
)
# ``auto`` stays single-tier here so the wire-format tests see the SLM; ``cascade`` and ``pre``
# are the routing policies (tests/integration/test_routing.py).
ROUTES = (
    "routes:\n  - {name: auto, tiers: [slm]}\n"
    "  - {name: cascade, tiers: [slm, llm], policy: cascade, threshold: 0.5,"
    " early_fallback: {enabled: true}}\n"
    "  - {name: pre, tiers: [slm, llm], policy: pre}\n"
)


@contextmanager
def live_server(
    config_dir: Path, ledger_url: str, models_and_routes: str = MODELS + ROUTES
) -> Iterator[str]:
    """Run ``slmgate serve`` on a free port with the test config (``models_and_routes``, the
    shared SmolLM2 + 0.5B one by default); yield its base URL."""
    config = config_dir / "slmgate.yaml"
    config.write_text(
        models_and_routes + f"api_keys: [{KEY}]\nlimits: {{max_body_bytes: 200000}}\n"
        f"ledger_url: '{ledger_url}'\n"
    )
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", "--port", str(port), "--config",
         str(config), "--log-level", "warning"],
        env={**os.environ}, cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            assert proc.poll() is None, "server exited during startup"
            try:
                ready = httpx.get(f"{base}/readyz", headers={"authorization": f"Bearer {KEY}"},
                                  timeout=2)
                if ready.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(1)
        else:
            pytest.fail("server did not become ready")
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="session")
def server_ledger_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The SQLite ledger the shared ``server`` writes to."""
    return f"sqlite:///{tmp_path_factory.mktemp('ledger') / 'ledger.sqlite3'}"


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory, server_ledger_url: str) -> Iterator[str]:
    with live_server(tmp_path_factory.mktemp("cfg"), server_ledger_url) as base:
        yield base


@contextmanager
def pg_schema() -> Iterator[str]:
    """A fresh PostgreSQL schema for a server's ledger; skips when PostgreSQL is unreachable."""
    import sqlalchemy as sa

    try:
        with postgres.pg_schema(prefix="slmgate_it") as url:
            yield url
    except sa.exc.OperationalError as exc:
        postgres.service_missing(f"PostgreSQL at 127.0.0.1:5432 is unreachable: {exc}")


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A second live server whose ledger is the local PostgreSQL (a fresh schema), shared by the
    tests that must pass on both ledgers."""
    with pg_schema() as url, live_server(tmp_path_factory.mktemp("pgcfg"), url) as base:
        yield base
