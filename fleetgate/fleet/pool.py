"""The routing table the data plane reads: which replicas of a model can take a request now.

The request path calls :meth:`Pool.acquire` and gets a :class:`Lease` (a replica URL plus an
in-flight slot) or an :class:`~fleetgate.errors.Unavailable` with ``Retry-After``. It never waits
on a launcher or a health check: those belong to the control plane (one
:class:`~fleetgate.fleet.controller.Controller` task per model, one supervisor task per
replica), which publishes replica state here. ``acquire``, ``release`` and
``report_connect_failure`` are synchronous and O(replicas); they never block, and they run on
the event loop thread. Only :meth:`wait_ready` awaits, for cold-start ``wait`` mode.

:meth:`start` first settles what a previous gateway run left behind (adopt or stop, per
``fleet.on_leftover``), then starts the controllers. :meth:`stop` stops the replicas this
gateway runs, except those whose backend says ``keep_on_shutdown``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Literal

from fleetgate.config import Settings
from fleetgate.errors import ModelNotFound, Unavailable
from fleetgate.fleet.balancer import least_outstanding, pick_affinity
from fleetgate.fleet.controller import Controller
from fleetgate.fleet.group import ModelGroup
from fleetgate.fleet.health import Prober
from fleetgate.fleet.launchers import LAUNCHERS, Launcher
from fleetgate.fleet.launchers.local import config_digest
from fleetgate.fleet.replica import TERMINAL, Replica, State
from fleetgate.fleet.spec import LocalBackend, policy_of, retry_after_estimate

log = logging.getLogger("fleetgate.fleet")


class Lease:
    """One request's hold on one replica. ``release()`` is idempotent."""

    __slots__ = ("replica", "group", "_released")

    def __init__(self, replica: Replica, group: ModelGroup) -> None:
        self.replica = replica
        self.group = group
        self._released = False
        replica.inflight += 1
        replica.served += 1

    @property
    def url(self) -> str:
        return self.replica.url or ""

    @property
    def replica_id(self) -> str:
        return self.replica.id

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.replica.inflight -= 1
            now = time.monotonic()
            self.replica.last_used = now
            self.group.last_activity = now


