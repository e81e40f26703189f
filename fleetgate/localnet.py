"""Small blocking helpers for processes on this host: a free loopback port, waiting for HTTP.

Used by ``fleetgate demo`` (to wait for its simulator), by the tests and by the benchmark
harness, so that all of them pick ports and wait for servers the same way. Nothing here runs
inside the gateway's event loop.
"""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the OS picks it; there is no reservation)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_http(
    url: str, timeout_s: float, proc: subprocess.Popen[bytes] | subprocess.Popen[str] | None = None
) -> None:
    """Poll ``url`` with GET until it answers 200.

    Raises ``RuntimeError`` if ``proc`` exits first and ``TimeoutError`` after ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the process exited with code {proc.returncode} before {url} came up")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not come up within {timeout_s:.0f} s")
