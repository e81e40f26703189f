"""The usage writer's flattening (``store/usage_rows.py``): each record's time written as the
store's own DateTime would write it, every other column as it was recorded."""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy.dialects import sqlite

from fleetgate.store import repo
from fleetgate.store.tables import usage_events
from fleetgate.store.usage_rows import SqliteTime, flatten, from_epoch

_SQLITE = usage_events.c.created_at.type.dialect_impl(sqlite.dialect()).bind_processor(
    sqlite.dialect())
BASE = 1_795_000_000  # 2026-11-18, a whole second


@pytest.mark.parametrize("fraction", [0, 1, 9, 10, 999, 1000, 1001, 123456, 999000, 999999,
                                      999999.5, 999999.7, 0.5, 1.5, 2.5])
def test_sqlite_time_is_sqlalchemys_text_to_the_microsecond(fraction):
    """A float holds x.000001 as x.00000099...: rounded as datetime rounds it, not cut, and a
    time that rounds up to the next second is written as that second."""
    t = BASE + fraction / 1_000_000
    want = _SQLITE(from_epoch(t))
    assert SqliteTime()(t) == want
    assert len(want) == 26 and want.startswith("2026-11-18 ")


def test_sqlite_time_agrees_with_datetime_over_many_times():
    stamp = SqliteTime()
    for i in range(20_000):
        t = BASE + i * 0.000_731_9  # a step that lands everywhere within the second
        assert stamp(t) == _SQLITE(from_epoch(t)), t


def test_sqlite_time_formats_each_second_again_when_it_changes():
    stamp = SqliteTime()
    times = [BASE + 0.5, BASE + 0.75, BASE + 1.25, BASE + 86_400.0, BASE + 0.5]
    assert [stamp(t) for t in times] == [_SQLITE(from_epoch(t)) for t in times]


def _event(i: int, when: float | dt.datetime) -> repo.UsageEvent:
    return repo.UsageEvent(i, f"m{i}", "chat.completions", 200 + i, bool(i % 2), i, 2 * i, 3 * i,
                           when, None if i % 3 else i, None, not i % 2)


def test_flatten_keeps_every_column_in_order_and_converts_only_the_time():
    when = dt.datetime(2026, 11, 18, 9, 30, 5, 250_000)
    events = [_event(1, BASE + 0.25), _event(2, when), _event(3, BASE + 7.5)]
    flat = flatten(events, repo._CREATED, True, None, [])
    n = repo._NCOLS
    assert len(flat) == 3 * n
    for k, e in enumerate(events):
        row = flat[k * n:(k + 1) * n]
        assert row[:repo._CREATED] == list(e[:repo._CREATED])
        assert row[repo._CREATED + 1:] == list(e[repo._CREATED + 1:])
    assert flat[repo._CREATED] == _SQLITE(from_epoch(BASE + 0.25))
    assert flat[n + repo._CREATED] is when  # no processor given: as it is
    assert flat[2 * n + repo._CREATED] == _SQLITE(from_epoch(BASE + 7.5))


def test_flatten_for_another_store_gives_datetimes_and_runs_each_converter():
    when = dt.datetime(2026, 11, 18, 9, 30, 5)
    events = [_event(4, BASE + 0.5), _event(5, when)]
    flat = flatten(events, repo._CREATED, False, lambda d: ("bound", d),
                   [(1, str.upper), (4, int)])
    n = repo._NCOLS
    assert flat[repo._CREATED] == from_epoch(BASE + 0.5)  # epoch seconds: a datetime, as is
    assert flat[n + repo._CREATED] == ("bound", when)  # a datetime: through its processor
    assert (flat[1], flat[n + 1]) == ("M4", "M5")
    assert (flat[4], flat[n + 4]) == (0, 1)
    assert flatten([], repo._CREATED, True, None, []) == []


def test_epoch_seconds_are_read_as_utc_whatever_the_local_zone(monkeypatch):
    """The store holds naive UTC times: a gateway whose machine runs in another zone (a POSIX
    TZ string, five hours behind, so no zone files are needed) must store the same text."""
    import time

    monkeypatch.setenv("TZ", "XYZ+5")
    time.tzset()
    try:
        assert time.localtime(BASE).tm_hour != time.gmtime(BASE).tm_hour  # the zone took effect
        assert from_epoch(BASE + 0.5) == dt.datetime(2026, 11, 18, 11, 6, 40, 500_000)
        assert SqliteTime()(BASE + 0.5) == "2026-11-18 11:06:40.500000"
        flat = flatten([_event(1, BASE + 0.5)], repo._CREATED, False, None, [])
        assert flat[repo._CREATED] == dt.datetime(2026, 11, 18, 11, 6, 40, 500_000)
    finally:
        monkeypatch.undo()  # the zone this process had, then read again
        time.tzset()
