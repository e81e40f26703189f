"""Engine processes on this host, started from a command template.

Promises:

* Each replica runs in its own session, so its process group holds the engine and every
  worker it forks; :meth:`LocalLauncher.stop` sends SIGTERM to the whole group, then SIGKILL
  after the grace period, and returns only when the group is gone (or after a bounded wait).
* GPUs come from the backend's ``gpus`` list, ``gpus_per_replica`` each, as
  ``CUDA_VISIBLE_DEVICES``; one GPU is never given to two live replicas unless ``share_gpus``.
  Accounting is per host (one launcher per pool), so two models listing the same GPU share the
  count too.
* Each replica's stdout and stderr go to ``{log_dir}/{model}/{replica}.log``, created 0600:
  the engine writes it and may print its own arguments (an ``--api-key`` among them), which
  FleetGate can't redact. Everything FleetGate itself writes or shows (the banner in that log,
  the state file's ``argv``, log tails in errors, the gateway log and ``fleet status``) goes
  through :func:`fleetgate.redact.redact`.
* Every live replica has a state file under ``{state_dir}/local/``; it goes when the replica is
  stopped. A gateway that restarts calls :meth:`adopt` and gets back the ones still running
  (checked by pid *and* process start time, so a reused pid is never mistaken for ours).
  Leftovers whose leader died are killed as a group and forgotten. Records owned by another
  gateway process that is still alive are left alone.

Spawning is ``subprocess.Popen`` (fork/exec, a few ms on the loop); everything else is
non-blocking or bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fleetgate.fleet.launchers.base import (
    Handle,
    LauncherBase,
    LaunchError,
    LaunchSpec,
    Observed,
    config_digest,
)
from fleetgate.fleet.spec import FleetSettings, LocalBackend
from fleetgate.redact import redact, redact_argv

log = logging.getLogger("fleetgate.fleet")

_PORT_TAKEN = re.compile(r"address already in use|errno 98|eaddrinuse", re.I)
_KILL_WAIT_S = 5.0
_STEP_S = 0.05


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)[:100] or "_"


def _stat(pid: int | str) -> list[str]:
    """Fields of /proc/PID/stat after the command name: [state, ppid, pgrp, ...]; [] if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return []
    return stat[stat.rfind(")") + 2 :].split()


def processes() -> Iterator[tuple[int, str, int, int]]:
    """(pid, state, ppid, pgrp) of every process on this host (Linux /proc)."""
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            f = _stat(d.name)
            if len(f) > 2:
                yield int(d.name), f[0], int(f[1]), int(f[2])


def proc_start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), or None if it's gone."""
    fields = _stat(pid)
    if not fields or fields[0] == "Z":
        return None  # a zombie has exited; only its exit status is left
    return fields[19] if len(fields) > 19 else None


def _group_alive(pgid: int) -> bool:
    """Whether any process of the group still runs (zombies, already dead, don't count)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if not Path("/proc").is_dir():
        return True
    return any(pgrp == pgid and state != "Z" for _, state, _, pgrp in processes())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def describe_exit(code: int) -> tuple[str, str]:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return "killed", f"killed by {name}"
    return "exited", f"exited with code {code}"


def read_tail(path: str | os.PathLike[str], lines: int, max_bytes: int = 8192) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except OSError:
        return ""
    text = data.decode("utf-8", "replace")
    kept = [ln for ln in text.splitlines() if ln.strip()]
    # The engine writes its own log (its arguments, a key among them, say): what the gateway
    # repeats from it, in its log, errors and status, is redacted.
    return redact("\n".join(kept[-lines:]))


def _spawn(
    argv: list[str], env: dict[str, str], log_path: Path, banner: str
) -> subprocess.Popen[bytes]:
    """fork/exec in a new session, output to the log. Blocks for the fork only (milliseconds).

    The log is the engine's own output, which FleetGate can't redact (vLLM prints its
    arguments), so it is created 0600 and an existing one is tightened to 0600.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.fchmod(fd, 0o600)
    with open(fd, "ab") as logf:
        logf.write(f"=== fleetgate {time.strftime('%Y-%m-%dT%H:%M:%S')}: {banner}\n".encode())
        logf.flush()
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            close_fds=True,
        )


