"""One replica of a model: its lifecycle state machine and its in-flight count.

The lifecycle is :class:`State` with one transition table, :data:`TRANSITIONS`. The only way
to change state is :meth:`Replica._set_state`, which refuses illegal moves, records the event
in a bounded history (shown by status) and logs it. One owner calls it: the replica's
supervisor (:mod:`fleetgate.fleet.supervisor`). Everyone else *asks*: the controller calls
:meth:`Replica.request_stop`, the data plane marks a replica suspect through the pool.

``inflight`` is changed by the data plane (a lease taken or released), synchronously, on the
event loop thread; no lock is needed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

log = logging.getLogger("fleetgate.fleet")


class State(StrEnum):
    PENDING = "pending"  # wanted, no process yet (first launch, or waiting out a restart backoff)
    STARTING = "starting"  # process up (or URL known), engine not answering health yet
    READY = "ready"  # routable
    DRAINING = "draining"  # takes no new requests; stops when in-flight reaches zero
    STOPPED = "stopped"  # terminal: stopped on purpose
    FAILED = "failed"  # terminal: gave up, with a reason


TRANSITIONS: dict[State, frozenset[State]] = {
    # PENDING -> PENDING: a launch attempt failed before a process existed; retry scheduled.
    State.PENDING: frozenset({State.PENDING, State.STARTING, State.STOPPED, State.FAILED}),
    # STARTING -> PENDING: the start failed and a restart is scheduled.
    State.STARTING: frozenset({State.READY, State.PENDING, State.STOPPED, State.FAILED}),
    # READY -> PENDING: crashed or unhealthy, restart scheduled; READY -> STARTING: a static
    # URL stopped answering and is being probed again.
    State.READY: frozenset(
        {State.DRAINING, State.PENDING, State.STARTING, State.STOPPED, State.FAILED}
    ),
    State.DRAINING: frozenset({State.STOPPED, State.FAILED}),
    State.STOPPED: frozenset(),
    State.FAILED: frozenset(),
}

TERMINAL = frozenset({State.STOPPED, State.FAILED})
HISTORY = 32


class IllegalTransition(RuntimeError):
    pass


@dataclass(frozen=True)
class Event:
    at: float  # wall-clock seconds (time.time())
    state: State
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {"at": round(self.at, 3), "state": self.state.value, "reason": self.reason}


Listener = Callable[["Replica", State, State], None]


class Replica:
    """A replica slot. Created pending; ends stopped or failed."""

    def __init__(self, id: str, model: str, *, listener: Listener | None = None) -> None:
        self.id = id
        self.model = model
        self.state = State.PENDING
        self.reason = "created"
        self.url: str | None = None
        self.handle: Any = None  # the launcher's handle, while a process/job exists
        self.inflight = 0
        self.served = 0
        self.suspect = False
        self.restarts = 0
        self.created_at = time.monotonic()
        self.state_since = self.created_at
        self.last_used = self.created_at
        self.ready_at: float | None = None
        self.history: deque[Event] = deque(maxlen=HISTORY)
        self.history.append(Event(time.time(), State.PENDING, "created"))
        self._listener = listener
        self.stop_requested = asyncio.Event()
        self.stop_reason = ""
        self.wake = asyncio.Event()  # a suspect report: probe now
        # What the launcher last reported beside running or not (its supervisor writes these):
        # a note any caller may read ("queued in SLURM: Resources"), the queue's estimate of
        # seconds to start, and status fields for everyone / for admins only.
        self.note = ""
        self.eta_s: float | None = None
        self.public: dict[str, Any] = {}
        self.private: dict[str, Any] = {}
        # Set once its launcher says it ends soon (a time limit): the controller starts a
        # successor and stops this one when the successor is ready.
        self.handover_due = False
        self.successor: str | None = None

    @property
    def routable(self) -> bool:
        return self.state is State.READY and not self.suspect

    @property
    def active(self) -> bool:
        """Counts toward the model's replica total (not on its way out)."""
        return (
            self.state not in TERMINAL
            and self.state is not State.DRAINING
            and not (self.stop_requested.is_set())
        )

    def _set_state(self, new: State, reason: str) -> None:
        old = self.state
        if new not in TRANSITIONS[old]:
            raise IllegalTransition(f"{self.id}: {old.value} -> {new.value} is not allowed")
        self.state = new
        self.reason = reason
        self.state_since = time.monotonic()
        if new is State.READY:
            self.ready_at = self.state_since
            self.suspect = False
        self.history.append(Event(time.time(), new, reason))
        level = logging.WARNING if new is State.FAILED else logging.INFO
        log.log(level, "replica %s (%s): %s -> %s: %s", self.id, self.model, old, new, reason)
        if self._listener is not None:
            self._listener(self, old, new)

    def request_stop(self, reason: str) -> None:
        """Ask the supervisor to drain and stop this replica. Idempotent."""
        if not self.stop_requested.is_set():
            self.stop_reason = reason
            self.stop_requested.set()
            self.wake.set()

    def mark_suspect(self) -> None:
        """A connection to this replica failed: route around it until a probe clears it."""
        if self.state is State.READY and not self.suspect:
            self.suspect = True
            log.warning("replica %s (%s): connect failure reported; probing", self.id, self.model)
            if self._listener is not None:
                self._listener(self, self.state, self.state)
            self.wake.set()

    def clear_suspect(self) -> None:
        if self.suspect:
            self.suspect = False
            if self._listener is not None:
                self._listener(self, self.state, self.state)
