"""Admission checks that run before any handler: API keys on every path, JSON-only bodies, and
per-key concurrency.

With keys configured, everything but ``/healthz`` (liveness for load balancers) and the
dashboard's page shell (static HTML with no data; its data calls carry the key) needs
``Authorization: Bearer <key>`` — including ``/readyz`` (it lists models), ``/docs``, ``/redoc``
and ``/openapi.json``. A key is never read from the URL: URLs end up in access logs, browser
history and Referer headers. Keys are the config's ``api_keys`` (admins) and the key records of
``slmgate keys`` (``gateway.keys``); a record that is not ``--admin`` may only call models.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from gateway.keys import KeyDirectory
from schemas.errors import (
    AuthenticationError,
    PermissionDeniedError,
    RateLimitError,
    SlmgateError,
    UnsupportedMediaTypeError,
)

OPEN_PATHS = frozenset({"/healthz", "/dashboard"})
CALLER_PATHS = frozenset({"/v1/chat/completions", "/v1/models", "/readyz"})
ASGIApp = Callable[..., Any]


def bearer_key(authorization: str) -> str:
    """The key of an ``Authorization: Bearer <key>`` header ('' when absent or another scheme)."""
    scheme, _, key = authorization.partition(" ")
    return key.strip() if scheme.lower() == "bearer" else ""


def is_json_content_type(value: str) -> bool:
    """``application/json`` or ``application/<x>+json``, parameters (charset) allowed."""
    media = value.split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


def require_json(content_type: str | None) -> None:
    """A 415 unless the body is declared JSON. Browsers send text/plain, form or no type
    cross-site without a CORS preflight; refusing those keeps web pages from driving the API."""
    if content_type is None or not is_json_content_type(content_type):
        raise UnsupportedMediaTypeError(
            f"Content-Type must be application/json (got {content_type or 'none'!r})"
        )


class KeyGuard:
    """ASGI middleware: a 401 OpenAI error for any HTTP request outside ``OPEN_PATHS`` that does
    not carry a valid key once keys exist (``KeyDirectory``), and a 403 for a non-admin key
    record outside ``CALLER_PATHS``. The caller is left in ``scope["state"]["caller"]``."""

    def __init__(self, app: ASGIApp, keys: KeyDirectory):
        self.app = app
        self.keys = keys

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"].rstrip("/") in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        try:
            if not await self.keys.required():
                await self.app(scope, receive, send)
                return
            headers = dict(scope.get("headers") or ())
            given = bearer_key(headers.get(b"authorization", b"").decode("latin-1"))
            caller = await self.keys.resolve(given)
        except SlmgateError as exc:
            await send_error(send, exc)
            return
        if caller is None:
            message = "Incorrect API key provided. Pass it as 'Authorization: Bearer <key>'."
            await send_error(send, AuthenticationError(message))
            return
        if not caller.admin and not is_caller_path(scope["path"]):
            name = caller.record.name if caller.record is not None else ""
            await send_error(send, PermissionDeniedError(
                f"API key {name!r} may call models but not {scope['path']} (an admin key may: "
                "`slmgate keys create --admin`)"))  # fmt: skip
            return
        scope.setdefault("state", {})["caller"] = caller
        await self.app(scope, receive, send)


def is_caller_path(path: str) -> bool:
    """What a key that only calls models may reach: completions, the model list, readiness and
    reporting its own task outcomes."""
    path = path.rstrip("/")
    return path in CALLER_PATHS or (path.startswith("/v1/tasks/") and path.endswith("/outcome"))


async def send_error(send: Any, exc: SlmgateError) -> None:
    """Send ``exc`` as an OpenAI error response straight on the ASGI channel."""
    body = json.dumps(exc.to_body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if exc.status in (429, 503):
        headers.append((b"retry-after", b"1"))
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class KeySlots:
    """In-flight requests per caller (API key, or client address on an open gateway), so one
    caller cannot take every worker: past ``limit`` its next request gets a 429."""

    def __init__(self, limit: Callable[[], int]):
        self.limit = limit
        self.in_flight: Counter[str] = Counter()

    def acquire(self, caller: str) -> None:
        limit = self.limit()
        if self.in_flight[caller] >= limit:
            raise RateLimitError(
                f"too many concurrent requests for this key ({limit}, "
                "limits.max_concurrent_per_key); retry when one finishes"
            )
        self.in_flight[caller] += 1

    def release(self, caller: str) -> None:
        self.in_flight[caller] -= 1
        if self.in_flight[caller] <= 0:
            del self.in_flight[caller]

    @contextmanager
    def hold(self, caller: str) -> Iterator[None]:
        self.acquire(caller)
        try:
            yield
        finally:
            self.release(caller)
