"""``GET /dashboard``: one self-contained page (inline CSS, JS and SVG charts, no CDN).

The page is a shell with no data, served to anyone (a person must be able to open it to type
the key). Its script reads ``/v1/models``, ``/v1/stats``, ``/v1/tasks`` and ``/v1/tasks/{id}``
with ``fetch``, sending the API key only as ``Authorization: Bearer``: the key is typed into the
page's form and kept in ``sessionStorage``, never taken from or put in a URL (URLs end up in
access logs, browser history and Referer headers). A per-response CSP nonce lets only the page's
own script and style run, and ``connect-src 'self'`` keeps every fetch on the gateway.
"""

from __future__ import annotations

import functools
import secrets
from collections.abc import Callable, Sequence
from html import escape
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

NONCE_MARK = "__CSP_NONCE__"
AUTH_MARK = "__AUTH__"
KeySource = Callable[[], Sequence[str] | bool] | Sequence[str]


@functools.cache
def _template() -> str:
    return resources.files("gateway").joinpath("static/dashboard.html").read_text("utf-8")


def dashboard_html(nonce: str = "", keys_required: bool = False) -> str:
    """The page, with ``nonce`` on its ``<script>`` and ``<style>`` (matching the CSP header).

    ``keys_required`` only tells the script to ask for a key before its first call (instead of
    after a 401); the data endpoints enforce the key either way.
    """
    return (
        _template()
        .replace(NONCE_MARK, escape(nonce, quote=True))
        .replace(AUTH_MARK, "key" if keys_required else "open")
    )


def content_security_policy(nonce: str) -> str:
    """Only the page's own nonce'd script and style; fetches to this origin only."""
    return (
        f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
        "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'self'; "
        "frame-ancestors 'none'"
    )


_HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}


def dashboard_router(api_keys: KeySource = ()) -> APIRouter:
    """An APIRouter serving the page shell at ``GET /dashboard``, open to all.

    ``api_keys`` (a callable, so reloaded keys are current; it may answer True/False) only says
    whether the page should ask for a key up front; the shell carries no data, so it needs none.
    """
    router = APIRouter()

    @router.get("/dashboard", include_in_schema=False)
    async def dashboard() -> HTMLResponse:
        keys = api_keys() if callable(api_keys) else api_keys
        if isinstance(keys, str):  # one key, not a sequence of one-character keys
            keys = (keys,)
        nonce = secrets.token_urlsafe(16)
        headers = {**_HEADERS, "Content-Security-Policy": content_security_policy(nonce)}
        return HTMLResponse(dashboard_html(nonce, bool(keys)), headers=headers)

    return router
