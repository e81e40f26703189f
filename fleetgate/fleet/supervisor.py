"""A replica's owner: the one task that launches it, watches it, restarts it and stops it.

Only this task calls :meth:`Replica._set_state`. The loop, for one replica slot:

``pending`` -> launch -> ``starting`` -> probe every ``readiness_interval_s`` until ``/health``
(and ``/v1/models``) answer 200 -> ``ready`` -> watch (process poll every interval, HTTP health
every ``health_interval_s``, at once on a suspect report) -> on a stop request ``draining`` ->
in-flight reaches zero or ``drain_timeout_s`` -> ``stopped``.

A crash, a start timeout or ``unhealthy_after`` failed probes stop what is left of the process
and go back to ``pending`` with a backoff; more than ``max_restarts`` within ``window_s`` is a
crash loop: ``failed``, with the last reason (exit code and log tail). Static URLs are never
restarted: one that stops answering goes back to ``starting`` and is probed until it answers.
Every wait is bounded by a deadline or ends on a stop request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass

from fleetgate.fleet.group import ModelGroup
from fleetgate.fleet.health import Prober
from fleetgate.fleet.launchers.base import Handle, Launcher, LaunchError, LaunchSpec, Observed
from fleetgate.fleet.replica import TERMINAL, Replica, State
from fleetgate.fleet.spec import FleetSettings

log = logging.getLogger("fleetgate.fleet")


@dataclass(frozen=True)
class Outcome:
    what: str  # "ready" | "stop" | "crash" | "unhealthy"
    kind: str = ""
    detail: str = ""


async def _wait_event(ev: asyncio.Event, timeout_s: float) -> bool:
    if ev.is_set():
        return True
    try:
        await asyncio.wait_for(ev.wait(), timeout_s)
    except TimeoutError:
        return False
    return True


class Supervisor:
    def __init__(
        self,
        rep: Replica,
        group: ModelGroup,
        launcher: Launcher,
        spec: LaunchSpec,
        fleet: FleetSettings,
        prober: Prober,
        adopted: Handle | None = None,
    ) -> None:
        self.rep = rep
        self.group = group
        self.launcher = launcher
        self.spec = spec
        self.fleet = fleet
        self.prober = prober
        self.handle = adopted
        self.adopted = adopted is not None
        life = spec.backend.lifecycle()
        self.health_path: str = life.health_path
        self.models_path: str | None = life.models_path
        self.health_interval: float = life.health_interval_s
        self.start_timeout: float | None = life.start_timeout_s
        key = group.settings.api_key
        self.headers = {"authorization": f"Bearer {key}"} if key else None
        self._crashes: deque[float] = deque()
        self._last_obs: Observed | None = None
        self._next_poll = 0.0

    def prime(self) -> None:
        """Make what already runs (a static URL) routable at once, before any probe: the
        gateway serves from its first request, and a failed probe or a connect failure
        reported by the request path takes the URL out again. Called once, before ``run``."""
        if self.handle is None and not self.launcher.manages_processes:
            h = self.launcher.attach(self.spec)
            if h is not None:
                self.handle = h
                self.rep.handle, self.rep.url = h, h.url
                self.rep._set_state(State.STARTING, f"static URL {h.url}")
                self.rep._set_state(State.READY, "static URL: routable until a check fails")

    async def run(self) -> None:
        try:
            await self._run()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug must not leave a replica routable with nobody watching
            log.exception("supervisor of %s crashed", self.rep.id)
            if self.handle is not None and self.launcher.manages_processes:
                with contextlib.suppress(Exception):
                    await self.launcher.stop(self.handle)
            if self.rep.state not in TERMINAL:
                self.rep._set_state(State.FAILED, f"internal error: {type(e).__name__}: {e}")

    async def _run(self) -> None:
        rep = self.rep
        # Bounded: every pass that doesn't return is a failure, and more than max_restarts of
        # those inside window_s end the slot, so a fast loop stops fast; a slow one waits out
        # at least the start or watch time of each attempt.
        while True:
            if rep.stop_requested.is_set():
                await self._stop_now()
                return
            launched = time.monotonic()
            if rep.state is State.READY:  # primed by prime()
                out = Outcome("ready")
            elif self.handle is None:
                try:
                    self.handle = await self.launcher.start(self.spec)
                except LaunchError as e:
                    if await self._crashed(Outcome("crash", e.kind, e.message)):
                        return
                    continue
                if self.launcher.manages_processes:
                    self.group.stats.launches += 1
                rep.handle, rep.url = self.handle, self.handle.url
                pid = self.handle.info.get("pid")
                label = self.handle.info.get("label") or (
                    f"launched (pid {pid})" if pid else "probing"
                )
                rep._set_state(State.STARTING, str(label))
                out = await self._await_ready(launched)
            else:
                rep.handle, rep.url = self.handle, self.handle.url
                rep._set_state(State.STARTING, "adopted from a previous gateway run")
                out = await self._await_ready(launched)
            while out.what == "ready":
                if rep.state is not State.READY:
                    if not self.adopted and self.launcher.manages_processes:
                        self.group.stats.observe_cold_start(time.monotonic() - launched)
                    self.adopted = False
                    rep._set_state(State.READY, "health check passed")
                out = await self._watch()
                if out.what == "unhealthy" and not self.launcher.manages_processes:
                    rep._set_state(State.STARTING, f"health check failed: {out.detail}")
                    out = await self._await_ready(None)
                    launched = time.monotonic()
            if out.what == "stop":
                await self._stop_now()
                return
            if rep.handover_due:
                await self._ended_before_handover(out)
                return
            if await self._crashed(out):
                return

    async def _poll(self, h: Handle, fresh: bool = False) -> Observed:
        """The launcher's view of ``h``, asked no more often than the launcher wants (or now,
        with ``fresh``); publishes what it learned (address, queue note) on the replica."""
        now = time.monotonic()
        if fresh or self._last_obs is None or now >= self._next_poll:
            obs = await self.launcher.poll(h)
            every = self.launcher.poll_every_s(h) or self.fleet.readiness_interval_s
            self._last_obs, self._next_poll = obs, now + every
            rep = self.rep
            if obs.url and obs.url != h.url:
                h.url = obs.url
                rep.url = obs.url
            rep.note, rep.eta_s = obs.note, obs.eta_s
            rep.public, rep.private = dict(obs.public), dict(obs.private)
            if obs.ends_in_s is not None and not rep.handover_due:
                before = self.launcher.handover_before_s(h)
                if before is not None and obs.ends_in_s <= before:
                    rep.handover_due = True
                    log.info(
                        "replica %s (%s): ends in %.0fs (time limit): starting a successor",
                        rep.id, rep.model, obs.ends_in_s,
                    )
                    self.group.wake.set()
        return self._last_obs

    async def _await_ready(self, launched: float | None) -> Outcome:
        assert self.handle is not None
        rep, h = self.rep, self.handle
        # The start timeout counts from when the replica starts running: a queued job's wait
        # in the scheduler's queue is not its start-up.
        deadline = None
        why = "no probe yet"
        fresh = True
        while True:
            if rep.stop_requested.is_set():
                return Outcome("stop")
            obs = await self._poll(h, fresh)
            fresh = False
            if not obs.running:
                return Outcome("crash", obs.kind or "exited", f"process {obs.detail}")
            if deadline is None and obs.started and self.start_timeout is not None:
                if launched is not None:
                    deadline = max(launched, time.monotonic()) + self.start_timeout
            if h.url:
                ok, why, context = await self.prober.check_ready(
                    h.url, self.health_path, self.models_path, self.headers
                )
                if ok:
                    if context is not None:
                        self.group.context_length = context
                    # The answer must come from our process, not a squatter on the port.
                    obs = await self._poll(h, True)
                    if obs.running:
                        return Outcome("ready")
                    return Outcome("crash", obs.kind or "exited", f"process {obs.detail}")
            elif obs.started:
                why = "the replica has not reported its address yet"
            if deadline is not None and time.monotonic() >= deadline:
                tail = self.launcher.log_tail(h, 10)
                detail = f"timed out after {self.start_timeout:g}s waiting for {self.health_path}; last probe: {why}"
                return Outcome(
                    "crash", "timeout", detail + (f"; log tail:\n{tail}" if tail else "")
                )
            rep.wake.clear()
            await _wait_event(rep.wake, self.fleet.readiness_interval_s)

    async def _watch(self) -> Outcome:
        assert self.handle is not None
        rep, h = self.rep, self.handle
        limit = self.group.policy.restart.unhealthy_after
        fails, next_probe = 0, time.monotonic() + self.health_interval
        while True:
            woke = await _wait_event(rep.wake, self.fleet.readiness_interval_s)
            rep.wake.clear()
            if rep.stop_requested.is_set():
                return Outcome("stop")
            obs = await self._poll(h)
            if not obs.running:
                return Outcome("crash", obs.kind or "exited", f"process {obs.detail}")
            if not (woke or rep.suspect or fails or time.monotonic() >= next_probe):
                continue
            ok, why = await self.prober.check(h.url, self.health_path)
            next_probe = time.monotonic() + self.health_interval
            if ok:
                fails = 0
                rep.clear_suspect()
                continue
            fails += 1
            if fails >= limit:
                return Outcome(
                    "unhealthy", "unhealthy", f"{fails} failed health checks; last: {why}"
                )

    async def _ended_before_handover(self, out: Outcome) -> None:
        """It reached its time limit before its successor was ready: not restarted, the
        successor (queued or starting) replaces it."""
        rep = self.rep
        if self.handle is not None:
            h, self.handle = self.handle, None
            rep.handle = None
            with contextlib.suppress(Exception):
                await self.launcher.stop(h)
        succ = next((r for r in self.group.replicas if r.id == rep.successor), None)
        where = f"successor {succ.id} is {succ.state.value}" if succ else "no successor yet"
        if succ is not None and succ.note:
            where += f" ({succ.note})"
        rep._set_state(State.STOPPED, f"ended at its time limit ({out.detail}); {where}")

    async def _crashed(self, out: Outcome) -> bool:
        """Clean up after a failed attempt; schedule a restart. True when the slot is done."""
        rep, policy = self.rep, self.group.policy.restart
        self.group.stats.failures[out.kind or "exited"] += 1
        if self.handle is not None:
            h, self.handle = self.handle, None
            rep.handle = None
            with contextlib.suppress(Exception):
                await self.launcher.stop(h)
        now = time.monotonic()
        self._crashes.append(now)
        while self._crashes and now - self._crashes[0] > policy.window_s:
            self._crashes.popleft()
        n = len(self._crashes)
        if rep.stop_requested.is_set():
            rep._set_state(State.STOPPED, f"stopped after failure: {out.detail}")
            return True
        if n > policy.max_restarts:
            reason = f"crash loop: {n} failures in {policy.window_s:g}s; last: {out.detail}"
            self.group.stats.failures["crash_loop"] += 1
            rep._set_state(State.FAILED, reason)
            self.group.mark_failed(reason)
            return True
        backoff = min(policy.backoff_max_s, policy.backoff_initial_s * 2 ** (n - 1))
        rep.restarts += 1
        self.group.stats.restarts += 1
        rep._set_state(
            State.PENDING,
            f"{out.detail}; restart {n} of {policy.max_restarts} in {backoff:.1f}s",
        )
        if await _wait_event(rep.stop_requested, backoff):
            rep._set_state(State.STOPPED, rep.stop_reason or "stop requested")
            return True
        return False

    async def _stop_now(self) -> None:
        rep = self.rep
        reason = rep.stop_reason or "stop requested"
        if rep.state is State.READY:
            rep._set_state(State.DRAINING, reason)
            drain_s = self.group.policy.scaling.drain_timeout_s
            for _ in range(int(drain_s / 0.05) + 1):
                if rep.inflight <= 0:
                    break
                await asyncio.sleep(0.05)
            if rep.inflight > 0:
                reason += f" (drain timed out with {rep.inflight} in flight)"
        if self.handle is not None and self.launcher.manages_processes:
            h, self.handle = self.handle, None
            await self.launcher.stop(h)
        rep.handle = None
        if rep.state not in TERMINAL:
            rep._set_state(State.STOPPED, reason)

    def detach(self) -> None:
        """Leave the process running (keep_on_shutdown): its record stays for the next run."""
        if self.handle is not None:
            self.launcher.forget(self.handle)
