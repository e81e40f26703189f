"""Finding processes the test run started and didn't stop (Linux ``/proc``).

The session marks itself with an environment variable (``FLEETGATE_TEST_RUN``) whose value is
unique to this pytest process; every process the tests start inherits it, and so do the
engines those processes start in turn. At the end, a marked process still running is a
leftover when it is a FleetGate process (gateway, simulator, demo) or an orphan (its parent is
no longer one of ours). Processes of other test runs on the same host carry another value
and are never touched.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
import uuid
from pathlib import Path

MARKER_ENV = "FLEETGATE_TEST_RUN"


def mark_session() -> str:
    token = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
    os.environ[MARKER_ENV] = token
    return token


def _stat(pid: str) -> tuple[str, int] | None:
    try:
        s = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = s[s.rfind(")") + 2 :].split()
    return fields[0], int(fields[1])


def _marked(token: str) -> dict[int, tuple[int, str]]:
    """pid -> (ppid, command line) of every live process carrying ``token``."""
    want = f"{MARKER_ENV}={token}".encode()
    out: dict[int, tuple[int, str]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if want not in (d / "environ").read_bytes().split(b"\0"):
                continue
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        st = _stat(d.name)
        if st is not None and st[0] != "Z":
            out[int(d.name)] = (st[1], cmd.strip())
    return out


def leftovers(token: str, root: int) -> dict[int, str]:
    """Marked processes that should be gone: FleetGate ones, and orphans of any kind."""
    marked = _marked(token)
    return {
        pid: cmd
        for pid, (ppid, cmd) in marked.items()
        if pid != root and ("fleetgate" in cmd or (ppid != root and ppid not in marked))
    }


def wait_for_none(token: str, root: int, timeout_s: float = 10.0) -> dict[int, str]:
    """Leftovers still running after up to ``timeout_s`` (processes being stopped may lag)."""
    deadline = time.monotonic() + timeout_s
    left = leftovers(token, root)
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = leftovers(token, root)
    return left


def kill(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
