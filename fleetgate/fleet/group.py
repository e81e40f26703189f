"""One model's replicas as the data plane sees them, and the signals it sends the controller.

The control plane publishes here: replica state changes rebuild :attr:`ModelGroup.routable`
(the list ``acquire`` scans) and the affinity ring. The data plane only reads that list, bumps
in-flight counts and raises :meth:`ModelGroup.demand`. Nothing here awaits or does I/O, except
:meth:`wait_changed`, which a cold-start waiter uses.
"""

from __future__ import annotations

import asyncio
import time

from fleetgate.config import ModelSettings
from fleetgate.fleet.balancer import Ring, build_ring
from fleetgate.fleet.replica import TERMINAL, Replica, State
from fleetgate.fleet.spec import ModelPolicy
from fleetgate.fleet.stats import ModelStats

#: Stopped and failed replicas kept for status, per model.
KEEP_RETIRED = 8


class ModelGroup:
    def __init__(self, name: str, settings: ModelSettings, policy: ModelPolicy) -> None:
        self.name = name
        self.settings = settings
        self.policy = policy
        self.backend_type: str = settings.backend.type
        # Set by the fleet from its launcher: replicas are URLs others run (never stopped).
        self.passive = False
        self.replicas: list[Replica] = []
        self.routable: list[Replica] = []
        self.ring: Ring | None = None
        self.rr = 0
        self.stats = ModelStats()
        now = time.monotonic()
        self.last_activity = now
        self.demand_at: float | None = None
        self.waiters = 0
        self.held_down = False
        self.failed_until = 0.0
        self.last_failure = ""
        # What the engine reported in /v1/models (max_model_len) when a replica became ready.
        self.context_length: int | None = None
        self.wake = asyncio.Event()  # the controller: look again now
        self._changed = asyncio.Event()

    # --- data plane ------------------------------------------------------------------------

    def demand(self) -> None:
        """Someone wants this model now. Cheap, idempotent; the controller launches."""
        now = time.monotonic()
        self.demand_at = now
        self.last_activity = now
        self.wake.set()

    def failed_now(self) -> bool:
        return self.failed_until > time.monotonic()

    async def wait_changed(self, timeout_s: float) -> None:
        ev = self._changed
        try:
            await asyncio.wait_for(ev.wait(), timeout_s)
        except TimeoutError:
            pass

    # --- control plane ---------------------------------------------------------------------

    def on_replica_change(self, rep: Replica, old: State, new: State) -> None:
        routable = [r for r in self.replicas if r.routable]
        if [r.id for r in routable] != [r.id for r in self.routable]:
            self.ring = build_ring([r.id for r in routable]) if len(routable) > 1 else None
        self.routable = routable
        if new in TERMINAL and old is not new:
            retired = [r for r in self.replicas if r.state in TERMINAL]
            for r in retired[: max(0, len(retired) - KEEP_RETIRED)]:
                self.replicas.remove(r)
        self.wake.set()
        ev, self._changed = self._changed, asyncio.Event()
        ev.set()

    def add(self, rep: Replica) -> None:
        self.replicas.append(rep)

    def live(self) -> list[Replica]:
        return [r for r in self.replicas if r.state not in TERMINAL]

    def take_demand(self) -> bool:
        d = self.demand_at is not None or self.waiters > 0
        self.demand_at = None
        return d

    def inflight(self) -> int:
        return sum(r.inflight for r in self.replicas)

    def mark_failed(self, reason: str) -> None:
        self.last_failure = reason
        self.failed_until = time.monotonic() + self.policy.restart.failed_cooldown_s
        ev, self._changed = self._changed, asyncio.Event()
        ev.set()

    def clear_failed(self) -> None:
        self.failed_until = 0.0

    def status(self) -> str:
        """``healthy``, ``starting``, ``pending``, ``failed``, ``stopping`` or ``stopped``.

        Replicas asked to stop (draining, or about to) don't make a model healthy: right after
        ``down`` or a scale to zero the answer is ``stopping`` until their processes are gone.
        """
        active = [r for r in self.replicas if r.active]
        states = {r.state for r in active}
        if any(r.routable for r in active):
            return "healthy"
        if State.STARTING in states:
            return "starting"
        if self.failed_now() and not states:
            return "failed"
        if states or self.demand_at is not None:
            return "pending"
        if any(r.state not in TERMINAL for r in self.replicas):
            return "stopping"
        return "stopped"

    def queue_note(self) -> tuple[str, float | None]:
        """What a launcher said about the replica closest to starting (a queued SLURM job's
        reason and the queue's estimate), for every caller allowed the model: one line, no
        job ids or nodes. ("", None) when there is nothing to say."""
        notes = [
            (r.eta_s if r.eta_s is not None else float("inf"), r.note)
            for r in self.replicas
            if r.active and r.note and r.state in (State.PENDING, State.STARTING)
        ]
        if not notes:
            return "", None
        eta, note = min(notes)
        return " ".join(note.split())[:300], (None if eta == float("inf") else eta)

    def starting_eta(self) -> float | None:
        """Seconds until a starting replica is likely ready, from the last cold start."""
        last = self.stats.last_cold_start_s
        now = time.monotonic()
        starting = [r for r in self.replicas if r.state in (State.PENDING, State.STARTING)]
        if last is None or not starting:
            return None
        return max(0.0, last - max(now - r.created_at for r in starting))
