"""Fair share: the scheduler as tables of cases, a deterministic simulation of the issue's
scenario on a fake clock, and the async gate's bounds and give-ups on a real event loop."""

from __future__ import annotations

import asyncio
import heapq
import random
import statistics

import pytest

from fleetgate.errors import Unavailable
from fleetgate.limits.fairshare import FairGate, Scheduler, abandon, weight_for

ORDER = [
    # (name, policy, pushes as (user, weight), pops before the last push, want order)
    ("fifo is arrival order", "fifo", [("a", 1)] * 3 + [("b", 1)], "a1 a2 a3 b1"),
    ("fair interleaves a newcomer", "fair", [("a", 1)] * 3 + [("b", 1)], "a1 b1 a2 a3"),
    ("fair, two busy users alternate", "fair", [("a", 1)] * 3 + [("b", 1)] * 3,
     "a1 b1 a2 b2 a3 b3"),
    ("weight 2 gets twice the turns", "fair", [("a", 2)] * 4 + [("b", 1)] * 4,
     "a1 b1 a2 a3 b2 a4 b3 b4"),
    ("three users round robin", "fair", [("a", 1)] * 2 + [("b", 1)] * 2 + [("c", 1)] * 2,
     "a1 b1 c1 a2 b2 c2"),
]


def run(policy: str, pushes: list[tuple[str, float]]) -> str:
    s: Scheduler[str] = Scheduler(policy)  # type: ignore[arg-type]
    seen: dict[str, int] = {}
    for user, w in pushes:
        seen[user] = seen.get(user, 0) + 1
        s.push(user, f"{user}{seen[user]}", w)
    out = []
    while (item := s.pop()) is not None:
        out.append(item)
    return " ".join(out)


@pytest.mark.parametrize(("name", "policy", "pushes", "want"), ORDER, ids=[c[0] for c in ORDER])
def test_dispatch_order(name: str, policy: str, pushes: list[tuple[str, float]], want: str) -> None:
    assert run(policy, pushes) == want


def test_an_idle_user_starts_at_virtual_time_not_behind_the_backlog() -> None:
    s: Scheduler[str] = Scheduler("fair")
    for i in range(1, 6):
        s.push("heavy", f"h{i}")
    assert [s.pop(), s.pop()] == ["h1", "h2"]
    s.push("light", "l1")
    assert s.pop() == "l1"
    assert [s.pop(), s.pop(), s.pop(), s.pop()] == ["h3", "h4", "h5", None]


def test_removed_waiters_leave_no_trace() -> None:
    s: Scheduler[str] = Scheduler("fair")
    t1 = s.push("a", "a1")
    t2 = s.push("a", "a2")
    s.push("a", "a3")
    t4 = s.push("a", "a4")
    assert s.remove(t2) and not s.remove(t2)
    assert s.remove(t4)  # the newest: its reserved virtual time is given back
    s.push("b", "b1")
    assert len(s) == 3 and s.queued("a") == 2
    assert [s.pop(), s.pop(), s.pop(), s.pop()] == ["a1", "b1", "a3", None]
    assert not s.remove(t1)  # already dispatched
    assert len(s) == 0 and s.users_tracked == 0 and s.vtime == 0


def test_per_user_fifo_and_bounded_state_under_random_operations() -> None:
    rng = random.Random(7)
    s: Scheduler[tuple[str, int]] = Scheduler("fair")
    live: dict[str, list] = {}
    pushed: dict[str, int] = {}
    popped: dict[str, list[int]] = {}
    removed: set[tuple[str, int]] = set()
    for _ in range(5000):
        r = rng.random()
        if r < 0.5:
            u = rng.choice("abcdefgh")
            pushed[u] = pushed.get(u, 0) + 1
            live.setdefault(u, []).append(s.push(u, (u, pushed[u]), rng.choice([1, 2, 4])))
        elif r < 0.6:
            users = [u for u, ts in live.items() if ts]
            if users:
                u = rng.choice(users)
                t = live[u].pop(rng.randrange(len(live[u])))
                if s.remove(t):
                    removed.add(t.item)
        else:
            item = s.pop()
            if item is not None:
                popped.setdefault(item[0], []).append(item[1])
                live[item[0]] = [t for t in live[item[0]] if t.item != item]
    while (item := s.pop()) is not None:
        popped.setdefault(item[0], []).append(item[1])
    for u, seqs in popped.items():
        assert seqs == sorted(seqs), f"user {u} was not served in order"
        assert not any((u, n) in removed for n in seqs)
    assert sum(map(len, popped.values())) + len(removed) == sum(pushed.values())
    assert len(s) == 0 and s.users_tracked == 0 and len(s._heap) == 0


