"""``GET /dashboard``: one self-contained page (inline CSS, JS and SVG charts, no CDN).

The page holds no data: its script reads ``/v1/models``, ``/v1/stats``, ``/v1/tasks`` and
``/v1/tasks/{id}`` with ``fetch``, sending the API key as ``Authorization: Bearer``. Browsers
cannot attach that header to a navigation, so the page itself takes the key as ``?key=``; the
script moves it to ``sessionStorage`` and drops it from the address bar at once. A per-response
CSP nonce lets only the page's own script and style run, and ``connect-src 'self'`` keeps every
fetch on the gateway.
"""

from __future__ import annotations

import functools
import hmac
import secrets
from collections.abc import Callable, Sequence
from html import escape
from importlib import resources

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

NONCE_MARK = "__CSP_NONCE__"
KeySource = Callable[[], Sequence[str]] | Sequence[str]


@functools.cache
def _template() -> str:
    return resources.files("gateway").joinpath("static/dashboard.html").read_text("utf-8")


def dashboard_html(nonce: str = "") -> str:
    """The page, with ``nonce`` on its ``<script>`` and ``<style>`` (matching the CSP header)."""
    return _template().replace(NONCE_MARK, escape(nonce, quote=True))


def content_security_policy(nonce: str) -> str:
    """Only the page's own nonce'd script and style; fetches to this origin only."""
    return (
        f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
        "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'self'; "
        "frame-ancestors 'none'"
    )


def given_key(request: Request) -> str:
    """The key a request carries: ``Authorization: Bearer`` first, else ``?key=``."""
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:]
    return request.query_params.get("key", "")


def key_ok(given: str, keys: Sequence[str]) -> bool:
    """Constant-time membership: timing reveals neither the key nor which one matched."""
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(given.encode(), key.encode())
    return ok


def login_html(refused: bool) -> str:
    """The 401 page: a form that reloads ``/dashboard`` with ``?key=``."""
    note = "<p class=bad>That key was refused.</p>" if refused else ""
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8><meta name=referrer "
        "content=no-referrer><title>slmgate dashboard · API key</title></head>"
        "<body><h1>slmgate dashboard</h1><p>This gateway requires an API key.</p>"
        f"{note}<form method=get action=dashboard><input name=key type=password "
        "autocomplete=off required aria-label='API key'> <button>Open</button></form>"
        "</body></html>"
    )


_HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}


def dashboard_router(api_keys: KeySource = ()) -> APIRouter:
    """An APIRouter serving ``GET /dashboard``, requiring one of ``api_keys`` when any are set.

    ``api_keys`` may be a callable so a gateway whose keys are reloaded is always current.
    """
    router = APIRouter()

    @router.get("/dashboard", include_in_schema=False)
    async def dashboard(request: Request) -> HTMLResponse:
        keys = api_keys() if callable(api_keys) else api_keys
        if isinstance(keys, str):  # one key, not a sequence of one-character keys
            keys = (keys,)
        if keys:
            given = given_key(request)
            if not key_ok(given, keys):
                login_headers = {**_HEADERS, "Content-Security-Policy": content_security_policy(
                    secrets.token_urlsafe(16))}  # fmt: skip
                return HTMLResponse(login_html(bool(given)), 401, headers=login_headers)
        nonce = secrets.token_urlsafe(16)
        headers = {**_HEADERS, "Content-Security-Policy": content_security_policy(nonce)}
        return HTMLResponse(dashboard_html(nonce), headers=headers)

    return router
