"""Secret query values never reach the access log: literal strings, then a live uvicorn."""

from __future__ import annotations

import io
import logging
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from uvicorn.logging import AccessFormatter

from gateway.logfilter import (
    RedactQuerySecrets,
    redact_query_secrets,
    redact_url_secrets,
    uvicorn_log_config,
)


def _redacted(logged: str, ours: str) -> bool:
    """Our filter's masking, or litellm's stricter one: importing litellm (other tests do)
    installs its own access-log redaction on uvicorn's loggers, which replaces the whole query
    parameter with ``REDACTED`` before ours sees it. Either way the secret is gone."""
    return f"?{ours} HTTP/1.1\" 200" in logged or "REDACTED" in logged


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("/dashboard?key=sk-secret", "/dashboard?key=***"),
        ("/v1/stats?window=24h&key=sk-1&route=auto", "/v1/stats?window=24h&key=***&route=auto"),
        ("/x?API_KEY=abc&token=t0k#frag", "/x?API_KEY=***&token=***#frag"),
        ("/x?api-key=a&apikey=b&access_token=c", "/x?api-key=***&apikey=***&access_token=***"),
        ('"GET /d?key=sk-x HTTP/1.1" 200', '"GET /d?key=*** HTTP/1.1" 200'),
        ("/x?key=", "/x?key=***"),
        ("/x?monkey=1&keys=2&keyword=3", "/x?monkey=1&keys=2&keyword=3"),  # other names stay
        ("/x?window=24h", "/x?window=24h"),
    ],
)
def test_redact_url_secrets(text: str, expected: str) -> None:
    assert redact_url_secrets(text) == expected


def test_filter_rewrites_message_and_arguments_and_keeps_the_record() -> None:
    record = logging.LogRecord("t", logging.INFO, __file__, 1, "%s then %(x)s?key=k", None, None)
    record.args = ("/a?token=t",)
    assert RedactQuerySecrets().filter(record) is True
    assert (record.msg, record.args) == ("%s then %(x)s?key=***", ("/a?token=***",))
    record.args = {"path": "/b?api_key=z", "n": 3}
    assert redact_query_secrets.filter(record) is True
    assert record.args == {"path": "/b?api_key=***", "n": 3}


@pytest.fixture
def access_log() -> Iterator[io.StringIO]:
    """uvicorn's access logger with the filter installed, formatted as uvicorn formats it."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(AccessFormatter('%(client_addr)s - "%(request_line)s" %(status_code)s',
                                         use_colors=False))  # fmt: skip
    logger = logging.getLogger("uvicorn.access")
    old_level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    logger.addFilter(redact_query_secrets)
    try:
        yield out
    finally:
        logger.removeFilter(redact_query_secrets)
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def serve_once(config: dict[str, object] | None, url_tail: str) -> None:
    """Start uvicorn with ``log_config=config``, make one GET, stop it."""
    app = FastAPI()

    @app.get("/dashboard")
    async def page() -> dict[str, str]:
        return {"ok": "yes"}

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=config,
                                           access_log=True))  # fmt: skip
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        assert httpx.get(f"http://127.0.0.1:{port}{url_tail}").status_code == 200
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_live_uvicorn_access_log_shows_no_key(access_log: io.StringIO) -> None:
    serve_once(None, "/dashboard?window=7d&key=sk-live-secret&x=1")
    logged = access_log.getvalue()
    assert _redacted(logged, "window=7d&key=***&x=1")
    assert "sk-live-secret" not in logged


def test_uvicorn_log_config_filters_the_access_handler(capsys: pytest.CaptureFixture[str]) -> None:
    config = uvicorn_log_config()
    assert config["handlers"]["access"]["filters"] == ["redact_query_secrets"]
    try:
        serve_once(config, "/dashboard?api_key=sk-other-secret")
    finally:  # uvicorn's dictConfig touched the process' loggers: leave them quiet
        for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
            logging.getLogger(name).handlers.clear()
    out = capsys.readouterr().out
    assert _redacted(out, "api_key=***")
    assert "sk-other-secret" not in out
