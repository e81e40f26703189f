"""Quota periods and the insufficient_quota refusal, as tables of cases (pure)."""

from __future__ import annotations

import datetime as dt

import pytest

from fleetgate.limits import quotas
from fleetgate.limits.spec import Quota, Subject


def ts(s: str) -> float:
    return dt.datetime.fromisoformat(s).replace(tzinfo=dt.UTC).timestamp()


PERIODS = [
    # (now, period, key, end)
    ("2026-11-24T03:35:00", "day", "2026-11-24", "2026-11-25T00:00:00"),
    ("2026-11-24T00:00:00", "day", "2026-11-24", "2026-11-25T00:00:00"),
    ("2026-11-24T23:59:59.999", "day", "2026-11-24", "2026-11-25T00:00:00"),
    ("2026-12-31T12:00:00", "day", "2026-12-31", "2027-01-01T00:00:00"),
    ("2026-11-24T03:35:00", "month", "2026-11", "2026-12-01T00:00:00"),
    ("2026-12-15T00:00:00", "month", "2026-12", "2027-01-01T00:00:00"),
    ("2028-02-29T10:00:00", "month", "2028-02", "2028-03-01T00:00:00"),
    ("2026-11-24T13:45:17.25", "month", "2026-11", "2026-12-01T00:00:00"),
    ("2026-11-24T13:45:17.25", "day", "2026-11-24", "2026-11-25T00:00:00"),
]


@pytest.mark.parametrize(("now", "period", "key", "end"), PERIODS)
def test_periods(now: str, period: quotas.Period, key: str, end: str) -> None:
    assert quotas.period_key(ts(now), period) == key
    assert quotas.period_end(ts(now), period).timestamp() == ts(end)
    start = quotas.period_start(ts(now), period)
    assert start.tzinfo is not None and start.utcoffset() == dt.timedelta(0)
    assert start.isoformat().startswith(key) and start.time() == dt.time(0)


FITS = [
    # (tokens, used, cost, fits, left)
    (1000, 0, 1000, True, 1000),
    (1000, 1, 1000, False, 999),
    (1000, 900, 100, True, 100),
    (1000, 1200, 1, False, 0),  # settling may pass the quota; nothing is left then
    (0, 0, 1, False, 0),
]


@pytest.mark.parametrize(("tokens", "used", "cost", "ok", "left"), FITS)
def test_fits_and_left(tokens: int, used: int, cost: int, ok: bool, left: int) -> None:
    q = Quota(tokens, "day")
    assert quotas.fits(q, used, cost) is ok
    assert quotas.left(q, used) == left


def test_exceeded_says_what_is_left_and_when_it_resets() -> None:
    err = quotas.exceeded(Subject("user", "alice"), Quota(5000, "day"), 4900, 1124,
                          ts("2026-11-24T18:00:00"))
    assert err.status == 429
    assert err.body()["error"]["code"] == "insufficient_quota"  # type: ignore[index]
    assert "user 'alice'" in err.message
    assert "100 tokens left" in err.message
    assert "counts 1124" in err.message
    assert "2026-11-25T00:00:00Z" in err.message
    assert "in 6h0m0s" in err.message
    assert err.headers["x-should-retry"] == "false"


@pytest.mark.parametrize("bad", [{"tokens": -1}, {"tokens": 5, "period": "week"}])
def test_bad_quota(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Quota(**bad)  # type: ignore[arg-type]


def test_period_keys_are_remembered_until_the_period_ends() -> None:
    keys = quotas.PeriodKeys()
    assert keys.get("day", ts("2026-11-24T23:59:59")) == ("2026-11-24", ts("2026-11-25T00:00:00"))
    assert keys.get("day", ts("2026-11-25T00:00:00"))[0] == "2026-11-25"
    assert keys.get("month", ts("2026-11-30T12:00:00"))[0] == "2026-11"
    assert keys.get("month", ts("2026-12-01T00:00:00"))[0] == "2026-12"
    # A wall clock set back is not answered from the cache.
    assert keys.get("day", ts("2026-11-24T10:00:00"))[0] == "2026-11-24"
