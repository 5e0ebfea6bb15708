"""API keys as records in the ledger's database: who a key belongs to, what it may spend and how
fast, and which routes it may call. Only a sha256 of each secret is stored; the secret itself is
shown once, when the key is created (``slmgate keys create``)."""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from router.ledger.schema import api_keys_table

KEY_PREFIX = "sk-slmgate-"


@dataclass(frozen=True, slots=True)
class KeyLimits:
    """What one key may do; None = no limit, an empty ``models`` = every route and model."""

    rpm: int | None = None  # requests per minute
    tpm: int | None = None  # prompt + completion tokens per minute
    budget_daily_usd: float | None = None  # per UTC day
    budget_monthly_usd: float | None = None  # per UTC calendar month
    models: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("rpm", "tpm"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 (or unset for no limit)")
        for name in ("budget_daily_usd", "budget_monthly_usd"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise ValueError(f"{name} must be >= 0 (or unset for no limit)")


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A stored key. ``key_id`` is public (lists, stats, the dashboard); the secret is not kept."""

    key_id: str
    name: str
    key_prefix: str
    created_at: float
    revoked_at: float | None = None
    limits: KeyLimits = field(default_factory=KeyLimits)
    admin: bool = False  # may read stats, tasks, metrics and the dashboard, not only call models

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    def allows(self, model: str) -> bool:
        return not self.limits.models or model in self.limits.models


def hash_secret(secret: str) -> str:
    """sha256 hex of a key's secret: keys are 256-bit random, so no salt or slow hash is needed
    (the hash only keeps a database dump from handing out working keys)."""
    return hashlib.sha256(secret.encode()).hexdigest()


def new_secret() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


class SqlKeyStore:
    """Create, list, revoke and look up key records on the ledger's engine."""

    def __init__(self, engine: Engine, ensure_schema: Callable[[], None]):
        self._engine = engine
        self._ensure = ensure_schema

    def create(
        self, name: str, limits: KeyLimits, *, admin: bool = False, now: float | None = None
    ) -> tuple[ApiKey, str]:
        """A new key and its secret (the only time the secret exists outside the client)."""
        if not name.strip():
            raise ValueError("a key needs a name")
        self._ensure()
        secret = new_secret()
        key = ApiKey("key-" + secrets.token_hex(6), name, secret[: len(KEY_PREFIX) + 4],
                     time.time() if now is None else now, None, limits, admin)  # fmt: skip
        with self._engine.begin() as conn:
            conn.execute(sa.insert(api_keys_table).values(
                key_id=key.key_id, name=key.name, key_hash=hash_secret(secret),
                key_prefix=key.key_prefix, created_at=key.created_at, revoked_at=None,
                rpm=limits.rpm, tpm=limits.tpm, budget_daily_usd=limits.budget_daily_usd,
                budget_monthly_usd=limits.budget_monthly_usd, models=json.dumps(limits.models),
                admin=admin,
            ))  # fmt: skip
        return key, secret

    def list(self, include_revoked: bool = False) -> list[ApiKey]:
        self._ensure()
        query = sa.select(api_keys_table).order_by(api_keys_table.c.created_at)
        if not include_revoked:
            query = query.where(api_keys_table.c.revoked_at.is_(None))
        with self._engine.connect() as conn:
            return [_key_of(row) for row in conn.execute(query).mappings()]

    def revoke(self, key_id: str, now: float | None = None) -> bool:
        """Revoke by id (or by name when no id matches); False when no active key matched."""
        self._ensure()
        c = api_keys_table.c
        when = time.time() if now is None else now
        with self._engine.begin() as conn:
            done = conn.execute(
                sa.update(api_keys_table)
                .where(c.key_id == key_id, c.revoked_at.is_(None))
                .values(revoked_at=when)
            ).rowcount
            if not done:
                done = conn.execute(
                    sa.update(api_keys_table)
                    .where(c.name == key_id, c.revoked_at.is_(None))
                    .values(revoked_at=when)
                ).rowcount
        return bool(done)

    def find(self, secret: str) -> ApiKey | None:
        """The key record whose secret this is (revoked ones included), or None."""
        self._ensure()
        query = sa.select(api_keys_table).where(api_keys_table.c.key_hash == hash_secret(secret))
        with self._engine.connect() as conn:
            row = conn.execute(query).mappings().first()
        return None if row is None else _key_of(row)

    def any_active(self) -> bool:
        self._ensure()
        query = sa.select(api_keys_table.c.key_id).where(api_keys_table.c.revoked_at.is_(None))
        with self._engine.connect() as conn:
            return conn.execute(query.limit(1)).first() is not None

    def names(self) -> dict[str, str]:
        """key_id → name for every key ever created (stats label spend with it)."""
        self._ensure()
        c = api_keys_table.c
        with self._engine.connect() as conn:
            return {r.key_id: r.name for r in conn.execute(sa.select(c.key_id, c.name))}


def _key_of(row: sa.RowMapping) -> ApiKey:
    return ApiKey(
        key_id=row["key_id"], name=row["name"], key_prefix=row["key_prefix"],
        created_at=float(row["created_at"]),
        revoked_at=None if row["revoked_at"] is None else float(row["revoked_at"]),
        limits=KeyLimits(
            rpm=row["rpm"], tpm=row["tpm"], budget_daily_usd=row["budget_daily_usd"],
            budget_monthly_usd=row["budget_monthly_usd"], models=tuple(json.loads(row["models"])),
        ),
        admin=bool(row["admin"]),
    )  # fmt: skip