WEIGHTS = [
    ((), 1.0),
    (("staff",), 1.0),
    (("staff", "research"), 4.0),
    (("research", "vip"), 8.0),
]


@pytest.mark.parametrize(("groups", "want"), WEIGHTS)
def test_weight_is_the_highest_of_the_groups(groups: tuple[str, ...], want: float) -> None:
    assert weight_for(groups, {"research": 4.0, "vip": 8.0, "interns": 0.5}) == want


# -- the scenario, simulated on a fake clock --------------------------------------------


def simulate(policy: str, *, slots: int = 4, heavy_outstanding: int = 50, light: bool = True,
             heavy: bool = True, light_every_s: float = 3.0, n_light: int = 40,
             seed: int = 1) -> list[float]:
    """Light user's latencies. Service times vary 1.5-2.5 s (a fixed sequence from ``seed``).

    The heavy user runs a closed loop: it keeps ``heavy_outstanding`` requests in flight or
    queued, sending the next as soon as one ends. The light user sends one every few seconds.
    """
    rng = random.Random(seed)
    sched: Scheduler[tuple[str, float]] = Scheduler(policy)  # type: ignore[arg-type]
    events: list[tuple[float, int, str, tuple[str, float]]] = []
    seq = 0
    in_flight = 0
    latencies: list[float] = []

    def at(t: float, kind: str, req: tuple[str, float]) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (t, seq, kind, req))

    def dispatch(now: float) -> None:
        nonlocal in_flight
        while in_flight < slots and (req := sched.pop()) is not None:
            in_flight += 1
            at(now + rng.uniform(1.5, 2.5), "done", req)

    if heavy:
        for _ in range(heavy_outstanding):
            at(0.0, "arrive", ("heavy", 0.0))
    if light:
        for i in range(n_light):
            at(20.0 + i * light_every_s, "arrive", ("light", 0.0))
    steps = 0
    while events and steps < 100_000:
        steps += 1
        now, _, kind, (user, arrived) = heapq.heappop(events)
        if kind == "arrive":
            sched.push(user, (user, now))  # the item remembers when it arrived
        else:
            in_flight -= 1
            if user == "light":
                latencies.append(now - arrived)
                if len(latencies) == n_light:
                    break
            else:
                at(now, "arrive", ("heavy", 0.0))  # the closed loop sends the next one
        dispatch(now)
    return latencies


def test_light_user_is_protected_by_fair_share_and_not_by_fifo() -> None:
    alone = statistics.mean(simulate("fair", heavy=False))
    fair = statistics.mean(simulate("fair"))
    fifo = statistics.mean(simulate("fifo"))
    assert 1.5 <= alone <= 2.5
    assert fair <= 1.5 * alone, (alone, fair)
    assert fifo >= 5 * alone, (alone, fifo)  # the issue: FIFO makes it about 10x


# -- the async gate -----------------------------------------------------------------------------


async def settle() -> None:
    """Let every ready callback run (a few loop turns; no wall-clock sleeping)."""
    for _ in range(5):
        await asyncio.sleep(0)


