"""The ``engine`` fixture for tests that run on both stores: SQLite and a real PostgreSQL.

Each PostgreSQL test gets a fresh database on the session's server (see ``pg_server.py``); the
schema is brought to head twice, to show that migrating is idempotent.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from fleetgate.store.db import migrate, open_engine


@pytest.fixture(params=["sqlite", "postgres"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    if request.param == "sqlite":
        e = open_engine(f"sqlite:///{tmp_path / 's.db'}")
    else:
        base = request.getfixturevalue("postgres_url")
        admin = open_engine(base)
        name = "t_" + uuid.uuid4().hex[:12]
        with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
            c.execute(text(f"CREATE DATABASE {name}"))
        admin.dispose()
        e = open_engine(base.rsplit("/", 1)[0] + "/" + name)
    migrate(e)
    migrate(e)  # idempotent
    yield e
    e.dispose()
