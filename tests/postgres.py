"""The machine's PostgreSQL for tests: a fresh schema per use, so tests never see each other."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from typing import NoReturn

import pytest
import sqlalchemy as sa

PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def service_missing(reason: str) -> NoReturn:
    """Skip a test whose service (PostgreSQL, Redis) is not running — except in CI
    (``CI=true``), where the machine starts them and a missing one must fail the run."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason} (CI=true: services are required here, not optional)")
    pytest.skip(reason)


@contextlib.contextmanager
def pg_schema(base_url: str = PG_URL, prefix: str = "slmgate_test") -> Iterator[str]:
    """A URL whose connections see only a fresh schema, dropped afterwards. Raises
    ``sqlalchemy.exc.OperationalError`` when the server is unreachable."""
    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(base_url)
    try:
        with admin.begin() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
        try:
            url = sa.make_url(base_url).update_query_dict({"options": f"-csearch_path={schema}"})
            yield url.render_as_string(hide_password=False)
        finally:
            with admin.begin() as conn:
                conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
    finally:
        admin.dispose()
