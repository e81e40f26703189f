"""The ``memory`` backend: every counter in this process's memory.

Synchronous: :meth:`MemoryBackend.admit` decides and takes in one pass over the request's checks
(O(checks) dict lookups, no await, no task), and ``settle`` is the same. The event loop runs one
request's admission at a time, so check-then-take is atomic here without a lock.

Exact for one gateway process only. With ``fleetgate serve --workers N`` each worker would count
on its own, so the gateway refuses ``--workers`` above 1 with this backend when any limit is set.
Counters start empty when the process starts: buckets full, no one in flight, quotas at what
:meth:`seed_quota` sets (the caller seeds them from the usage records).

``clock`` (monotonic seconds, for buckets) and ``wall`` (UNIX seconds, for quota periods) are
injectable for tests.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from fleetgate.limits import quotas
from fleetgate.limits.backend import Backend, Failure, Grant, Outcome, refusal
from fleetgate.limits.buckets import refill, settle_level, wait_s
from fleetgate.limits.headers import RateView
from fleetgate.limits.spec import Checks, Quota, Subject


class _Bucket:
    __slots__ = ("capacity", "level", "updated")

    def __init__(self, capacity: int, now: float) -> None:
        self.capacity = capacity
        self.level = float(capacity)
        self.updated = now

    def at(self, capacity: int, now: float) -> float:
        """Bring the level to ``now`` (a changed limit takes effect as a new capacity)."""
        self.capacity = capacity
        self.level = refill(self.level, self.updated, now, capacity)
        self.updated = max(self.updated, now)
        return self.level


class _Counter:
    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0


class _MemoryGrant(Grant):
    __slots__ = ("_tpm", "_conc", "_quota", "_clock")

    def __init__(
        self,
        headers: dict[str, str],
        cost: int,
        tpm: list[_Bucket],
        conc: list[_Counter],
        quota: list[list[int]],
        clock: Callable[[], float],
    ) -> None:
        super().__init__(headers, cost)
        self._tpm = tpm
        self._conc = conc
        self._quota = quota
        self._clock = clock

    def _settle(self, actual: int) -> None:
        if self._tpm:
            now = self._clock()
            for b in self._tpm:
                b.at(b.capacity, now)
                b.level = settle_level(b.level, self.cost, actual, b.capacity)
        for c in self._conc:
            c.n -= 1
        for q in self._quota:
            q[0] += actual - self.cost


class MemoryBackend(Backend):
    name = "memory"

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._clock = clock
        self._wall = wall
        self._buckets: dict[tuple[Subject, str], _Bucket] = {}
        self._conc: dict[Subject, _Counter] = {}
        # (subject, period key) -> [tokens used]; a one-item list so a grant can hold it.
        self._quota: dict[tuple[Subject, str], list[int]] = {}
        self._periods: set[str] = set()

    def _bucket(self, subject: Subject, kind: str, capacity: int, now: float) -> _Bucket:
        b = self._buckets.get((subject, kind))
        if b is None:
            b = self._buckets[(subject, kind)] = _Bucket(capacity, now)
        return b

    def _used(self, subject: Subject, period_key: str) -> list[int]:
        cell = self._quota.get((subject, period_key))
        if cell is None:
            if period_key not in self._periods:
                self._new_period(period_key)
            cell = self._quota[(subject, period_key)] = [0]
        return cell

    def _new_period(self, key: str) -> None:
        # A new day or month began: drop counters of periods of the same length that ended
        # (a grant still holding one settles into the dropped list, harmlessly).
        stale = {p for p in self._periods if len(p) == len(key) and p < key}
        if stale:
            self._quota = {k: v for k, v in self._quota.items() if k[1] not in stale}
            self._periods -= stale
        self._periods.add(key)

    def seed_quota(self, subject: Subject, quota: Quota, used: int, now_wall: float) -> None:
        key = quotas.period_key(now_wall, quota.period)
        if (subject, key) not in self._quota:
            self._used(subject, key)[0] = used

    def in_flight(self, subject: Subject) -> int:
        c = self._conc.get(subject)
        return c.n if c else 0

    def quota_used(self, subject: Subject, quota: Quota) -> int:
        cell = self._quota.get((subject, quotas.period_key(self._wall(), quota.period)))
        return cell[0] if cell else 0

    def admit(self, checks: Checks, cost: int) -> Grant:
        now = self._clock()
        rpm: list[_Bucket] = []
        tpm: list[_Bucket] = []
        conc: list[_Counter] = []
        # Decide first, against every counter; take only if all of them allow it. A quota
        # refusal wins (no retry helps before the reset), then the longest rate wait, then a
        # concurrency limit.
        rate_fail: tuple[Failure, int, float] | None = None
        conc_fail: int | None = None
        for i, (subject, lim) in enumerate(checks.limits):
            if lim.rpm is not None:
                b = self._bucket(subject, "r", lim.rpm, now)
                if b.at(lim.rpm, now) < 1:
                    w = wait_s(b.level, 1, lim.rpm)
                    if rate_fail is None or w > rate_fail[2]:
                        rate_fail = ("rpm", i, w)
                rpm.append(b)
            if lim.tpm is not None:
                b = self._bucket(subject, "t", lim.tpm, now)
                if b.at(lim.tpm, now) < cost:
                    w = wait_s(b.level, cost, lim.tpm)
                    if rate_fail is None or w > rate_fail[2]:
                        rate_fail = ("tpm", i, w)
                tpm.append(b)
            if lim.max_concurrent is not None:
                c = self._conc.get(subject)
                if c is None:
                    c = self._conc[subject] = _Counter()
                if c.n >= lim.max_concurrent and conc_fail is None:
                    conc_fail = i
                conc.append(c)
        cells: list[list[int]] = []
        failed: Failure = ""
        index, wait, quota_used = 0, 0.0, 0
        if checks.quotas:
            wall = self._wall()
            for i, (subject, quota) in enumerate(checks.quotas):
                cell = self._used(subject, quotas.period_key(wall, quota.period))
                if not quotas.fits(quota, cell[0], cost):
                    failed, index, quota_used = "quota", i, cell[0]
                    break
                cells.append(cell)
        if not failed and rate_fail is not None:
            failed, index, wait = rate_fail
        elif not failed and conc_fail is not None:
            failed, index, wait = "concurrency", conc_fail, 1.0
        if failed:
            out = Outcome(
                failed, index, wait,
                [RateView.of(b.capacity, b.level) for b in rpm],
                [RateView.of(b.capacity, b.level) for b in tpm],
                quota_used,
            )
            raise refusal(out, checks, cost, self._wall())
        for b in rpm:
            b.level -= 1
        for b in tpm:
            b.level -= cost
        for c in conc:
            c.n += 1
        for cell in cells:
            cell[0] += cost
        out = Outcome(
            "", 0, 0.0,
            [RateView.of(b.capacity, b.level) for b in rpm],
            [RateView.of(b.capacity, b.level) for b in tpm],
        )
        return _MemoryGrant(out.headers(), cost, tpm, conc, cells, self._clock)
