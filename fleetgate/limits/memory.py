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

import math
import time
from collections.abc import Callable

from fleetgate.errors import GatewayError
from fleetgate.limits import quotas
from fleetgate.limits.backend import Backend, Failure, Grant, Outcome, refusal
from fleetgate.limits.buckets import wait_s
from fleetgate.limits.headers import RateView, rate_head
from fleetgate.limits.spec import Checks, Limits, Quota, Subject

_PLAN_LIMIT = 50_000  # compiled checks kept; past it the cache starts again (they are rebuilt)


class _Cell:
    """One subject's counters: its rpm and tpm buckets (level, last update) and its in-flight."""

    __slots__ = ("r", "r_at", "t", "t_at", "n")

    def __init__(self, now: float) -> None:
        # Full: a level above any capacity reads as the capacity (see _level), so a limit set
        # later on a subject that had none starts full too.
        self.r = self.t = math.inf
        self.r_at = self.t_at = now
        self.n = 0


def _level(level: float, at: float, now: float, cap: int) -> float:
    # Inlined refill (buckets.refill): the hot path avoids the call and min()/max().
    if now > at:
        level += (now - at) * cap / 60.0
    return cap if level > cap else level


class _Plan:
    """One :class:`Checks` compiled against this backend's counters: each subject's cell looked up
    once, the tpm buckets and concurrency counters a grant settles listed once, and each quota's
    counter for the current period remembered until the period ends. The admitter keeps one
    ``Checks`` per (key, model), so a request finds its plan with one dict lookup."""

    __slots__ = ("checks", "rows", "tpm", "conc", "quotas", "periods", "levels")

    def __init__(self, checks: Checks, cell: Callable[[Subject], _Cell]) -> None:
        self.checks = checks
        self.rows = tuple(
            (cell(subject), lim.rpm, lim.tpm, lim.max_concurrent) for subject, lim in checks.limits
        )
        self.tpm = tuple((c, tpm) for c, _, tpm, _ in self.rows if tpm is not None)
        self.conc = tuple(c for c, _, _, most in self.rows if most is not None)
        self.quotas = checks.quotas
        # Per quota: (period start, period end, its counter), or None until first used.
        self.periods: list[tuple[float, float, list[int]] | None] = [None] * len(checks.quotas)
        # Scratch: each row's rpm and tpm level between deciding and taking (admit runs to the
        # end without yielding, so one list per plan is enough).
        self.levels = [0.0] * (2 * len(self.rows))


