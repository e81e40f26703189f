"""A real single-node SLURM cluster for the tests, in a temporary directory.

Nothing is installed here (``scripts/test.sh`` installs Debian's ``slurmctld``, ``slurmd``,
``slurm-client`` and ``munge``). :class:`Cluster` starts its own ``munged`` on a private
socket with a key it makes, writes a ``slurm.conf`` (the facts seen working on this kind of
machine as root: ``SlurmUser=root``, ``proctrack/linuxproc``, ``task/none``,
``select/cons_tres`` with ``CR_Core_Memory``, no accounting) with free ports and its state and
spool under the temporary directory, then ``slurmctld -c`` and ``slurmd``. ``SLURM_CONF``
points every client call at it, the gateway's included. :meth:`Cluster.stop` cancels every
job, then stops the three daemons by their pid files.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from fleetgate.localnet import free_port

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel")
NODE_MEM_MB = 20000


def missing() -> str | None:
    """Why a real cluster can't run here, or None."""
    if os.geteuid() != 0:
        return "the SLURM tier runs the daemons as root"
    for tool in DAEMONS:
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            return f"{tool} is not installed (scripts/test.sh installs slurmctld slurmd munge)"
    return None


def _exe(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class Cluster:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.host = socket.gethostname().split(".")[0]
        self.cpus = os.cpu_count() or 1
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def _write(self) -> None:
        r = self.root
        for d in ("state", "spool", "log", "munge"):
            (r / d).mkdir(parents=True, exist_ok=True)
        (r / "munge").chmod(0o700)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(128))
        key.chmod(0o400)
        self.conf.write_text(
            f"""ClusterName=fgtest
SlurmctldHost={self.host}
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket={r}/munge/sock
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
ReturnToService=2
SchedulerParameters=sched_interval=1,bf_interval=1
MinJobAge=60
KillWait=5
InactiveLimit=0
MessageTimeout=10
NodeName={self.host} CPUs={self.cpus} RealMemory={NODE_MEM_MB} State=UNKNOWN
PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP
"""
        )

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(argv), env=self.env, capture_output=True, text=True, timeout=30, check=check
        )

    def start(self) -> None:
        self._write()
        r = self.root
        self.run(
            _exe("munged"), "--force", "-S", f"{r}/munge/sock",
            f"--key-file={r}/munge/munge.key", f"--log-file={r}/munge/log",
            f"--pid-file={r}/munge/pid", f"--seed-file={r}/munge/seed",
        )
        self.run(_exe("slurmctld"), "-c")
        self.run(_exe("slurmd"))
        deadline = time.monotonic() + 60
        state = ""
        while time.monotonic() < deadline:
            out = self.run("sinfo", "--noheader", "-o", "%t", check=False)
            state = out.stdout.strip()
            if out.returncode == 0 and state in ("idle", "mix", "alloc"):
                return
            time.sleep(0.5)
        raise RuntimeError(f"SLURM didn't come up (node state {state!r}):\n{self.logs()}")

    def logs(self) -> str:
        out = []
        for f in ("log/slurmctld.log", "log/slurmd.log"):
            p = self.root / f
            if p.exists():
                out.append(f"--- {f}\n" + "\n".join(p.read_text().splitlines()[-20:]))
        return "\n".join(out)

    # --- jobs --------------------------------------------------------------------------------

    def jobs(self) -> list[dict[str, str]]:
        """Every job still in the queue (pending, running or completing)."""
        out = self.run("squeue", "--noheader", "-o", "%i|%j|%T|%r|%N").stdout
        keys = ("job_id", "name", "state", "reason", "node")
        return [dict(zip(keys, ln.split("|"), strict=True)) for ln in out.splitlines() if ln]

    def cancel_all(self, timeout_s: float = 30) -> list[str]:
        """scancel whatever is left; wait until the queue is empty. What was left, by name."""
        left = [f"{j['job_id']} {j['name']} {j['state']}" for j in self.jobs()]
        if left:
            self.run("scancel", "--user=root", check=False)
        deadline = time.monotonic() + timeout_s
        while self.jobs() and time.monotonic() < deadline:
            time.sleep(0.5)
        return left

    def wait_empty(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.jobs():
                return True
            time.sleep(0.5)
        return not self.jobs()

    # --- ending ------------------------------------------------------------------------------

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.cancel_all(20)
        for name in ("slurmd", "slurmctld", "munge/munged"):
            pidfile = self.root / (f"{name}.pid" if "/" not in name else "munge/pid")
            with contextlib.suppress(OSError, ValueError):
                pid = int(pidfile.read_text().strip())
                _terminate(pid)


def _terminate(pid: int, grace_s: float = 10) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
