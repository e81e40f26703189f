"""The routing table the data plane reads: which replicas of a model can take a request now.

The request path calls :meth:`Pool.acquire` and gets a :class:`Lease` (a replica URL plus an
in-flight slot) or an :class:`~fleetgate.errors.Unavailable` with ``Retry-After``. It never waits
on a launcher or a health check: those belong to the control plane
(:class:`~fleetgate.fleet.control.Fleet`: one controller task per model, one supervisor task per
replica), which publishes replica state here. ``acquire``, ``release`` and
``report_connect_failure`` are synchronous and O(replicas); they never block, and they run on
the event loop thread. Only :meth:`wait_ready` awaits, for cold-start ``wait`` mode.

:meth:`Pool.start`, :meth:`Pool.stop`, ``up``, ``down`` and ``model_status`` delegate to the
fleet (:attr:`Pool.control`), which owns launching, adoption and shutdown. :meth:`add_model`
and :meth:`remove_model` change the table at run time (models started from templates); they
run on the event loop thread, as the data plane does, so a reader never sees half a change.
"""

from __future__ import annotations

import logging
import time
from typing import Literal

from fleetgate.config import ModelSettings, Settings
from fleetgate.errors import ModelNotFound, Unavailable
from fleetgate.fleet.balancer import least_outstanding, pick_affinity
from fleetgate.fleet.control import Fleet
from fleetgate.fleet.controller import Controller
from fleetgate.fleet.group import ModelGroup
from fleetgate.fleet.launchers import Launcher
from fleetgate.fleet.replica import Replica
from fleetgate.fleet.spec import policy_of, retry_after_estimate

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
    """The routing table. The control plane (:class:`~fleetgate.fleet.control.Fleet`) is built
    beside it over the same groups, as :attr:`control`; ``start``, ``stop``, ``up``, ``down``
    and ``model_status`` are thin delegations to it, for the HTTP layer's convenience."""

    def __init__(self, settings: Settings, launchers: dict[str, Launcher] | None = None) -> None:
        self.settings = settings
        self.fleet = settings.fleet
        self.groups: dict[str, ModelGroup] = {
            m.name: ModelGroup(m.name, m, policy_of(m)) for m in settings.models
        }
        self.control = Fleet(settings, self.groups, launchers)

    # --- models added at run time ----------------------------------------------------------

    def add_model(self, m: ModelSettings, run: bool = True) -> ModelGroup:
        """Route and control a model that isn't in the config (from a template); with
        ``run=False`` nothing launches until ``control.run_group(name)``."""
        g = ModelGroup(m.name, m, policy_of(m))
        self.control.add_group(g, run)
        return g

    def remove_model(self, name: str) -> None:
        self.control.remove_group(name)

    # --- control plane, delegated ----------------------------------------------------------

    @property
    def launchers(self) -> dict[str, Launcher]:
        return self.control.launchers

    @property
    def controllers(self) -> dict[str, Controller]:
        return self.control.controllers

    @property
    def started(self) -> bool:
        return self.control.started

    async def start(self) -> None:
        await self.control.start()

    async def stop(self, timeout_s: float | None = None) -> None:
        await self.control.stop(timeout_s)

    def up(self, model: str) -> str:
        self._group(model)
        return self.control.up(model)

    def down(self, model: str) -> str:
        self._group(model)
        return self.control.down(model)

    def model_status(self, model: str) -> str:
        return self._group(model).status()

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
        if g.passive:
            return Unavailable(
                f"The model '{g.name}' has no backend answering its health check; retry shortly.",
                retry_after=retry_after_estimate(policy, None),
            )
        note, queue_eta = g.queue_note()
        if note:
            # The launcher's own view (a job waiting in SLURM's queue, and why); the queue's
            # estimate may put Retry-After up to 300 s out.
            return Unavailable(
                f"The model '{g.name}' is starting ({note}); retry later.",
                retry_after=(
                    retry_after_estimate(policy, queue_eta, 300)
                    if queue_eta is not None
                    else retry_after_estimate(policy, g.starting_eta())
                ),
            )
        return Unavailable(
            f"The model '{g.name}' is starting; retry shortly.",
            retry_after=retry_after_estimate(policy, g.starting_eta()),
        )

    def ready_count(self, model: str) -> int:
        """Replicas that can take a request now (fair-share slots follow it)."""
        return len(self._group(model).routable)

    def waiting_note(self, model: str) -> str:
        """One line on why a waiting request still waits ("queued in SLURM: Resources, expected
        to start in about 40s"), for the SSE keep-alive comments; "" when there is none."""
        return self._group(model).queue_note()[0]

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