class _MemoryGrant(Grant):
    __slots__ = ("_tpm", "_conc", "_quota", "_clock")

    def __init__(
        self,
        head: bytes,
        cost: int,
        tpm: tuple[tuple[_Cell, int], ...],
        conc: tuple[_Cell, ...],
        quota: list[list[int]],
        clock: Callable[[], float],
    ) -> None:
        self.head = head
        self.cost = cost
        self._settled = False
        self._tpm = tpm
        self._conc = conc
        self._quota = quota
        self._clock = clock

    def settle(self, prompt_tokens: int, completion_tokens: int) -> None:
        if self._settled:
            return
        self._settled = True
        actual = (prompt_tokens if prompt_tokens > 0 else 0) + (
            completion_tokens if completion_tokens > 0 else 0)
        refund = self.cost - actual
        if refund:
            if self._tpm:
                now = self._clock()
                for cell, cap in self._tpm:
                    # The level now (refilled, capped), then the refund (or the extra charge),
                    # capped again: buckets.settle_level of buckets.refill, inlined.
                    level = cell.t
                    if now > cell.t_at:
                        level += (now - cell.t_at) * cap / 60.0
                        cell.t_at = now
                    if level > cap:
                        level = float(cap)
                    level += refund
                    cell.t = float(cap) if level > cap else level
            for q in self._quota:
                q[0] -= refund
        for c in self._conc:
            c.n -= 1


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
        self._cells: dict[Subject, _Cell] = {}
        # (subject, period key) -> [tokens used]; a one-item list so a grant can hold it.
        self._quota: dict[tuple[Subject, str], list[int]] = {}
        self._periods: set[str] = set()
        self._periods_now = quotas.PeriodKeys()
        self._plans: dict[int, _Plan] = {}

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

    async def seed_quota(self, subject: Subject, quota: Quota, used: int, now_wall: float) -> None:
        key = quotas.period_key(now_wall, quota.period)
        if (subject, key) not in self._quota:
            self._used(subject, key)[0] = used

    def in_flight(self, subject: Subject) -> int:
        c = self._cells.get(subject)
        return c.n if c else 0

    def quota_used(self, subject: Subject, quota: Quota) -> int:
        cell = self._quota.get((subject, quotas.period_key(self._wall(), quota.period)))
        return cell[0] if cell else 0

    def _plan(self, checks: Checks) -> _Plan:
        if len(self._plans) >= _PLAN_LIMIT:
            self._plans.clear()
        plan = self._plans[id(checks)] = _Plan(checks, self._cell)
        return plan

    def _cell(self, subject: Subject) -> _Cell:
        cell = self._cells.get(subject)
        if cell is None:
            cell = self._cells[subject] = _Cell(self._clock())
        return cell

    def admit(self, checks: Checks, cost: int) -> Grant:
        plan = self._plans.get(id(checks))
        if plan is None or plan.checks is not checks:  # (an id can be reused once freed)
            plan = self._plan(checks)
        now = self._clock()
        # Decide first, against every counter; take only if all of them allow it. The refill
        # (buckets.refill) is inlined: this runs on every request.
        levels = plan.levels
        i = 0
        for cell, rpm, tpm, most in plan.rows:
            if rpm is not None:
                r = cell.r
                if now > cell.r_at:
                    r += (now - cell.r_at) * rpm / 60.0
                if r > rpm:
                    r = float(rpm)
                if r < 1:
                    raise self._refusal(checks, cost, now, self._wall())
                levels[i] = r
            if tpm is not None:
                t = cell.t
                if now > cell.t_at:
                    t += (now - cell.t_at) * tpm / 60.0
                if t > tpm:
                    t = float(tpm)
                if t < cost:
                    raise self._refusal(checks, cost, now, self._wall())
                levels[i + 1] = t
            if most is not None and cell.n >= most:
                raise self._refusal(checks, cost, now, self._wall())
            i += 2
        used: list[list[int]] = []
        if plan.quotas:
            wall = self._wall()
            periods = plan.periods
            for q, (subject, quota) in enumerate(plan.quotas):
                p = periods[q]
                if p is None or not p[0] <= wall < p[1]:
                    key, start, end = self._periods_now.span(quota.period, wall)
                    p = periods[q] = (start, end, self._used(subject, key))
                counter = p[2]
                if counter[0] + cost > quota.tokens:
                    raise self._refusal(checks, cost, now, wall)
                used.append(counter)
        # Take, and find the most restrictive of each kind for the headers as we go: the fewest
        # whole tokens left, then the smallest capacity.
        r_cap = t_cap = 0
        r_best = t_best = 0.0
        i = 0
        for cell, rpm, tpm, most in plan.rows:
            if rpm is not None:
                r = cell.r = levels[i] - 1
                cell.r_at = now
                if not r_cap or r // 1 < r_best // 1 or (r // 1 == r_best // 1 and rpm < r_cap):
                    r_cap, r_best = rpm, r
            if tpm is not None:
                t = cell.t = levels[i + 1] - cost
                cell.t_at = now
                if not t_cap or t // 1 < t_best // 1 or (t // 1 == t_best // 1 and tpm < t_cap):
                    t_cap, t_best = tpm, t
            if most is not None:
                cell.n += 1
            i += 2
        for counter in used:
            counter[0] += cost
        head = rate_head(r_cap or None, r_best, t_cap or None, t_best) if r_cap or t_cap else b""
        return _MemoryGrant(head, cost, plan.tpm, plan.conc, used, self._clock)

    def _refusal(self, checks: Checks, cost: int, now: float, wall: float) -> GatewayError:
        """Why a request was refused, with its headers: every counter read again at the same
        ``now`` and ``wall`` as the decision, so it finds the same refusal. A quota refusal
        wins (no retry helps before the reset), then the longest rate wait, then a concurrency
        limit."""
        views: list[tuple[Limits, float, float]] = []
        rate_fail: tuple[Failure, int, float] | None = None
        conc_fail: int | None = None
        for i, (subject, lim) in enumerate(checks.limits):
            cell = self._cell(subject)
            r = t = 0.0
            if lim.rpm is not None:
                r = _level(cell.r, cell.r_at, now, lim.rpm)
                if r < 1:
                    w = wait_s(r, 1, lim.rpm)
                    if rate_fail is None or w > rate_fail[2]:
                        rate_fail = ("rpm", i, w)
            if lim.tpm is not None:
                t = _level(cell.t, cell.t_at, now, lim.tpm)
                if t < cost:
                    w = wait_s(t, cost, lim.tpm)
                    if rate_fail is None or w > rate_fail[2]:
                        rate_fail = ("tpm", i, w)
            if lim.max_concurrent is not None and cell.n >= lim.max_concurrent and conc_fail is None:
                conc_fail = i
            views.append((lim, r, t))
        failed: Failure = ""
        index, wait, quota_used = 0, 0.0, 0
        for i, (subject, quota) in enumerate(checks.quotas):
            counter = self._used(subject, self._periods_now.get(quota.period, wall)[0])
            if counter[0] + cost > quota.tokens:
                failed, index, quota_used = "quota", i, counter[0]
                break
        if not failed and rate_fail is not None:
            failed, index, wait = rate_fail
        elif not failed and conc_fail is not None:
            failed, index, wait = "concurrency", conc_fail, 1.0
        assert failed, "a refused request must fail a check"
        out = Outcome(
            failed, index, wait,
            [RateView.of(lim.rpm, r) for lim, r, _ in views if lim.rpm is not None],
            [RateView.of(lim.tpm, t) for lim, _, t in views if lim.tpm is not None],
            quota_used,
        )
        return refusal(out, checks, cost, wall)
