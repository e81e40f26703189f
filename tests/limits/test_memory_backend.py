"""The memory backend over (fake) time: refills, quota periods, seeding. Synchronous by contract."""

from __future__ import annotations

import datetime as dt

import pytest
from limits_fakes import FakeClock

from fleetgate.errors import QuotaExceeded, RateLimited
from fleetgate.limits.backend import NO_LIMITS, Grant, admit, create
from fleetgate.limits.memory import MemoryBackend
from fleetgate.limits.spec import Checks, Limits, Quota, Subject

ALICE, TEAM = Subject("user", "alice"), Subject("group", "team")


def test_admit_is_synchronous_and_registered_by_name() -> None:
    b = create("memory")
    assert isinstance(b, MemoryBackend)
    g = b.admit(Checks.of([(ALICE, Limits(rpm=1))]), 1)
    assert isinstance(g, Grant)  # a Grant, not an awaitable: no await on the hot path
    with pytest.raises(ValueError, match="unknown limits backend"):
        create("memcached")


def test_no_checks_costs_nothing(clock: FakeClock) -> None:
    b = MemoryBackend(clock=clock)
    assert admit(b, Checks(), body_bytes=10, max_tokens=None) is NO_LIMITS
    # Caps only: checked, but no counter is kept.
    assert admit(b, Checks.of([(ALICE, Limits(max_n=2))]), body_bytes=1, max_tokens=1) is NO_LIMITS


def test_rpm_refills_continuously(clock: FakeClock) -> None:
    b = MemoryBackend(clock=clock)
    checks = Checks.of([(ALICE, Limits(rpm=60))])
    for _ in range(60):
        b.admit(checks, 1)
    with pytest.raises(RateLimited) as e:
        b.admit(checks, 1)
    assert e.value.headers["retry-after-ms"] == "1000"
    clock.advance(0.999)
    with pytest.raises(RateLimited):
        b.admit(checks, 1)
    clock.advance(0.001)
    g = b.admit(checks, 1)
    assert g.headers["x-ratelimit-remaining-requests"] == "0"
    assert g.headers["x-ratelimit-reset-requests"] == "1m0s"
    clock.advance(30)
    assert b.admit(checks, 1).headers["x-ratelimit-remaining-requests"] == "29"


def test_tpm_undercount_makes_later_requests_wait(clock: FakeClock) -> None:
    b = MemoryBackend(clock=clock)
    checks = Checks.of([(ALICE, Limits(tpm=600))])
    g = b.admit(checks, 100)
    g.settle(400, 500)  # it used 900, not 100: the bucket goes to 600 - 900 = -300
    with pytest.raises(RateLimited) as e:
        b.admit(checks, 100)
    assert e.value.headers["retry-after"] == "40"  # 400 tokens at 10 a second
    clock.advance(40)
    b.admit(checks, 100)


def test_an_undercount_settled_on_a_full_bucket_charges_from_full(clock: FakeClock) -> None:
    # The bucket refilled past its capacity while the request ran: the refill is capped first,
    # then the extra charged, so the overrun is not lost in the refill.
    b = MemoryBackend(clock=clock)
    checks = Checks.of([(ALICE, Limits(tpm=600))])
    g = b.admit(checks, 100)
    clock.advance(60)  # full again (600), not 500 + 600
    g.settle(400, 500)  # 800 more than charged: 600 - 800 = -200
    with pytest.raises(RateLimited) as e:
        b.admit(checks, 100)
    assert e.value.headers["retry-after"] == "30"  # 300 tokens at 10 a second
    clock.advance(30)
    b.admit(checks, 100)


def test_quota_rolls_over_at_midnight_utc() -> None:
    wall = FakeClock(dt.datetime(2026, 11, 24, 23, 59, 0, tzinfo=dt.UTC).timestamp())
    b = MemoryBackend(clock=FakeClock(), wall=wall)
    q = Quota(1000, "day")
    checks = Checks.of([], [(ALICE, q)])
    b.admit(checks, 1000)
    with pytest.raises(QuotaExceeded) as e:
        b.admit(checks, 1)
    assert "resets at 2026-11-25T00:00:00Z (in 1m0s)" in e.value.message
    wall.advance(60)
    b.admit(checks, 1000)
    assert b.quota_used(ALICE, q) == 1000
    # Yesterday's counter is gone: state stays bounded by subjects, not by days.
    assert len(b._quota) == 1


async def test_seed_quota_from_recorded_usage(clock: FakeClock) -> None:
    wall = FakeClock(dt.datetime(2026, 11, 24, tzinfo=dt.UTC).timestamp())
    b = MemoryBackend(clock=clock, wall=wall)
    q = Quota(1000, "month")
    await b.seed_quota(TEAM, q, 950, wall.t)
    await b.seed_quota(TEAM, q, 0, wall.t)  # an existing counter is never overwritten
    with pytest.raises(QuotaExceeded, match="50 tokens left"):
        b.admit(Checks.of([], [(TEAM, q)]), 51)


def test_settle_releases_slot_even_without_usage(clock: FakeClock) -> None:
    """A request that failed before any token (upstream error, client gone) settles to 0."""
    b = MemoryBackend(clock=clock)
    checks = Checks.of([(ALICE, Limits(max_concurrent=1))], [(ALICE, Quota(100, "day"))])
    g = b.admit(checks, 80)
    assert b.in_flight(ALICE) == 1
    g.settle(0, 0)
    assert b.in_flight(ALICE) == 0
    assert b.quota_used(ALICE, Quota(100, "day")) == 0


def test_a_limit_set_later_starts_full(clock: FakeClock) -> None:
    b = MemoryBackend(clock=clock)
    b.admit(Checks.of([(ALICE, Limits(max_concurrent=5))]), 1)
    g = b.admit(Checks.of([(ALICE, Limits(rpm=10, tpm=100))]), 40)
    assert g.headers["x-ratelimit-remaining-requests"] == "9"
    assert g.headers["x-ratelimit-remaining-tokens"] == "60"
