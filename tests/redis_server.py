"""A throwaway Redis for the limits tests: Debian's ``redis-server`` on a free loopback port.

No persistence (``--save ''``, no AOF), its files in a temp dir, stopped (and the dir removed)
on the way out. ``FLEETGATE_SKIP_REDIS=1`` skips these tests on purpose; otherwise a missing
server is an error that says how to install it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from helpers import free_port


@dataclass
class RedisServer:
    url: str
    port: int
    proc: subprocess.Popen[bytes]

    def kill(self) -> None:
        """SIGKILL, as a crash would; waits until it is gone."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@contextlib.contextmanager
def redis_server(port: int | None = None) -> Iterator[RedisServer]:
    """A fresh server; ``port`` to bring one back where a killed one was."""
    if os.environ.get("FLEETGATE_SKIP_REDIS") == "1":
        pytest.skip("FLEETGATE_SKIP_REDIS=1")
    exe = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None
    )
    if exe is None:
        pytest.fail("redis-server not found: apt-get install -y redis-server (scripts/test.sh does)")
    root = tempfile.mkdtemp(prefix="fg-redis-")
    port = port or free_port()
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", root, "--daemonize", "no", "--protected-mode", "yes", "--loglevel", "warning"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    server = RedisServer(f"redis://127.0.0.1:{port}/0", port, proc)
    try:
        deadline = time.monotonic() + 20
        while not _ping(port):
            if proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {proc.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError("redis-server did not answer PING within 20 s")
            time.sleep(0.05)
        yield server
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        shutil.rmtree(root, ignore_errors=True)