class LocalLauncher(LauncherBase):
    manages_processes = True

    def __init__(self, fleet: FleetSettings) -> None:
        self.state_dir = Path(fleet.state_dir) / "local"
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._gpus: dict[str, int] = {}  # gpu id -> live replicas using it
        self._ports: set[int] = set()

    # --- resources -------------------------------------------------------------------------

    def _take_gpus(self, b: LocalBackend) -> list[str]:
        if b.gpus_per_replica == 0:
            return []
        if b.share_gpus:
            ranked = sorted(b.gpus, key=lambda g: (self._gpus.get(g, 0), b.gpus.index(g)))
            got = ranked[: b.gpus_per_replica]
        else:
            free = [g for g in b.gpus if self._gpus.get(g, 0) == 0]
            if len(free) < b.gpus_per_replica:
                busy = len(b.gpus) - len(free)
                raise LaunchError(
                    "no_gpu",
                    f"no free GPU: needs {b.gpus_per_replica}, {busy} of {len(b.gpus)} in use",
                )
            got = free[: b.gpus_per_replica]
        for g in got:
            self._gpus[g] = self._gpus.get(g, 0) + 1
        return got

    def _give_back(self, gpus: list[str], port: int | None) -> None:
        for g in gpus:
            n = self._gpus.get(g, 0) - 1
            if n > 0:
                self._gpus[g] = n
            else:
                self._gpus.pop(g, None)
        if port is not None:
            self._ports.discard(port)

    def _port_free(self, host: str, port: int) -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                return False
        return True

    def _take_port(self, b: LocalBackend) -> int:
        host = "0.0.0.0" if b.host in ("", "0.0.0.0", "::") else b.host
        if b.port_range is None:
            for _ in range(20):
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                    s.bind((host, 0))
                    port = int(s.getsockname()[1])
                if port not in self._ports:
                    self._ports.add(port)
                    return port
            raise LaunchError("port_taken", "no free port found")
        lo, hi = b.port_range
        for port in range(lo, hi + 1):
            if port not in self._ports and self._port_free(host, port):
                self._ports.add(port)
                return port
        raise LaunchError("port_taken", f"port taken: every port in {lo}-{hi} is in use")

    # --- the interface ---------------------------------------------------------------------

    async def start(self, spec: LaunchSpec) -> Handle:
        b = spec.backend
        assert isinstance(b, LocalBackend)
        gpus = self._take_gpus(b)
        try:
            port = self._take_port(b)
        except LaunchError:
            self._give_back(gpus, None)
            raise
        log_path = Path(b.log_dir) / _safe(spec.model) / f"{_safe(spec.replica_id)}.log"
        slots = {
            "port": str(port),
            "host": b.host,
            "gpus": ",".join(gpus),
            "model": spec.model,
            "served_name": spec.served_name,
            "model_path": b.model_path or "",
            "replica": spec.replica_id,
            "log_dir": b.log_dir,
        }
        parts = shlex.split(b.command) if isinstance(b.command, str) else list(b.command)
        argv = [p.format_map(slots) for p in parts]
        env = dict(os.environ)
        env.update({k: v.format_map(slots) for k, v in b.env.items()})
        if b.gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
        banner = f"starting {spec.replica_id} on port {port}: {shlex.join(redact_argv(argv))}"
        try:
            proc = _spawn(argv, env, log_path, banner)
        except OSError as e:
            self._give_back(gpus, port)
            raise LaunchError("exec", f"cannot run {argv[0]!r}: {e.strerror or e}") from None
        self._procs[spec.replica_id] = proc
        connect = "127.0.0.1" if b.host in ("", "0.0.0.0", "::") else b.host
        info: dict[str, Any] = {
            "pid": proc.pid,
            "pgid": proc.pid,
            "start_time": proc_start_time(proc.pid),
            "port": port,
            "gpus": gpus,
            "log": str(log_path),
            "argv": redact_argv(argv),  # for people to read; never re-run from here
            "digest": config_digest(spec.model, b),
            "gateway_pid": os.getpid(),
            "started_at": time.time(),
            "grace_s": b.stop_grace_s,
        }
        handle = Handle(spec.replica_id, spec.model, f"http://{connect}:{port}", info)
        self._write_state(handle)
        return handle

    def attach(self, spec: LaunchSpec) -> Handle | None:
        return None

    async def poll(self, handle: Handle) -> Observed:
        info = handle.info
        proc = self._procs.get(handle.replica_id)
        if proc is not None:
            rc = proc.poll()
            if rc is None:
                return Observed(running=True)
            kind, detail = describe_exit(rc)
        else:
            if self._leader_alive(info):
                return Observed(running=True)
            rc, kind, detail = None, "gone", "exited (adopted process; exit code unknown)"
        tail = read_tail(info.get("log", ""), 15)
        if _PORT_TAKEN.search(tail):
            kind, detail = "port_taken", f"port taken ({info.get('port')}): {detail}"
        if tail:
            detail += "; log tail:\n" + tail
        return Observed(running=False, exit_code=rc, detail=detail, kind=kind)

    async def stop(self, handle: Handle, grace_s: float | None = None) -> None:
        info = handle.info
        pgid = int(info.get("pgid", 0))
        grace = float(info.get("grace_s", 10.0) if grace_s is None else grace_s)
        proc = self._procs.pop(handle.replica_id, None)
        try:
            if pgid > 0 and (proc is not None or self._leader_alive(info) or _group_alive(pgid)):
                await self._terminate_group(pgid, proc, grace)
        finally:
            self._give_back(list(info.get("gpus", [])), info.get("port"))
            self._state_path(handle.replica_id).unlink(missing_ok=True)

    async def _terminate_group(
        self, pgid: int, proc: subprocess.Popen[bytes] | None, grace: float
    ) -> None:
        def gone() -> bool:
            if proc is not None:
                proc.poll()  # reap the leader, or it lingers as a zombie group member
            else:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pgid, os.WNOHANG)  # only if it happens to be our child
            return not _group_alive(pgid)

        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGTERM)
        for _ in range(int(grace / _STEP_S) + 1):
            if gone():
                return
            await asyncio.sleep(_STEP_S)
        if gone():
            return
        log.warning("process group %d outlived %.1fs grace: SIGKILL", pgid, grace)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        for _ in range(int(_KILL_WAIT_S / _STEP_S)):
            if gone():
                return
            await asyncio.sleep(_STEP_S)
        log.error("process group %d survived SIGKILL for %.0fs", pgid, _KILL_WAIT_S)

    async def adopt(self) -> list[Handle]:
        found: list[Handle] = []
        if not self.state_dir.is_dir():
            return found
        for path in sorted(self.state_dir.glob("*.json"))[:10000]:
            try:
                rec = json.loads(path.read_text())
                handle = Handle(rec["replica_id"], rec["model"], rec["url"], rec["info"], True)
            except (OSError, ValueError, KeyError, TypeError):
                log.warning("ignoring unreadable replica state file %s", path)
                continue
            owner = int(handle.info.get("gateway_pid", 0))
            if (
                owner
                and owner != os.getpid()
                and _pid_alive(owner)
                and self._owner_is_gateway(owner)
            ):
                continue  # another live gateway's replica
            if self._leader_alive(handle.info):
                for g in handle.info.get("gpus", []):
                    self._gpus[g] = self._gpus.get(g, 0) + 1
                if handle.info.get("port") is not None:
                    self._ports.add(int(handle.info["port"]))
                handle.info["gateway_pid"] = os.getpid()
                self._write_state(handle)
                found.append(handle)
            else:
                pgid = int(handle.info.get("pgid", 0))
                if pgid > 0 and _group_alive(pgid):
                    log.warning(
                        "killing orphaned workers of %s (group %d)", handle.replica_id, pgid
                    )
                    await self._terminate_group(pgid, None, 0.0)
                path.unlink(missing_ok=True)
        return found

    def forget(self, handle: Handle) -> None:
        self._procs.pop(handle.replica_id, None)  # keep its state file: the next run adopts it

    def log_tail(self, handle: Handle, lines: int = 1) -> str:
        return read_tail(handle.info.get("log", ""), lines)

    # --- state files -----------------------------------------------------------------------

    def _state_path(self, replica_id: str) -> Path:
        return self.state_dir / f"{_safe(replica_id)}.json"

    def _write_state(self, handle: Handle) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        rec = {
            "replica_id": handle.replica_id,
            "model": handle.model,
            "url": handle.url,
            "info": handle.info,
        }
        path = self._state_path(handle.replica_id)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(fd, "w") as f:
            f.write(json.dumps(rec))
        os.replace(tmp, path)

    @staticmethod
    def _leader_alive(info: dict[str, Any]) -> bool:
        pid = int(info.get("pid", 0))
        if pid <= 0:
            return False
        now = proc_start_time(pid)
        want = info.get("start_time")
        if now is None:
            return False if Path("/proc/self/stat").exists() else _pid_alive(pid)
        return want is None or now == want

    @staticmethod
    def _owner_is_gateway(pid: int) -> bool:
        """Whether ``pid`` still looks like a Python process (a gateway), not a reused pid."""
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return True  # can't tell: be safe, leave its replicas alone
        return b"python" in cmd or b"fleetgate" in cmd
