"""Opening the store: one SQLAlchemy engine per process, schema brought to head by Alembic.

SQLite gets WAL and a busy timeout so the CLI and a running gateway can share the file. The
file holds key digests, names and usage, so it is private: created 0600 before SQLite first
opens it, and an existing one (with its ``-wal``/``-shm``/``-journal``) is tightened to 0600.
SQLite gives the ``-wal`` and ``-shm`` files it creates the database file's mode, and every
connection re-checks them. All calls here are blocking; the server calls them from worker
threads, never on the event loop.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url

_MIGRATIONS = Path(__file__).parent / "migrations"
_SIDE_FILES = ("", "-wal", "-shm", "-journal")


def _make_private(db: Path) -> None:
    """Create ``db`` 0600 if missing; tighten it and its side files to 0600 if they exist.

    An existing database file is never opened here, only chmod-ed: closing a descriptor drops
    every POSIX lock this process holds on the file, the locks of SQLite's own open connections
    included, and that corrupts the database (SQLite's "How To Corrupt" guide, 2.2).
    """
    db.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.close(os.open(db, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
    for suffix in _SIDE_FILES:
        with contextlib.suppress(FileNotFoundError, PermissionError):
            p = Path(f"{db}{suffix}")
            if p.stat().st_mode & 0o077:
                p.chmod(0o600)


def open_engine(url: str) -> Engine:
    u = make_url(url)
    if u.drivername == "postgresql":
        u = u.set(drivername="postgresql+psycopg")  # psycopg 3, the `postgres` extra
    kwargs: dict[str, Any] = {"future": True}
    path: Path | None = None
    if u.get_backend_name() == "sqlite":
        db = u.database
        if db and db != ":memory:" and not db.startswith("file:"):
            path = Path(db).expanduser()
            _make_private(path)
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 10}
    else:
        kwargs["pool_pre_ping"] = True
    engine = create_engine(u, **kwargs)
    if u.get_backend_name() == "sqlite":

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _rec: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=10000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()
            if path is not None:
                _make_private(path)  # the -wal/-shm WAL mode just made, whoever made them

    return engine


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest revision. Safe to call on every start."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
