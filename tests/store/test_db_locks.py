"""Opening the store never drops another connection's SQLite locks in the same process.

POSIX advisory locks belong to the process: closing *any* descriptor of the database file
releases all of them, the shared lock of every SQLite connection the process has open included.
Another process (the CLI, say) then believes it is the last user of the database, checkpoints
and deletes the WAL on close while this process still writes to it, and the file ends up
corrupt ("database disk image is malformed" after a `keys rotate` beside a running gateway).
Opening an engine, or a new pooled connection, must never open and close the database file.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

from sqlalchemy import text

from fleetgate.store.db import migrate, open_engine

_WRITE_AND_CLOSE = """
import sqlite3, sys
c = sqlite3.connect(sys.argv[1], timeout=10)
c.execute("PRAGMA journal_mode=WAL")
c.execute("CREATE TABLE IF NOT EXISTS t (x)")
c.execute("INSERT INTO t VALUES (1)")
c.commit()
c.close()
"""


def test_a_second_engine_keeps_the_first_ones_locks(tmp_path: Path) -> None:
    db = tmp_path / "fg.db"
    url = f"sqlite:///{db}"
    first = open_engine(url)
    migrate(first)
    with first.connect() as conn:
        conn.execute(text("SELECT count(*) FROM api_keys"))  # this connection stays open
        second = open_engine(url)  # e.g. a CLI command's engine, in the same process
        with second.connect() as c2:
            c2.execute(text("SELECT 1"))
        # Another process writes and closes. It must see this process still using the
        # database, so it must not checkpoint and delete the WAL under it.
        subprocess.run([sys.executable, "-c", _WRITE_AND_CLOSE, str(db)], check=True,
                       timeout=30)
        assert Path(f"{db}-wal").exists()
        conn.execute(text("SELECT count(*) FROM api_keys"))
    second.dispose()
    first.dispose()
    assert sqlite3.connect(db).execute("PRAGMA integrity_check").fetchall() == [("ok",)]
