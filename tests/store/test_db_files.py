"""The SQLite store's files are private to the gateway's user: 0600, WAL and SHM included."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from sqlalchemy import text

from fleetgate.store.db import migrate, open_engine


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def _use(db: Path) -> None:
    engine = open_engine(f"sqlite:///{db}")
    try:
        migrate(engine)
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE IF NOT EXISTS probe (x INTEGER)"))
            conn.execute(text("INSERT INTO probe VALUES (1)"))
        files = [db, Path(f"{db}-wal"), Path(f"{db}-shm")]
        assert all(f.exists() for f in files), "WAL mode keeps -wal and -shm while open"
        assert {f.name: _mode(f) for f in files} == {f.name: 0o600 for f in files}
    finally:
        engine.dispose()


def test_new_store_and_its_wal_files_are_0600_even_with_a_permissive_umask(tmp_path):
    old = os.umask(0o022)
    try:
        _use(tmp_path / "sub" / "fg.db")
    finally:
        os.umask(old)


def test_an_existing_world_readable_store_is_tightened_on_open(tmp_path):
    db = tmp_path / "fg.db"
    for f in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
        f.touch()
        f.chmod(0o644)
    Path(f"{db}-wal").unlink()  # an empty -wal/-shm pair left over is fine to recreate
    Path(f"{db}-shm").unlink()
    _use(db)