async def test_gate_passes_while_free_then_queues_in_fair_order() -> None:
    gate = FairGate(slots=2)
    held = [await gate.acquire("heavy"), await gate.acquire("heavy")]
    got: list[str] = []

    async def wait(user: str) -> None:
        slot = await gate.acquire(user)
        got.append(user)
        held.append(slot)

    tasks = [asyncio.create_task(wait("heavy")) for _ in range(5)]
    await settle()
    tasks.append(asyncio.create_task(wait("light")))
    await settle()
    assert gate.waiting == 6 and gate.in_flight == 2
    held.pop(0).release()
    held.pop(0).release()
    await settle()
    assert got == ["heavy", "light"]  # the newcomer goes ahead of the heavy backlog
    while held:
        held.pop(0).release()
        await settle()
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert gate.waiting == 0 and gate.in_flight == 0


async def test_gate_full_queue_is_a_503_with_retry_after() -> None:
    gate = FairGate(slots=1, max_queue=1)
    slot = await gate.acquire("a")
    waiter = asyncio.create_task(gate.acquire("b"))
    await settle()
    with pytest.raises(Unavailable) as e:
        await gate.acquire("c")
    assert e.value.status == 503 and e.value.error_code == "queue_full"
    assert int(e.value.headers["retry-after"]) >= 1
    slot.release()
    (await asyncio.wait_for(waiter, 5)).release()
    assert gate.in_flight == 0


async def test_gate_queue_timeout_leaves_the_queue() -> None:
    gate = FairGate(slots=1, queue_timeout_s=0.05)
    slot = await gate.acquire("a")
    with pytest.raises(Unavailable) as e:
        await gate.acquire("b")
    assert e.value.error_code == "queue_timeout"
    assert gate.waiting == 0
    slot.release()
    assert gate.in_flight == 0


async def test_gate_waiter_that_gives_up_leaks_nothing() -> None:
    gate = FairGate(slots=1)
    slot = await gate.acquire("a")
    gone = asyncio.create_task(gate.acquire("b"))  # its client will leave
    await settle()
    gone.cancel()
    await settle()
    assert gone.cancelled() and gate.waiting == 0
    slot.release()
    slot.release()  # released once only
    assert gate.in_flight == 0
    assert (await gate.acquire("c")) is not None and gate.in_flight == 1


async def test_gate_slot_handed_over_as_the_waiter_leaves_passes_on() -> None:
    gate = FairGate(slots=1)
    slot = await gate.acquire("a")
    b = asyncio.create_task(gate.acquire("b"))
    c = asyncio.create_task(gate.acquire("c"))
    await settle()
    slot.release()  # hands the slot to b's future ...
    b.cancel()  # ... and b's client leaves before b runs again
    await settle()
    assert b.cancelled()
    c_slot = await asyncio.wait_for(c, 5)  # b passed the slot on
    assert gate.in_flight == 1 and gate.waiting == 0
    c_slot.release()
    assert gate.in_flight == 0


async def test_gate_more_slots_dispatch_waiters() -> None:
    gate = FairGate(slots=0)  # no replica ready yet
    waiters = [asyncio.create_task(gate.acquire(u)) for u in "abc"]
    await settle()
    assert gate.waiting == 3
    gate.set_slots(2)
    await settle()
    assert gate.in_flight == 2 and gate.waiting == 1
    gate.set_slots(3)
    slots = await asyncio.wait_for(asyncio.gather(*waiters), 5)
    for s in slots:
        s.release()
    assert gate.in_flight == 0


async def test_abandon_a_wait_running_as_a_task() -> None:
    """The caller waits in a task of its own (keep-alives meanwhile); its client leaves."""
    gate = FairGate(slots=1)
    slot = await gate.acquire("a")
    still_waiting = asyncio.ensure_future(gate.acquire("b"))
    await settle()
    abandon(still_waiting)
    await settle()
    assert gate.waiting == 0
    slot.release()
    assert gate.in_flight == 0
    # The slot came just before the client left: abandoning gives it back.
    granted = asyncio.ensure_future(gate.acquire("c"))
    await settle()
    assert granted.done() and gate.in_flight == 1
    abandon(granted)
    assert gate.in_flight == 0
    # A wait that ended in a refusal has nothing to give back.
    full = FairGate(slots=0, max_queue=0)
    refused = asyncio.ensure_future(full.acquire("d"))
    await settle()
    abandon(refused)
    assert isinstance(refused.exception(), Unavailable)
