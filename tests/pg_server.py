"""A throwaway PostgreSQL server for the store tests: initdb into a temp dir, run on a free port.

Postgres refuses to run as root, so as root the server runs as the ``postgres`` user (created by
Debian's package). ``FLEETGATE_SKIP_POSTGRES=1`` skips these tests on purpose; otherwise a
missing server is an error that says how to install it.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator

import pytest
from helpers import free_port


def _bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


def _as_server_user(cmd: list[str]) -> list[str]:
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *cmd]
    return cmd


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    if os.environ.get("FLEETGATE_SKIP_POSTGRES") == "1":
        pytest.skip("FLEETGATE_SKIP_POSTGRES=1")
    initdb, pg_ctl = _bin("initdb"), _bin("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.fail("PostgreSQL server not found: apt-get install -y postgresql (scripts/test.sh does)")
    root = tempfile.mkdtemp(prefix="fg-pg-")
    os.chmod(root, 0o777)
    data, sock = os.path.join(root, "data"), os.path.join(root, "sock")
    os.mkdir(sock)
    os.chmod(sock, 0o777)
    port = free_port()
    subprocess.run(_as_server_user([initdb, "-D", data, "--auth=trust", "-U", "fg", "-E", "UTF8"]),
                   check=True, capture_output=True)
    subprocess.run(
        _as_server_user([pg_ctl, "-D", data, "-l", os.path.join(root, "log"), "-w", "-t", "60",
                         "-o", f"-p {port} -k {sock} -c listen_addresses=127.0.0.1", "start"]),
        check=True, capture_output=True,
    )
    try:
        url = f"postgresql+psycopg://fg@127.0.0.1:{port}/postgres"
        deadline = time.monotonic() + 30
        import sqlalchemy

        while True:
            try:
                with sqlalchemy.create_engine(url).connect():
                    break
            except sqlalchemy.exc.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield url
    finally:
        subprocess.run(_as_server_user([pg_ctl, "-D", data, "-m", "immediate", "stop"]),
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
