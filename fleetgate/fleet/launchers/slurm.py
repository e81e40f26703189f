"""Replicas as SLURM jobs, submitted here or on a login node over SSH.

Promises:

* :meth:`SlurmLauncher.start` renders the job script (:mod:`fleetgate.fleet.slurm_script`)
  and pipes it to ``sbatch --parsable``; the script never touches a disk on the gateway's
  side and the one-time token in it is kept here only as a SHA-256 digest. A refusal
  (a bad partition, an unreachable SSH host) is a :class:`LaunchError` carrying sbatch's
  stderr: the supervisor backs off and retries, then holds the model failed, and the
  gateway keeps serving everything else.
* The node and port come from the job itself: an authenticated callback
  (:meth:`accept_callback`, refused without the right token and after the first use) or a
  file under ``shared_dir`` carrying the same token. Readiness is the supervisor's own
  ``/health`` and ``/v1/models`` probe, never a log line.
* Job states come from one ``squeue`` call (every job of this user, filtered to this
  gateway's name prefix) per submit target per ``poll_interval_s`` (the smallest any model
  sets, at least 2 s), however many replicas poll: :meth:`poll` answers from that snapshot.
  Without accounting (``sacct``) a job that left the queue is reported as just that.
* ``stop`` is ``scancel``. Each job has a record under ``{state_dir}/slurm/`` (mode 0600) so a
  restarted gateway adopts its jobs (:meth:`adopt`), and cancels jobs with its prefix that it
  has no record of.

Every command runs as an asyncio subprocess with a timeout; none blocks the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import re
import secrets
import shlex
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleetgate.fleet.launchers.base import (
    CALLBACK_PATH,
    Handle,
    LauncherBase,
    LaunchError,
    LaunchSpec,
    Observed,
    config_digest,
)
from fleetgate.fleet.launchers.local import read_tail
from fleetgate.fleet.launchers.slurm_client import FORMAT, Job, failure, parse_squeue, run
from fleetgate.fleet.slurm_script import (
    JOB_PREFIX,
    JobParams,
    job_name,
    render,
    safe_name,
)
from fleetgate.fleet.spec import FleetSettings, SlurmBackend, SlurmSubmit

log = logging.getLogger("fleetgate.fleet.slurm")

_MIN_POLL_S = 2.0
_ADDRESS_POLL_S = 1.0  # while a running job's address is awaited (cheap: no squeue call)
_QUEUED = {"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "SUSPENDED"}
_RUNNING = {"RUNNING", "RESIZING"}
# SLURM puts "a year from now" as the start of a job it can't place yet: no estimate.
_NO_ESTIMATE_S = 7 * 86400
_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,252})$")


def _sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass
class _Queue:
    """The last ``squeue`` answer for one submit target."""

    jobs: dict[str, Job] = field(default_factory=dict)
    at: float | None = None  # monotonic time of the last good answer
    asked: float | None = None  # of the last attempt, good or not: the rate limit
    error: str = ""
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass
class _Tracked:
    backend: SlurmBackend
    job_id: str
    submitted_mono: float
    submitted_wall: float
    report_file: str = ""  # discovery: file
    pending_warned: bool = False
    ran: bool = False  # seen running (a requeued job back in the queue has lost its address)
    # What squeue said, each time it changed: [wall time, state, reason], the last 16.
    history: deque[list[Any]] = field(default_factory=lambda: deque(maxlen=16))

    def record(self, state: str, reason: str) -> list[list[Any]]:
        if not self.history or self.history[-1][1:] != [state, reason]:
            self.history.append([round(time.time(), 3), state, reason])
        return list(self.history)


class SlurmLauncher(LauncherBase):
    manages_processes = True

    def __init__(self, fleet: FleetSettings) -> None:
        self.fleet = fleet
        self.gateway_id = fleet.resolved_gateway_id()
        self.prefix = f"{JOB_PREFIX}{self.gateway_id}."
        self.state_dir = Path(fleet.state_dir) / "slurm"
        self._tracked: dict[str, _Tracked] = {}
        self._tokens: dict[str, str] = {}  # replica id -> token digest, until its first use
        self._addr: dict[str, str] = {}  # replica id -> http://host:port, once reported
        self._queues: dict[SlurmSubmit, _Queue] = {}

    # --- commands --------------------------------------------------------------------------

    async def _refresh(self, submit: SlurmSubmit, force: bool = False) -> _Queue:
        """One ``squeue`` for every job of ours on that target, at most once per interval."""
        q = self._queues.setdefault(submit, _Queue())
        every = min(
            (t.backend.poll_interval_s for t in self._tracked.values() if t.backend.submit == submit),
            default=10.0,
        )
        every = max(_MIN_POLL_S, every)

        def fresh() -> bool:
            return q.asked is not None and time.monotonic() - q.asked < every

        if not force and fresh() and not q.lock.locked():
            return q
        async with q.lock:  # a call in flight: wait for its answer rather than an older one
            if not force and fresh():
                return q  # another poller refreshed it while we waited
            asked = q.asked = time.monotonic()
            try:
                rc, out, err = await run(
                    submit, ["squeue", "--noheader", "--me", "--states=all", "-o", FORMAT]
                )
            except LaunchError as e:
                rc, out, err = -1, "", e.message
            if rc == 0:
                q.jobs, q.at, q.error = parse_squeue(out, self.prefix), asked, ""
            else:
                # Keep the last answer (jobs are never replaced for want of a view of them);
                # the next attempt comes no sooner than the interval.
                q.error = failure(submit, "squeue", rc, err).message
                log.warning("SLURM: %s", q.error)
        return q

    # --- the interface ---------------------------------------------------------------------

    def _paths(self, spec: LaunchSpec, b: SlurmBackend) -> tuple[str, str, str, str]:
        """(log directory, log path with %j, where the job reports, the report file or "")."""
        log_dir = b.log_dir if b.submit.via == "ssh" else os.path.abspath(b.log_dir)
        log_dir = f"{log_dir}/{safe_name(spec.model)}"
        log_path = f"{log_dir}/{safe_name(spec.replica_id)}-%j.log"
        if b.discovery == "callback":
            return log_dir, log_path, f"{b.callback_url}{CALLBACK_PATH}", ""
        assert b.shared_dir is not None
        report_file = os.path.join(
            os.path.abspath(b.shared_dir), self.gateway_id, f"{safe_name(spec.replica_id)}.json"
        )
        return log_dir, log_path, report_file, report_file

    async def start(self, spec: LaunchSpec) -> Handle:
        b = spec.backend
        assert isinstance(b, SlurmBackend)
        token = secrets.token_urlsafe(32)
        name = job_name(self.gateway_id, spec.model, spec.replica_id)
        log_dir, log_path, report_to, report_file = self._paths(spec, b)
        params = JobParams(
            spec.model, spec.served_name, spec.replica_id, name, token, log_path, report_to
        )
        try:
            script = render(b, params)
        except ValueError as e:
            raise LaunchError("script", str(e)) from None
        if b.submit.via == "local":
            with contextlib.suppress(OSError):
                os.makedirs(log_dir, exist_ok=True)
        # Over SSH, one round trip: make the log directory (SLURM won't), then submit.
        remote = f"mkdir -p -- {shlex.quote(log_dir)} && sbatch --parsable"
        rc, out, err = await run(b.submit, ["sbatch", "--parsable"], script, remote)
        if rc != 0:
            raise failure(b.submit, "sbatch", rc, err)
        job_id = out.strip().split(";")[0]
        if not job_id.isdigit():
            raise LaunchError("sbatch", f"sbatch answered something other than a job id: {out[:200]!r}")
        self._tokens[spec.replica_id] = _sha(token)
        self._tracked[spec.replica_id] = _Tracked(
            b, job_id, time.monotonic(), time.time(), report_file
        )
        info: dict[str, Any] = {
            "job_id": job_id,
            "job_name": name,
            "label": f"submitted as SLURM job {job_id}",
            "log": log_path.replace("%j", job_id),
            "digest": config_digest(spec.model, b),
        }
        handle = Handle(spec.replica_id, spec.model, "", info)
        self._write_state(handle)
        log.info("replica %s (%s): submitted SLURM job %s (%s)", spec.replica_id, spec.model, job_id, name)
        return handle

    def poll_every_s(self, handle: Handle) -> float | None:
        t = self._tracked.get(handle.replica_id)
        if t is None:
            return None
        if not handle.url:
            return _ADDRESS_POLL_S  # answers from memory; the squeue call stays rate-limited
        return max(_MIN_POLL_S, t.backend.poll_interval_s)

    def handover_before_s(self, handle: Handle) -> float | None:
        # Any time limit counts, the partition's default too: squeue says how much is left.
        t = self._tracked.get(handle.replica_id)
        return None if t is None else t.backend.handover_before_s

    async def poll(self, handle: Handle) -> Observed:
        rid = handle.replica_id
        t = self._tracked.get(rid)
        if t is None:
            return Observed(running=False, kind="gone", detail="(no SLURM job known for it)")
        q = await self._refresh(t.backend.submit)
        job = q.jobs.get(t.job_id)
        private = {"job_id": t.job_id, "node": job.node if job and job.node else None}
        if job is None:
            if q.at is None or q.at <= t.submitted_mono or q.error:
                # Not seen yet (submitted after the last answer), or SLURM unreachable: assume
                # it is still there rather than replace a job that may be running.
                # squeue's error names hosts and commands: admins only.
                note = "submitted to SLURM" + ("; its state is unknown for now" if q.error else "")
                if q.error:
                    private["slurm_error"] = q.error[:300]
                return Observed(
                    running=True, started=False, note=note, private=private,
                    public={"slurm_state": "SUBMITTED", "pending_reason": None},
                )
            return await self._ended(handle, t, "left the queue")
        public: dict[str, Any] = {
            "slurm_state": job.state,
            "pending_reason": None,
            "slurm_history": t.record(job.state, job.reason),
        }
        if job.state in _QUEUED and t.ran:
            # Preempted and requeued: the engine it ran is gone and its one-time token is
            # spent, so it can't report a new address. Replace it with a fresh job.
            return await self._ended(handle, t, f"was requeued ({job.state})", "requeued")
        if job.state in _QUEUED:
            return await self._queued(handle, t, job, public, private)
        if job.state in _RUNNING:
            t.ran = True
            url = self._addr.get(rid) or self._read_report(rid, t)
            note = "" if url else "running on the cluster; waiting for the engine's address"
            left = job.time_left_s
            if left is not None and q.at is not None:
                left = max(0.0, left - (time.monotonic() - q.at))
            return Observed(
                running=True, url=url or None, note=note, ends_in_s=left,
                public=public, private=private,
            )
        why = job.state + (f" ({job.reason})" if job.reason and job.reason != "None" else "")
        return await self._ended(handle, t, f"ended: {why}", job.state.lower())

    async def _queued(
        self, handle: Handle, t: _Tracked, job: Job, public: dict[str, Any],
        private: dict[str, Any],
    ) -> Observed:
        b = t.backend
        # "None" until the scheduler has looked at the job.
        reason = job.reason.strip("()") if job.reason not in ("", "None", "(null)") else ""
        public["pending_reason"] = reason or None
        eta = None
        if job.start_at is not None and job.start_at - time.time() < _NO_ESTIMATE_S:
            eta = max(0.0, job.start_at - time.time())
        public["expected_start_in_s"] = None if eta is None else round(eta)
        note = f"queued in SLURM: {reason}" if reason else "queued in SLURM"
        if eta is not None:
            note += f", expected to start in about {eta:.0f}s"
        waited = time.time() - t.submitted_wall
        if b.pending_timeout_s is not None and waited > b.pending_timeout_s:
            over = f"pending for {waited:.0f}s, over pending_timeout_s ({b.pending_timeout_s:g}s)"
            if b.pending_timeout_action == "cancel":
                log.warning("replica %s: SLURM job %s %s: cancelling", handle.replica_id, t.job_id, over)
                await self._cancel(b.submit, t.job_id)
                return Observed(
                    running=False, kind="pending_timeout",
                    detail=f"(SLURM job {t.job_id}) cancelled: {over} ({reason or 'queued'})",
                )
            if not t.pending_warned:
                t.pending_warned = True
                log.warning("replica %s: SLURM job %s %s (%s)", handle.replica_id, t.job_id, over, reason or "queued")
            note += f"; {over}"
        return Observed(
            running=True, started=False, note=note, eta_s=eta, public=public, private=private
        )

    async def _ended(
        self, handle: Handle, t: _Tracked, what: str, kind: str = "gone"
    ) -> Observed:
        detail = f"(SLURM job {t.job_id}) {what}"
        if kind == "gone":
            detail += await self._accounting(t)
        tail = self.log_tail(handle, 10)
        if tail:
            detail += "; log tail:\n" + tail
        return Observed(running=False, kind=kind, detail=detail)

    async def _accounting(self, t: _Tracked) -> str:
        """sacct's final state where accounting exists; nothing where it doesn't."""
        try:
            rc, out, _ = await run(
                t.backend.submit,
                ["sacct", "--noheader", "--parsable2", "-j", t.job_id, "-o", "State,ExitCode"],
            )
        except LaunchError:
            return ""
        first = out.strip().splitlines()[0] if rc == 0 and out.strip() else ""
        return f" (accounting: {first})" if first else ""

    async def _cancel(self, submit: SlurmSubmit, job_id: str) -> None:
        try:
            rc, _, err = await run(submit, ["scancel", job_id])
        except LaunchError as e:
            log.warning("scancel %s: %s", job_id, e.message)
            return
        if rc != 0:
            log.warning("scancel %s failed: %s", job_id, " ".join(err.split())[:300])

    async def stop(self, handle: Handle, grace_s: float | None = None) -> None:
        rid = handle.replica_id
        t = self._tracked.pop(rid, None)
        self._tokens.pop(rid, None)
        self._addr.pop(rid, None)
        try:
            if t is not None:
                await self._cancel(t.backend.submit, t.job_id)
                log.info("replica %s: cancelled SLURM job %s", rid, t.job_id)
                if t.report_file:
                    with contextlib.suppress(OSError):
                        os.unlink(t.report_file)
        finally:
            self._state_path(rid).unlink(missing_ok=True)

    def forget(self, handle: Handle) -> None:
        # keep_on_shutdown: the job and its record stay for the next run to adopt.
        self._tracked.pop(handle.replica_id, None)

    def log_tail(self, handle: Handle, lines: int = 1) -> str:
        path = handle.info.get("log", "")
        return read_tail(path, lines) if path and os.path.isabs(path) else ""

    # --- discovery -------------------------------------------------------------------------

    def accept_callback(self, replica_id: str, token: str, host: str, port: int) -> str | None:
        want = self._tokens.get(replica_id)
        if want is None:
            return "no callback is expected for this replica (unknown, or its token was used)"
        if not hmac.compare_digest(_sha(token), want):
            return "wrong token"
        url = _url(host, port)
        if url is None:
            return "bad host or port"
        del self._tokens[replica_id]  # one use: a replay is refused
        self._addr[replica_id] = url
        log.info("replica %s: engine reported at %s", replica_id, url)
        path = self._state_path(replica_id)
        with contextlib.suppress(OSError, ValueError):
            rec = json.loads(path.read_text())
            rec["url"], rec["token_sha"] = url, None
            self._write_record(path, rec)
        return None

    def _read_report(self, replica_id: str, t: _Tracked) -> str | None:
        """``discovery: file``: the job's report, checked like a callback, then removed."""
        if not t.report_file:
            return None
        try:
            doc = json.loads(Path(t.report_file).read_text())
            token, host, port = str(doc["token"]), str(doc["host"]), int(doc["port"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        why = self.accept_callback(replica_id, token, host, port)
        with contextlib.suppress(OSError):
            os.unlink(t.report_file)
        if why:
            log.warning("replica %s: discovery file refused: %s", replica_id, why)
        return self._addr.get(replica_id)

    # --- adoption --------------------------------------------------------------------------

    async def adopt(self) -> list[Handle]:
        """Jobs a previous run of this gateway left: those still queued or running come back
        as handles; records of finished jobs are dropped; jobs with this gateway's prefix
        and no record are cancelled."""
        if not self.state_dir.is_dir():
            return []
        recs = []
        for path in sorted(self.state_dir.glob("*.json"))[:10000]:
            try:
                rec = json.loads(path.read_text())
                b = SlurmBackend.model_validate(rec["backend"])
                recs.append((path, rec, b))
            except (OSError, ValueError, KeyError, TypeError):
                log.warning("ignoring unreadable SLURM job record %s", path)
        found: list[Handle] = []
        queues: dict[SlurmSubmit, _Queue] = {}
        for submit in {b.submit for _, _, b in recs}:
            queues[submit] = await self._refresh(submit, force=True)
        known: set[str] = set()
        for path, rec, b in recs:
            q = queues[b.submit]
            job = q.jobs.get(str(rec["job_id"]))
            alive = job is not None and (job.state in _QUEUED or job.state in _RUNNING)
            if q.error or alive:  # SLURM unreachable: assume alive; poll will tell
                rid = str(rec["replica_id"])
                known.add(str(rec["job_id"]))
                self._tracked[rid] = _Tracked(
                    b, str(rec["job_id"]), time.monotonic(), float(rec.get("submitted_at", 0)),
                    str(rec.get("report_file", "")),
                    ran=bool(rec.get("url")),
                )
                if rec.get("url"):
                    self._addr[rid] = str(rec["url"])
                elif rec.get("token_sha"):
                    self._tokens[rid] = str(rec["token_sha"])
                found.append(Handle(rid, str(rec["model"]), rec.get("url") or "", rec["info"], True))
            else:
                path.unlink(missing_ok=True)
        for submit, q in queues.items():
            for job in q.jobs.values():
                if job.job_id not in known and (job.state in _QUEUED or job.state in _RUNNING):
                    log.warning("cancelling SLURM job %s (%s): no record of it", job.job_id, job.name)
                    await self._cancel(submit, job.job_id)
        return found

    def _state_path(self, replica_id: str) -> Path:
        return self.state_dir / f"{safe_name(replica_id, 120)}.json"

    def _write_state(self, handle: Handle) -> None:
        t = self._tracked[handle.replica_id]
        rec = {
            "replica_id": handle.replica_id,
            "model": handle.model,
            "job_id": t.job_id,
            "url": self._addr.get(handle.replica_id),
            "token_sha": self._tokens.get(handle.replica_id),
            "submitted_at": t.submitted_wall,
            "report_file": t.report_file,
            "backend": t.backend.model_dump(mode="json"),
            "info": handle.info,
        }
        self._write_record(self._state_path(handle.replica_id), rec)

    def _write_record(self, path: Path, rec: dict[str, Any]) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(rec, f)
        os.replace(tmp, path)


def _url(host: str, port: int) -> str | None:
    if not (1 <= port <= 65535):
        return None
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return f"http://{host}:{port}" if _HOSTNAME.match(host) else None
    return f"http://[{ip}]:{port}" if ip.version == 6 else f"http://{ip}:{port}"
