"""A batch of usage records as one flat list of parameters, in column order: the usage writer's
per-record work (``repo.insert_usage`` calls it; the driver gets the list as it is).

It runs in the writer's thread, holding the GIL, while the event loop's thread serves requests:
every microsecond spent here is one the event loop may wait for the GIL. So it is compiled with
the request path (``setup.py``'s ``COMPILED``), and converts only what the store needs converted:
a record's time, and the columns whose type has a bind processor on this dialect.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterable
from typing import Any

Convert = Callable[[Any], Any]

_DIGITS3 = [f"{i:03d}" for i in range(1000)]  # "000" to "999": a time's microseconds in two


class SqliteTime:
    """Epoch seconds as SQLite's DATETIME text (``YYYY-MM-DD HH:MM:SS.ffffff``, what SQLAlchemy
    writes and compares against), formatting each whole second once."""

    def __init__(self) -> None:
        self.second = -1
        self.prefix = ""

    def __call__(self, t: float) -> str:
        s = int(t)
        # Rounded half to even, as datetime.fromtimestamp rounds (truncating wrote 1 µs early
        # for a time such as x.000001, which a float holds as x.00000099...).
        us = round((t - s) * 1_000_000)
        if us == 1_000_000:  # rounds up into the next second
            s += 1
            us = 0
        if s != self.second:
            self.second = s
            self.prefix = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(s))
        return self.prefix + "." + _DIGITS3[us // 1000] + _DIGITS3[us % 1000]


def from_epoch(t: float) -> dt.datetime:
    """Epoch seconds as a naive UTC datetime (what the store's DateTime columns hold)."""
    return dt.datetime.fromtimestamp(t, dt.UTC).replace(tzinfo=None)


def flatten(events: Iterable[tuple[Any, ...]], created_at: int, sqlite: bool,
            created: Convert | None, others: list[tuple[int, Convert]]) -> list[Any]:
    """Each record's columns, one record after another. A time given as epoch seconds (the
    request path's cheap clock) becomes SQLite's text or a datetime; a datetime goes through
    ``created`` (the column's bind processor), if there is one; column ``i`` of ``others``
    through its converter."""
    stamp = SqliteTime()
    flat: list[Any] = []
    for e in events:
        base = len(flat)
        flat.extend(e)
        t = e[created_at]
        if isinstance(t, float):
            flat[base + created_at] = stamp(t) if sqlite else from_epoch(t)
        elif created is not None:
            flat[base + created_at] = created(t)
        for i, convert in others:
            flat[base + i] = convert(flat[base + i])
    return flat
