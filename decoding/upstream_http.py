"""The one non-streaming upstream call (POST a JSON body, read a JSON answer), over aiohttp.

Why not httpx, which the rest of the remote backend uses: on the gateway's hot path (a client
that does not stream, an upstream that answers at once) httpx's pool, URL merging and anyio
scopes cost ~0.7 ms per call on this machine's cores, aiohttp's ~0.15 ms (BENCHMARKS.md,
"Gateway overhead"). SSE streams stay on httpx: there a token's model time dwarfs the client's.

Behaves like the httpx client it replaces: keep-alive pool per event loop, proxies from the
environment (``HTTP(S)_PROXY``, ``NO_PROXY``; read once per pool: aiohttp's own ``trust_env``
re-reads them and ``~/.netrc`` on every call, +0.45 ms), certificates checked against
certifi's bundle, one total timeout per call. Failures come back as the gateway's errors: no
answer within the timeout is a ``RequestTimeoutError`` (504), a connection that cannot be made
or breaks is an ``UpstreamError`` (502, retried by the caller).
"""

from __future__ import annotations

import asyncio
import json
import ssl
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import certifi

from schemas.errors import RequestTimeoutError, UpstreamError


@dataclass(frozen=True, slots=True)
class UpstreamReply:
    """What came back: the status, the headers (looked up case-insensitively) and the body."""

    status: int
    reason: str
    headers: Mapping[str, str]
    body: bytes


def env_proxy(url: str) -> str | None:
    """The proxy the environment sets for ``url`` (``HTTP_PROXY``/``HTTPS_PROXY``, unless
    ``NO_PROXY`` covers its host), as httpx and curl read them; None for a direct connection."""
    parts = urlsplit(url)
    bypass = urllib.request.proxy_bypass_environment  # type: ignore[attr-defined]  # on every OS
    if parts.hostname is None or bypass(parts.hostname):
        return None
    return urllib.request.getproxies_environment().get(parts.scheme)


class JsonPoster:
    """POSTs JSON to one server. ``name`` and ``base_url`` only word the errors."""

    def __init__(self, name: str, base_url: str, headers: Mapping[str, str], timeout_s: float):
        self.name = name
        self.base_url = base_url.rstrip("/")
        self.headers = dict(headers)
        self.timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._proxy: str | None = None

    def _http(self) -> aiohttp.ClientSession:
        """One session per event loop (a pooled connection cannot move between loops)."""
        loop = asyncio.get_running_loop()
        if self._session is None or self._loop is not loop or self._session.closed:
            tls = ssl.create_default_context(cafile=certifi.where())
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=tls, limit=100),
                headers=self.headers,
                timeout=aiohttp.ClientTimeout(total=self.timeout_s),
            )
            self._loop = loop
            self._proxy = env_proxy(self.base_url)
        return self._session

    async def post(
        self, path: str, payload: Mapping[str, Any], headers: Mapping[str, str] | None = None
    ) -> UpstreamReply:
        """POST ``payload`` to ``base_url + path`` and read the whole answer."""
        url = self.base_url + path
        body = json.dumps(payload).encode()
        try:
            session = self._http()
            async with session.post(url, data=body, headers=headers, proxy=self._proxy) as response:
                data = await response.read()
                return UpstreamReply(response.status, response.reason or "", response.headers, data)
        except TimeoutError as exc:  # aiohttp's timeouts are TimeoutErrors
            raise RequestTimeoutError(
                f"backend {self.name}: no answer from {self.base_url} within {self.timeout_s:g} s"
            ) from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError(
                f"backend {self.name}: cannot reach {self.base_url}: {exc!r}"
            ) from exc

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None and not session.closed:
            await session.close()
