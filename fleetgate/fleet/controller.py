"""The per-model control loop: observe, decide (pure), act.

One task per model wakes every ``control_interval_s``, or at once when the data plane raises
demand or a replica changes state. It is the only place that creates replicas, which is why 50
concurrent cold requests cause one launch: they all just set the same demand flag, and the next
step sees the replica it already created. Scaling down asks one replica to stop (it drains
first); scaling to zero asks them all. After a crash loop the model is held ``failed`` for
``restart.failed_cooldown_s`` (or until an explicit ``up``): demand alone won't relaunch it.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import replace

from fleetgate.fleet import autoscaler
from fleetgate.fleet.group import ModelGroup
from fleetgate.fleet.health import Prober
from fleetgate.fleet.launchers.base import Handle, Launcher, LaunchSpec
from fleetgate.fleet.replica import TERMINAL, Replica, State
from fleetgate.fleet.spec import FleetSettings
from fleetgate.fleet.supervisor import Supervisor

log = logging.getLogger("fleetgate.fleet")

_STOP_ORDER = {State.PENDING: 0, State.STARTING: 1, State.READY: 2}


class Controller:
    def __init__(
        self, group: ModelGroup, launcher: Launcher, fleet: FleetSettings, prober: Prober
    ) -> None:
        self.group = group
        self.launcher = launcher
        self.fleet = fleet
        self.prober = prober
        self.tasks: dict[str, tuple[Supervisor, asyncio.Task[None]]] = {}
        self._obs = autoscaler.Observed(now=time.monotonic(), current=0, ready=0)
        self._slot = 0
        self.last_decision = autoscaler.Decision(0, "not started")
        # Set first thing in shutdown: no step may launch after it, even one that raced the
        # cancellation of run() (asyncio.wait_for can swallow a cancel that lands as it wakes).
        self.closed = False

    # --- acting ----------------------------------------------------------------------------

    def _new_replica(self, adopted: Handle | None = None) -> Replica:
        g = self.group
        if adopted is not None:
            rid = adopted.replica_id
        elif not self.launcher.manages_processes:
            rid = f"{g.name}-{self._slot}"  # one per static URL: stable names
        else:
            rid = f"{g.name}-{secrets.token_hex(3)}"
        rep = Replica(rid, g.name, listener=g.on_replica_change)
        spec = LaunchSpec(
            model=g.name,
            replica_id=rid,
            backend=g.settings.backend,
            served_name=g.settings.upstream_name,
            slot=self._slot,
        )
        self._slot += 1
        g.add(rep)
        sup = Supervisor(rep, g, self.launcher, spec, self.fleet, self.prober, adopted)
        sup.prime()
        task = asyncio.get_running_loop().create_task(sup.run(), name=f"replica {rid}")
        self.tasks[rid] = (sup, task)
        task.add_done_callback(lambda _t: self._forget(rid))
        return rep

    def _forget(self, rid: str) -> None:
        self.tasks.pop(rid, None)

    def adopt(self, handle: Handle) -> Replica:
        return self._new_replica(adopted=handle)

    def _stop_some(self, n: int, reason: str) -> None:
        live = [r for r in self.group.replicas if r.active]
        # Those about to end anyway (time limit) first, then not-yet-ready ones (nothing to
        # drain), then the least busy ready ones.
        live.sort(
            key=lambda r: (
                not r.handover_due, _STOP_ORDER.get(r.state, 3), r.inflight, -r.created_at
            )
        )
        for r in live[:n]:
            r.request_stop(reason)

    def stop_all(self, reason: str) -> None:
        for r in self.group.replicas:
            r.request_stop(reason)

    # --- the loop --------------------------------------------------------------------------

    def _handover(self) -> None:
        """Replicas whose launcher says they end soon (a job's time limit) get a successor;
        once it is routable the old one drains and stops, so the model has no gap. An old
        one that ends before its successor is ready is not restarted (its supervisor sees to
        that): the successor, queued or starting, is the replacement."""
        g = self.group
        if g.held_down or g.failed_now():
            return
        by_id = {r.id: r for r in g.replicas}
        for r in list(g.replicas):
            if not r.handover_due or not r.active:
                continue
            succ = by_id.get(r.successor) if r.successor else None
            if succ is None or succ.state in TERMINAL or succ.stop_requested.is_set():
                new = self._new_replica()
                r.successor = new.id
                log.info("model %s: %s nears its time limit; successor %s", g.name, r.id, new.id)
            elif succ.routable:
                r.request_stop(f"handed over to {succ.id} before its time limit")

    def observe(self, now: float) -> autoscaler.Observed:
        g = self.group
        # A replica handing over is already replaced (by its successor) in the count.
        live = [r for r in g.replicas if r.active and not r.handover_due]
        obs = replace(
            self._obs,
            now=now,
            current=len(live),
            ready=sum(1 for r in live if r.state is State.READY),
            inflight=g.inflight(),
            queued=g.waiters,
            # Idle time counts from the last request or the last replica becoming ready,
            # so a slow start isn't mistaken for idleness.
            last_activity=max(
                g.last_activity,
                max((r.last_used for r in live), default=0.0),
                max((r.ready_at or 0.0 for r in live), default=0.0),
            ),
            demand=g.take_demand(),
            held_down=g.held_down,
        )
        return autoscaler.track(obs, autoscaler.level(obs, g.policy.scaling))

    def step(self, now: float | None = None) -> autoscaler.Decision:
        g = self.group
        if self.closed:
            return autoscaler.Decision(0, "shutting down")
        now = time.monotonic() if now is None else now
        self._handover()
        obs = self.observe(now)
        d = autoscaler.decide(obs, g.policy.scaling)
        if d.desired > obs.current and g.failed_now():
            d = autoscaler.Decision(obs.current, f"held failed: {g.last_failure[:200]}")
        if d.desired != obs.current:
            log.info("model %s: %d -> %d replicas: %s", g.name, obs.current, d.desired, d.reason)
            if d.desired > obs.current:
                for _ in range(d.desired - obs.current):
                    self._new_replica()
            else:
                self._stop_some(obs.current - d.desired, d.reason)
            obs = replace(obs, last_change=now, high_since=None, low_since=None)
        self._obs = obs
        self.last_decision = d
        return d

    async def run(self) -> None:
        g = self.group
        while not self.closed:  # until shutdown (or cancelled); each pass is bounded
            g.wake.clear()
            try:
                self.step()
            except Exception:
                log.exception("controller step for %s failed", g.name)
            try:
                await asyncio.wait_for(g.wake.wait(), self.fleet.control_interval_s)
            except TimeoutError:
                pass
            await asyncio.sleep(0)  # let a burst of wake-ups coalesce into one step

    async def shutdown(self, keep: bool, timeout_s: float) -> None:
        """Stop (or, with ``keep``, detach from) every replica; bounded by ``timeout_s``."""
        self.closed = True
        if keep:
            for sup, task in list(self.tasks.values()):
                task.cancel()
                sup.detach()
        else:
            self.stop_all("gateway shutting down")
        sups = [s for s, _ in self.tasks.values()]
        tasks = [t for _, t in self.tasks.values()]
        if not tasks:
            return
        _done, pending = await asyncio.wait(tasks, timeout=timeout_s)
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.wait(pending, timeout=1.0)
        if not keep:
            # A supervisor cut off mid-stop must not leak its process: kill without grace.
            for sup in sups:
                if sup.handle is not None:
                    h, sup.handle = sup.handle, None
                    try:
                        await self.launcher.stop(h, 0.0)
                    except Exception:
                        log.exception("could not stop %s", h.replica_id)
