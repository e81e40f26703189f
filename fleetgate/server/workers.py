"""``--workers N``: N server processes on one port, and a parent that owns them.

Each worker binds its own listening socket with ``SO_REUSEPORT``, so the kernel spreads new
connections over the workers (by a hash of the client's address and port) instead of waking
them all for each one. The parent holds a bound, non-listening socket on the same port for as
long as it runs, so nobody else can take the port between worker starts.

The parent promises that its workers never outlive it:
- SIGTERM, SIGINT and SIGHUP are forwarded to every worker as SIGTERM (each then shuts down
  gracefully, within its ``shutdown_grace_s``); workers still running ``grace_s + 10`` seconds
  later are killed;
- a worker that exits on its own (a crash, a failed start-up) stops all the others, and the
  parent exits non-zero: a service manager restarts the whole gateway rather than running it
  short of workers without anyone noticing;
- if the parent is killed outright (SIGKILL), each worker gets SIGTERM from the kernel
  (``PR_SET_PDEATHSIG``, set by :func:`die_with_parent`).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence

log = logging.getLogger("fleetgate.server")

PARENT_PID_ENV = "FLEETGATE_WORKER_PARENT"


def supervise(argv: Sequence[str], env: Mapping[str, str], n: int, grace_s: float) -> int:
    """Run ``n`` copies of ``argv`` until a signal or until one exits; the exit code."""
    stopping = False
    deadline = 0.0
    rc = 0
    procs: list[subprocess.Popen[bytes]] = []

    def stop_all(sig: int = signal.SIGTERM) -> None:
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(sig)

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping, deadline
        if not stopping:
            stopping = True
            deadline = time.monotonic() + grace_s + 10
            log.info("signal %d: stopping %d workers", signum, len(procs))
        stop_all()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    child_env = {**env, PARENT_PID_ENV: str(os.getpid())}
    try:
        for _ in range(n):
            if stopping:
                break
            procs.append(subprocess.Popen(list(argv), env=child_env))
        log.info("started %d workers: %s", len(procs), ", ".join(str(p.pid) for p in procs))
        while True:
            if all(p.poll() is not None for p in procs):
                break
            for p in procs:
                code = p.poll()
                if code is not None and not stopping:
                    log.error("worker %d exited with code %d: stopping the others", p.pid, code)
                    rc = 1
                    stopping = True
                    deadline = time.monotonic() + grace_s + 10
                    stop_all()
            if stopping and time.monotonic() > deadline:
                log.error("workers still running after %g s: killing them", grace_s + 10)
                stop_all(signal.SIGKILL)
            time.sleep(0.1)
    finally:
        stop_all(signal.SIGKILL)  # only reached with live workers on an error in this loop
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=5)
        for s, h in old.items():
            signal.signal(s, h)
    if rc == 0 and any(p.returncode not in (0, -signal.SIGTERM) for p in procs):
        rc = 1
    return rc


def die_with_parent() -> None:
    """In a worker: get SIGTERM if the parent dies, and exit now if it already has."""
    parent = int(os.environ.get(PARENT_PID_ENV, "0"))
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if parent and os.getppid() != parent:
        raise SystemExit(1)