class Pool:
    def __init__(self, settings: Settings, launchers: dict[str, Launcher] | None = None) -> None:
        self.settings = settings
        self.fleet = settings.fleet
        self.prober = Prober(self.fleet.probe_timeout_s)
        self.launchers: dict[str, Launcher] = dict(launchers or {})
        for kind, make in LAUNCHERS.items():
            self.launchers.setdefault(kind, make(self.fleet))
        self.groups: dict[str, ModelGroup] = {}
        self.controllers: dict[str, Controller] = {}
        for m in settings.models:
            g = ModelGroup(m.name, m, policy_of(m))
            self.groups[m.name] = g
            self.controllers[m.name] = Controller(
                g, self.launchers[g.backend_type], self.fleet, self.prober
            )
        self._tasks: list[asyncio.Task[None]] = []
        self.started = False

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        if self.started:
            return
        self.started = True
        await self._settle_leftovers()
        loop = asyncio.get_running_loop()
        for name, c in self.controllers.items():
            c.step()  # static URLs are routable when start() returns
            self._tasks.append(loop.create_task(c.run(), name=f"controller {name}"))

    async def _settle_leftovers(self) -> None:
        for kind, launcher in self.launchers.items():
            try:
                handles = await launcher.adopt()
            except Exception:
                log.exception("%s launcher: finding leftover replicas failed", kind)
                continue
            for h in handles:
                g = self.groups.get(h.model)
                why = ""
                if self.fleet.on_leftover != "adopt":
                    why = "fleet.on_leftover is 'stop'"
                elif g is None:
                    why = "model no longer configured"
                elif not isinstance(g.settings.backend, LocalBackend) or h.info.get(
                    "digest"
                ) != config_digest(g.name, g.settings.backend):
                    why = "backend config changed"
                if why:
                    log.warning(
                        "stopping leftover replica %s of %s: %s", h.replica_id, h.model, why
                    )
                    await launcher.stop(h)
                else:
                    log.info("adopting leftover replica %s of %s", h.replica_id, h.model)
                    self.controllers[h.model].adopt(h)

    async def stop(self, timeout_s: float | None = None) -> None:
        """Stop control loops, then stop (drain) launched replicas; bounded by ``timeout_s``."""
        for t in self._tasks:
            t.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2.0)
        self._tasks.clear()
        jobs = []
        for name, c in self.controllers.items():
            b = self.groups[name].settings.backend
            keep = bool(getattr(b, "keep_on_shutdown", False))
            limit = timeout_s
            if limit is None:
                limit = (
                    self.groups[name].policy.scaling.drain_timeout_s
                    + float(getattr(b, "stop_grace_s", 0.0))
                    + 5.0
                )
            jobs.append(c.shutdown(keep, limit))
        if jobs:
            await asyncio.gather(*jobs, return_exceptions=True)
        await self.prober.close()
        self.started = False

    # --- data plane ------------------------------------------------------------------------

    def _group(self, model: str) -> ModelGroup:
        g = self.groups.get(model)
        if g is None:
            raise ModelNotFound(f"The model '{model}' does not exist.", param="model")
        return g

    def acquire(self, model: str, affinity_key: bytes | None = None) -> Lease:
        g = self._group(model)
        rs = g.routable
        if not rs:
            g.stats.unavailable += 1
            raise self._unavailable(g)
        if len(rs) == 1:
            return Lease(rs[0], g)
        loads = [r.inflight for r in rs]
        if (
            affinity_key is not None
            and g.policy.balancer.strategy == "prefix_affinity"
            and g.ring is not None
        ):
            i = pick_affinity(g.ring, loads, affinity_key, g.policy.balancer.load_factor)
        else:
            g.rr = (g.rr + 1) % len(rs)
            i = least_outstanding(loads, g.rr)
        return Lease(rs[i], g)

    def _unavailable(self, g: ModelGroup) -> Unavailable:
        policy = g.policy.cold_start
        if g.failed_now():
            # The first line only: the log tail below it is for admins (fleet status).
            why = g.last_failure.splitlines()[0].removesuffix("; log tail:")[:300]
            return Unavailable(
                f"The model '{g.name}' failed to start; an admin can see why in the fleet status.",
                retry_after=retry_after_estimate(policy, 30.0),
                internal=why,
            )
        g.demand()
        if g.backend_type == "static":
            return Unavailable(
                f"The model '{g.name}' has no backend answering its health check; retry shortly.",
                retry_after=retry_after_estimate(policy, None),
            )
        return Unavailable(
            f"The model '{g.name}' is starting; retry shortly.",
            retry_after=retry_after_estimate(policy, g.starting_eta()),
        )

    def cold_start_mode(self, model: str) -> Literal["reject", "wait"]:
        return self._group(model).policy.cold_start.mode

    def wait_timeout(self, model: str) -> float:
        return self._group(model).policy.cold_start.wait_timeout_s

    def keepalive_s(self, model: str) -> float:
        """How often a streaming request waiting in ``wait`` mode gets an SSE comment."""
        return self._group(model).policy.cold_start.keepalive_s

    async def wait_ready(self, model: str, timeout_s: float) -> None:
        """Return once ``model`` has a routable replica; raise Unavailable after ``timeout_s``."""
        g = self._group(model)
        if g.routable:
            return
        deadline = time.monotonic() + timeout_s
        g.waiters += 1
        g.demand()
        try:
            while not g.routable:
                left = deadline - time.monotonic()
                if left <= 0 or g.failed_now():
                    g.stats.unavailable += 1
                    raise self._unavailable(g)
                await g.wait_changed(left)
        finally:
            g.waiters -= 1

    def report_connect_failure(self, lease: Lease) -> None:
        """The relay couldn't connect to ``lease``'s replica: take it out of routing and probe."""
        lease.replica.mark_suspect()

    # --- control-plane requests (fleet API) ------------------------------------------------

    def up(self, model: str) -> str:
        """Ask for the model to run; answers ``pending``, ``starting`` or ``healthy``."""
        g = self._group(model)
        g.held_down = False
        g.clear_failed()
        if not g.routable:
            g.demand()
        return self.model_status(model)

    def down(self, model: str) -> str:
        """Drain and stop every replica; nothing restarts until new demand or ``up``."""
        g = self._group(model)
        if g.backend_type == "static":
            return self.model_status(model)
        g.held_down = True
        g.demand_at = None
        self.controllers[model].stop_all("fleet down")
        g.wake.set()
        return self.model_status(model)

    def model_status(self, model: str) -> str:
        """``healthy``, ``starting``, ``pending``, ``failed``, ``stopping`` or ``stopped``.

        Replicas asked to stop (draining, or about to) don't make a model healthy: right after
        ``down`` or a scale to zero the answer is ``stopping`` until their processes are gone.
        """
        g = self._group(model)
        active = [r for r in g.replicas if r.active]
        states = {r.state for r in active}
        if any(r.routable for r in active):
            return "healthy"
        if State.STARTING in states:
            return "starting"
        if g.failed_now() and not states:
            return "failed"
        if states or g.demand_at is not None:
            return "pending"
        if any(r.state not in TERMINAL for r in g.replicas):
            return "stopping"
        return "stopped"
