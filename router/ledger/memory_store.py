"""Escalation memory (``router.memory``) kept in the ledger's database, per route, bounded."""

from __future__ import annotations

import json
from collections.abc import Callable

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from router.ledger.schema import memory_table, upsert
from router.memory import MemoryExample


class SqlMemoryStore:
    """``MemoryStore`` on the ledger's engine (SQLite or PostgreSQL); ``ensure_schema`` is the
    ledger's own (it creates ``memory_examples`` with the other tables, once)."""

    def __init__(self, engine: Engine, ensure_schema: Callable[[], None]):
        self._engine = engine
        self._dialect = engine.dialect.name
        self._ensure = ensure_schema

    def load(self, route: str, limit: int) -> list[MemoryExample]:
        """The route's newest ``limit`` examples, oldest first."""
        self._ensure()
        m = memory_table.c
        query = (
            sa.select(m.id, m.route, m.tools, m.prompt, m.answer, m.created_at)
            .where(m.route == route)
            .order_by(m.created_at.desc(), m.id)
            .limit(limit)
        )
        with self._engine.connect() as conn:
            rows = list(conn.execute(query))
        return [
            MemoryExample(
                r.id, r.route, tuple(json.loads(r.tools)), r.prompt, r.answer, float(r.created_at)
            )
            for r in reversed(rows)
        ]

    def save(self, example: MemoryExample, keep: int) -> None:
        """Insert or replace ``example``, then drop the route's examples beyond the newest
        ``keep``."""
        self._ensure()
        m = memory_table.c
        values = {
            "id": example.id, "route": example.route, "tools": json.dumps(list(example.tools)),
            "prompt": example.prompt, "answer": example.answer, "created_at": example.created_at,
        }  # fmt: skip
        insert = upsert(self._dialect, memory_table).values(**values)
        insert = insert.on_conflict_do_update(
            index_elements=["id"], set_={k: v for k, v in values.items() if k != "id"}
        )
        newest = (
            sa.select(m.id).where(m.route == example.route)
            .order_by(m.created_at.desc(), m.id).limit(keep)
        )  # fmt: skip
        with self._engine.begin() as conn:
            conn.execute(insert)
            conn.execute(
                memory_table.delete().where(m.route == example.route, m.id.not_in(newest))
            )
