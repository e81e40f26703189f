"""Fair share of a model's replicas under contention: a pure scheduler and a small async gate.

When every ready replica of a model is at ``max_inflight_per_replica``, requests wait in the
gateway, one FIFO queue per user, and are dispatched in weighted-fair order.

:class:`Scheduler` (pure: no clock, no I/O) is start-time fair queueing (Goyal et al., 1996).
Each request gets a start tag ``max(V, last finish of its user)`` and a finish tag
``start + cost / weight``; the queued request with the smallest start tag goes next, and the
virtual time ``V`` becomes its start tag. A user who has been idle starts at ``V``, so their
request goes ahead of a heavy user's backlog instead of behind it; two busy users share in the
ratio of their weights. Per-user order is FIFO because a user's tags only grow. ``policy="fifo"``
orders by arrival alone, for comparison. Push, pop and remove are O(log n).

:class:`FairGate` holds ``slots`` (ready replicas x ``max_inflight_per_replica``, set by the
caller as replicas come and go). :meth:`FairGate.acquire` returns at once while a slot is free
and nobody waits; otherwise it queues, bounded by ``max_queue`` (full: 503 ``queue_full`` with
Retry-After) and ``queue_timeout_s`` (503 ``queue_timeout``). A waiter that is cancelled (its
client left) leaves the queue, or, if a slot was handed to it in the same instant, gives the
slot back: nothing leaks. One future per waiter, no task per request.
A caller that runs the wait as a task of its own (to send keep-alives meanwhile) calls
:func:`abandon` on it when its client leaves.

Fair share is kept per gateway process: with ``--workers N`` each worker orders its own queue.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Iterable, Mapping
from typing import Generic, Literal, TypeVar

from fleetgate.errors import Unavailable

Policy = Literal["fair", "fifo"]
POLICIES: tuple[str, ...] = ("fair", "fifo")
T = TypeVar("T")


def weight_for(groups: Iterable[str], weights: Mapping[str, float], default: float = 1.0) -> float:
    """A user's weight: the highest of their groups' weights (``default`` when none is set)."""
    found = [weights[g] for g in groups if g in weights]
    return max(found) if found else default


class Ticket(Generic[T]):
    __slots__ = ("user", "item", "start", "finish", "seq", "live")

    def __init__(self, user: str, item: T, start: float, finish: float, seq: int) -> None:
        self.user = user
        self.item = item
        self.start = start
        self.finish = finish
        self.seq = seq
        self.live = True


class Scheduler(Generic[T]):
    def __init__(self, policy: Policy = "fair") -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; use 'fair' or 'fifo'")
        self.policy = policy
        self.vtime = 0.0
        self._heap: list[tuple[float, int, Ticket[T]]] = []
        self._seq = itertools.count()
        self._last_finish: dict[str, float] = {}
        self._queued: dict[str, int] = {}
        self._live = 0

    def __len__(self) -> int:
        return self._live

    def queued(self, user: str) -> int:
        return self._queued.get(user, 0)

    def push(self, user: str, item: T, weight: float = 1.0, cost: float = 1.0) -> Ticket[T]:
        if weight <= 0:
            raise ValueError("weight must be > 0")
        seq = next(self._seq)
        start = max(self.vtime, self._last_finish.get(user, 0.0))
        finish = start + cost / weight
        self._last_finish[user] = finish
        t = Ticket(user, item, start, finish, seq)
        heapq.heappush(self._heap, (start if self.policy == "fair" else 0.0, seq, t))
        self._queued[user] = self._queued.get(user, 0) + 1
        self._live += 1
        return t

    def pop(self) -> T | None:
        """The next request to dispatch, or None when nothing waits."""
        while self._heap:
            _, _, t = heapq.heappop(self._heap)
            if not t.live:
                continue
            t.live = False
            self._live -= 1
            self.vtime = max(self.vtime, t.start)
            self._left(t.user)
            return t.item
        return None

    def remove(self, t: Ticket[T]) -> bool:
        """Take a waiter out (it gave up). False if it was already dispatched or removed."""
        if not t.live:
            return False
        t.live = False
        self._live -= 1
        if self._last_finish.get(t.user) == t.finish:
            # It was the user's newest request: give back the virtual time it had reserved.
            self._last_finish[t.user] = t.start
        self._left(t.user)
        if len(self._heap) > 2 * self._live + 64:
            self._heap = [e for e in self._heap if e[2].live]
            heapq.heapify(self._heap)
        return True

    def _left(self, user: str) -> None:
        n = self._queued[user] - 1
        if n:
            self._queued[user] = n
            return
        del self._queued[user]
        # Forget an idle user once their tags are behind virtual time: they would start at V.
        if self._last_finish.get(user, 0.0) <= self.vtime:
            self._last_finish.pop(user, None)
        if not self._live:
            # Nobody waits: forget every tag, so the numbers stay small and the state bounded.
            self._last_finish.clear()
            self.vtime = 0.0

    @property
    def users_tracked(self) -> int:
        return len(self._last_finish)


class Slot:
    """One in-flight place on a model; :meth:`release` gives it back (once)."""

    __slots__ = ("_gate", "_held")

    def __init__(self, gate: FairGate) -> None:
        self._gate = gate
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._gate._release()


def abandon(waiting: asyncio.Future[Slot]) -> None:
    """The client of a waiter running as a task/future (``ensure_future(gate.acquire(...))``)
    left: cancel the wait, or, if the slot was already handed over, give it back.

    Without this, a wait that finished just as the client left would keep its slot forever.
    """
    if not waiting.done():
        waiting.cancel()
    elif not waiting.cancelled() and waiting.exception() is None:
        waiting.result().release()


class FairGate:
    def __init__(
        self,
        *,
        slots: int,
        policy: Policy = "fair",
        max_queue: int = 1000,
        queue_timeout_s: float = 300.0,
    ) -> None:
        self._slots = max(0, slots)
        self.max_queue = max_queue
        self.queue_timeout_s = queue_timeout_s
        self.in_flight = 0
        self._sched: Scheduler[asyncio.Future[None]] = Scheduler(policy)

    @property
    def waiting(self) -> int:
        return len(self._sched)

    @property
    def slots(self) -> int:
        return self._slots

    def set_slots(self, n: int) -> None:
        """The capacity changed (a replica became ready or left): dispatch what now fits."""
        self._slots = max(0, n)
        self._dispatch()

    def try_acquire(self) -> Slot | None:
        """A slot now, without waiting, if one is free and nobody is queued ahead."""
        if self.in_flight < self._slots and not len(self._sched):
            self.in_flight += 1
            return Slot(self)
        return None

    async def acquire(self, user: str, weight: float = 1.0, cost: float = 1.0) -> Slot:
        slot = self.try_acquire()
        if slot is not None:
            return slot
        if len(self._sched) >= self.max_queue:
            raise Unavailable(
                f"The model is at capacity and {len(self._sched)} requests are already queued "
                "for it (the limit); retry shortly.",
                retry_after=2,
                code="queue_full",
            )
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        ticket = self._sched.push(user, fut, weight, cost)
        try:
            async with asyncio.timeout(self.queue_timeout_s):
                await fut
        except BaseException as e:
            if fut.done() and not fut.cancelled():
                # A slot was handed over just as the waiter gave up: pass it on.
                self._release()
            else:
                fut.cancel()
                self._sched.remove(ticket)
            if isinstance(e, TimeoutError):
                raise Unavailable(
                    f"The request waited {self.queue_timeout_s:g} s for the model, which stayed "
                    "at capacity; retry later.",
                    retry_after=5,
                    code="queue_timeout",
                ) from None
            raise
        return Slot(self)

    def _release(self) -> None:
        self.in_flight -= 1
        self._dispatch()

    def _dispatch(self) -> None:
        while self.in_flight < self._slots:
            fut = self._sched.pop()
            if fut is None:
                return
            if fut.done():  # cancelled and not yet removed
                continue
            fut.set_result(None)
            self.in_flight += 1
