"""Who is calling: the config's static keys (admins, no limits) and the key records in the ledger
database (``slmgate keys``), looked up by the hash of the secret and cached for ``ttl_s``.

Every replica reads the same records, so a key created or revoked on one is seen by all within
``ttl_s``. The gateway asks for a key once any exists, static or recorded. While the database
cannot be read, a key seen recently keeps its cached verdict, an unseen one is refused with a
503, and whether keys are required stays as last read: a gateway that records protect does not
open up in an outage. One started while its database is down has read nothing yet and serves
openly until the database answers (a ledger outage never fails requests); a static admin key in
``api_keys`` keeps it closed from the start.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from router.ledger.key_store import ApiKey, SqlKeyStore, hash_secret
from schemas.errors import OverloadedError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated caller: ``record`` is None for a static config key (an admin)."""

    record: ApiKey | None

    @property
    def admin(self) -> bool:
        return self.record is None or self.record.admin

    @property
    def key_id(self) -> str | None:
        return None if self.record is None else self.record.key_id


def static_match(given: str, keys: Sequence[str]) -> bool:
    """Constant-time membership: timing reveals neither the key nor which one matched."""
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(given.encode(), key.encode())
    return ok


class KeyDirectory:
    """Resolves a bearer secret to a ``Caller`` (or None: not a key)."""

    def __init__(
        self,
        static: Callable[[], Sequence[str]],
        store: SqlKeyStore | None,
        *,
        ttl_s: float = 2.0,
        max_cached: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.static = static
        self.store = store
        self.ttl_s = ttl_s
        self.max_cached = max_cached
        self.clock = clock
        self._cache: dict[str, tuple[ApiKey | None, float]] = {}  # hash -> (record, read at)
        self._records_exist = False
        self._checked_at = -float("inf")

    async def required(self) -> bool:
        """Whether requests must carry a key: static keys, or any active key record."""
        if self.static():
            return True
        if self.store is None:
            return False
        if self.clock() - self._checked_at >= self.ttl_s:
            try:
                self._records_exist = await asyncio.to_thread(self.store.any_active)
            except Exception as exc:  # keep the last answer through the outage
                log.warning("API keys: the key table cannot be read: %s", exc)
            self._checked_at = self.clock()
        return self._records_exist

    def last_known_required(self) -> bool:
        """``required()`` as last read, without a database call (the dashboard's page shell)."""
        return bool(self.static()) or self._records_exist

    async def resolve(self, secret: str) -> Caller | None:
        if not secret:
            return None
        if static_match(secret, self.static()):
            return Caller(None)
        if self.store is None:
            return None
        digest = hash_secret(secret)
        cached = self._cache.get(digest)
        if cached is None or self.clock() - cached[1] >= self.ttl_s:
            try:
                record = await asyncio.to_thread(self.store.find, secret)
            except Exception as exc:
                if cached is None:
                    raise OverloadedError(
                        f"API keys cannot be checked: the ledger database is unavailable ({exc})"
                    ) from None
                record = cached[0]  # serve the last verdict through an outage
            else:
                if len(self._cache) >= self.max_cached:
                    self._cache.clear()
                self._cache[digest] = (record, self.clock())
        else:
            record = cached[0]
        if record is None or not record.active:
            return None
        return Caller(record)
