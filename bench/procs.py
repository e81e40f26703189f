"""Processes the harness starts: start, wait until they answer, sample RSS and CPU, stop.

Every process is started in its own session and registered with a :class:`Procs` group, which
stops them all (SIGTERM, then SIGKILL) on exit, on an exception and on SIGTERM/SIGINT to the
harness. Nothing here touches a process the harness did not start.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fleetgate.cli.serve import self_python

_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def raise_nofile(wanted: int = 0) -> int:
    """Raise this process's open-file limit to ``wanted`` or the hard limit, whichever is more.

    Children inherit it, which is the point: scenario 4 holds two sockets per stream in the
    gateway (client and upstream), one in the simulator and one in the load generator, so
    10,000 streams need more than the 20,000 a VM's default hard limit often is. The hard limit
    is raised only where this process may (root, up to ``fs.nr_open``); otherwise the soft limit
    goes to the hard one. Returns the soft limit now in force.
    """
    inf = resource.RLIM_INFINITY
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != inf and wanted > hard:
        with contextlib.suppress(OSError, ValueError):
            wanted = min(wanted, int(Path("/proc/sys/fs/nr_open").read_text()))
        with contextlib.suppress(OSError, ValueError):  # needs CAP_SYS_RESOURCE
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = max(soft, wanted) if hard == inf else hard
    if soft != inf and soft < target:
        with contextlib.suppress(OSError, ValueError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            out.extend(int(c) for c in (task / "children").read_text().split())
    return out


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (worker processes count towards a server's cost)."""
    seen, todo = [], [pid]
    while todo:
        p = todo.pop()
        seen.append(p)
        todo.extend(_children(p))
    return seen


def rss_bytes(pid: int) -> int:
    total = 0
    for p in tree(pid):
        with contextlib.suppress(OSError, IndexError, ValueError):
            total += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * _PAGE
    return total


def cpu_seconds(pid: int) -> float:
    """User+system CPU of ``pid``'s process tree, reaped children included.

    A live process's own time is its ``utime + stime``; a child that has exited and been
    waited for moves its time into its parent's ``cutime + cstime``. Counting both over the
    tree makes the total grow monotonically while workers (FleetGate's ``--workers``,
    LiteLLM's ``--num_workers``) and any short-lived helpers come and go, so the difference of
    two readings is the tree's CPU between them.
    """
    total = 0.0
    for p in tree(pid):
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = Path(f"/proc/{p}/stat").read_text()
            f = stat[stat.rindex(")") + 2 :].split()
            # utime, stime, cutime, cstime
            total += (int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])) / _TICK
    return total


@dataclass
class Sampler:
    """Samples a process tree's RSS every ``interval_s`` in a thread: peak and series."""

    pid: int
    interval_s: float = 0.25
    peak_rss: int = 0
    series: list[tuple[float, int]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Sampler:
        self.t0 = time.monotonic()
        self.cpu0 = cpu_seconds(self.pid)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def sample(self) -> int:
        r = rss_bytes(self.pid)
        self.peak_rss = max(self.peak_rss, r)
        self.series.append((time.monotonic() - self.t0, r))
        return r

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()
        self.wall_s = time.monotonic() - self.t0
        self.cpu_s = cpu_seconds(self.pid) - self.cpu0


FLEETGATE_MAIN = "from fleetgate.cli.main import main; main()"


def fleetgate_argv(*args: str) -> list[str]:
    """``fleetgate ARGS`` as this interpreter runs it, through the gateway's own
    :func:`~fleetgate.cli.serve.self_python` (``python -P``): the working directory is not put
    first on ``sys.path``, so a ``PYTHONPATH`` tree (another revision, the compiled build) is
    what gets imported even when the harness runs from this checkout's root. (Not its
    ``self_env``: here the tree the caller names must win, not the harness's own FleetGate.)"""
    return [*self_python(FLEETGATE_MAIN), *args]


class Proc:
    def __init__(self, name: str, argv: Sequence[str], log: Path, env: dict[str, str] | None):
        self.name = name
        self.log_path = log
        self._log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            list(argv),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, n: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        return ""

    def stop(self, grace_s: float = 10) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout=5)
        self._log.close()


class Procs:
    """A group of started processes, all stopped when the group closes."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.items: list[Proc] = []

    def start(
        self, name: str, argv: Sequence[str], env: dict[str, str] | None = None
    ) -> Proc:
        p = Proc(name, argv, self.logdir / f"{name}.log", env)
        self.items.append(p)
        return p

    def stop(self, proc: Proc) -> None:
        proc.stop()
        with contextlib.suppress(ValueError):
            self.items.remove(proc)

    def close(self) -> None:
        while self.items:
            self.items.pop().stop()

    def __enter__(self) -> Procs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_http(url: str, timeout_s: float, proc: Proc | None = None, ok: int = 200) -> None:
    """Poll ``url`` with GET until it answers ``ok``; raise with the process's log tail if not."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited early:\n{proc.tail()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == ok:
                    return
        except urllib.error.HTTPError as e:
            if e.code == ok:
                return
            last = f"HTTP {e.code}"
        except OSError as e:
            last = str(e)
        time.sleep(0.1)
    tail = proc.tail() if proc is not None else ""
    raise TimeoutError(f"{url} did not answer {ok} within {timeout_s:.0f} s ({last})\n{tail}")


def sockets_on(port: int, state: str) -> set[int]:
    """Inodes of the sockets on local ``port`` in TCP ``state`` (``01`` established, ``0A``
    listening), from ``/proc/net/tcp``."""
    out = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        if f[3] == state and int(f[1].split(":")[1], 16) == port:
            out.add(int(f[9]))
    return out


def wait_listening(port: int, n: int, timeout_s: float) -> None:
    """Until ``n`` sockets listen on ``port`` (``--workers N``: ``/ready`` answers as soon as the
    first worker is up, and connections made before the others listen all land on it)."""
    deadline = time.monotonic() + timeout_s
    while len(sockets_on(port, "0A")) < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{n} workers did not all listen on port {port} in {timeout_s} s")
        time.sleep(0.05)


def wait_tcp(port: int, timeout_s: float) -> None:
    """Until something accepts on ``127.0.0.1:port`` (bounded)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
