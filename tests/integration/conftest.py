"""A live ``slmgate serve`` subprocess shared by the integration tests that drive it over HTTP."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

KEY = "sk-test-slmgate"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    config = tmp_path_factory.mktemp("cfg") / "slmgate.yaml"
    config.write_text(
        "models:\n  - {name: slm, source: 'builtin:smollm2-135m-instruct', tier: slm}\n"
        "  - {name: llm, source: 'builtin:qwen2.5-coder-0.5b-instruct', tier: llm}\n"
        "routes:\n  - {name: auto, tiers: [slm]}\n"
        f"api_keys: [{KEY}]\nlimits: {{max_body_bytes: 200000}}\n"
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
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
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


