"""SLURM's client commands, run here or on a login node over SSH, and reading their answers.

:func:`run` runs one command (``sbatch``, ``squeue``, ``scancel``, ``sacct``) as an asyncio
subprocess in its own session, with a timeout, never blocking the event loop; over SSH it is
the system ``ssh`` with ``BatchMode=yes`` and strict host-key checking against the configured
``known_hosts``. :func:`parse_squeue` reads ``squeue -o FORMAT`` lines. Nothing here decides
anything: the launcher (:mod:`fleetgate.fleet.launchers.slurm`) does.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shlex
import time
from dataclasses import dataclass

from fleetgate.fleet.launchers.base import LaunchError
from fleetgate.fleet.spec import SlurmSubmit

#: squeue's output format: id, name, state, reason, node, time left, (expected) start.
FORMAT = "%i|%j|%T|%r|%N|%L|%S"
CMD_TIMEOUT_S = 30.0


def parse_duration(text: str) -> float | None:
    """SLURM's ``[D-]HH:MM:SS`` / ``MM:SS`` (``%L``) as seconds; None for UNLIMITED and such."""
    m = re.match(r"^(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)$", text.strip())
    if not m:
        return None
    d, h, mi, s = (int(x) if x else 0 for x in m.groups())
    return float(((d * 24 + h) * 60 + mi) * 60 + s)


def parse_time(text: str) -> float | None:
    """``%S`` (local time, ``2026-11-24T03:45:36``) as epoch seconds; None for N/A."""
    try:
        return time.mktime(time.strptime(text.strip(), "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return None


@dataclass(frozen=True)
class Job:
    job_id: str
    name: str
    state: str
    reason: str
    node: str
    time_left_s: float | None
    start_at: float | None  # epoch: when it started, or when the queue expects it to


def parse_squeue(text: str, prefix: str) -> dict[str, Job]:
    """Lines of ``squeue -h -o _FORMAT`` whose job name starts with ``prefix``."""
    jobs = {}
    for line in text.splitlines():
        parts = line.split("|")
        if len(parts) != 7 or not parts[1].startswith(prefix):
            continue
        jid, name, state, reason, node, left, start = (p.strip() for p in parts)
        state = state.split()[0] if state else "UNKNOWN"
        jobs[jid] = Job(jid, name, state, reason, node, parse_duration(left), parse_time(start))
    return jobs


def ssh_argv(s: SlurmSubmit) -> list[str]:
    """The system ``ssh``: keys only (``BatchMode``), host key checked against ``known_hosts``."""
    argv = [
        "ssh",
        "-o", "BatchMode=yes",
        "-o", "StrictHostKeyChecking=yes",
        "-o", f"UserKnownHostsFile={s.known_hosts}",
        "-o", "ConnectTimeout=10",
        "-p", str(s.port),
    ]
    if s.key_file:
        argv += ["-i", s.key_file, "-o", "IdentitiesOnly=yes"]
    if s.user:
        argv += ["-l", s.user]
    return [*argv, "--", str(s.host)]


async def run(
    submit: SlurmSubmit,
    argv: list[str],
    stdin: str | None = None,
    remote: str | None = None,
) -> tuple[int, str, str]:
    """Run a SLURM client command here or over SSH (``remote``: the remote shell's
    command line, when it is more than ``argv``): (exit code, stdout, stderr)."""
    if submit.via == "ssh":
        full = [*ssh_argv(submit), remote or shlex.join(argv)]
    else:
        full = argv
    try:
        proc = await asyncio.create_subprocess_exec(
            *full,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
    except OSError as e:
        raise LaunchError("exec", f"cannot run {full[0]!r}: {e.strerror or e}") from None
    try:
        out, err = await asyncio.wait_for(
            proc.communicate(stdin.encode() if stdin is not None else None), CMD_TIMEOUT_S
        )
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        where = f"on {submit.host} over SSH" if submit.via == "ssh" else "here"
        raise LaunchError(
            "timeout", f"{argv[0]} {where} did not answer within {CMD_TIMEOUT_S:g}s"
        ) from None
    rc = proc.returncode if proc.returncode is not None else -1
    return rc, out.decode(errors="replace"), err.decode(errors="replace")


def failure(submit: SlurmSubmit, what: str, rc: int, err: str) -> LaunchError:
    err = " ".join(err.split())[-600:] or f"exit code {rc}"
    if submit.via == "ssh" and rc == 255:
        return LaunchError("ssh", f"cannot reach {submit.host} over SSH: {err}")
    return LaunchError("sbatch" if what == "sbatch" else "slurm", f"{what} failed: {err}")
