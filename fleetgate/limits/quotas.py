"""Token quotas per UTC day or month: pure functions, the wall clock passed in.

A quota's usage is one counter per subject and period, named by :func:`period_key`
(``2026-11-24`` for a day, ``2026-11`` for a month). A new period is a new counter, so a quota
"resets" at midnight UTC (or the first of the month) without anyone resetting it.

Admission counts the request's cost (see :func:`fleetgate.limits.buckets.admission_cost`)
against what is left; a request that can't fit is refused before any GPU work with
:func:`exceeded`, a 429 ``insufficient_quota`` saying what is left and when it resets. When the
response ends the counter settles to the real usage (it may then pass the quota by what the
last request really used; the next request is refused).
"""

from __future__ import annotations

import datetime as dt

from fleetgate.errors import QuotaExceeded
from fleetgate.limits.headers import format_duration
from fleetgate.limits.spec import Period, Quota, Subject

UTC = dt.UTC


def period_start(now: float, period: Period) -> dt.datetime:
    t = dt.datetime.fromtimestamp(now, UTC)
    if period == "day":
        return t.replace(hour=0, minute=0, second=0, microsecond=0)
    return t.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def period_end(now: float, period: Period) -> dt.datetime:
    """When the period that holds ``now`` ends, i.e. when the quota resets."""
    start = period_start(now, period)
    if period == "day":
        return start + dt.timedelta(days=1)
    if start.month == 12:
        return start.replace(year=start.year + 1, month=1)
    return start.replace(month=start.month + 1)


def period_key(now: float, period: Period) -> str:
    start = period_start(now, period)
    return start.strftime("%Y-%m-%d" if period == "day" else "%Y-%m")


class PeriodKeys:
    """:func:`period_key` and the period's end, remembered until the period ends, so that the
    request path formats no date. Not thread-safe (one per event loop)."""

    __slots__ = ("_cache",)

    def __init__(self) -> None:
        self._cache: dict[str, tuple[str, float, float]] = {}

    def get(self, period: Period, now: float) -> tuple[str, float]:
        """(key, end as UNIX seconds) of the period that holds ``now``."""
        hit = self.span(period, now)
        return hit[0], hit[2]

    def span(self, period: Period, now: float) -> tuple[str, float, float]:
        """(key, start, end; both as UNIX seconds) of the period that holds ``now``."""
        hit = self._cache.get(period)
        if hit is None or not hit[1] <= now < hit[2]:
            hit = self._cache[period] = (
                period_key(now, period),
                period_start(now, period).timestamp(),
                period_end(now, period).timestamp(),
            )
        return hit


def left(quota: Quota, used: int) -> int:
    return max(0, quota.tokens - used)


def fits(quota: Quota, used: int, cost: int) -> bool:
    return used + cost <= quota.tokens


def exceeded(subject: Subject, quota: Quota, used: int, cost: int, now: float) -> QuotaExceeded:
    end = period_end(now, quota.period)
    remaining = left(quota, used)
    wait = max(0.0, end.timestamp() - now)
    return QuotaExceeded(
        f"The token quota of {quota.tokens} per {quota.period} for {subject} has {remaining} "
        f"tokens left, and this request counts {cost} (its max_tokens, or the model's default, "
        f"plus the prompt). The quota resets at {end.strftime('%Y-%m-%dT%H:%M:%SZ')} "
        f"(in {format_duration(round(wait))}).",
        # The official client retries 429s unless told not to: no retry helps before the reset.
        headers={"x-should-retry": "false"},
    )
