"""The clocks a module reads, as a seam tests can move.

A module that reads the time through ``clock: Clock = time`` (a typed module global, not the
``time`` module itself) lets a test replace its clocks without moving the event loop's, and
keeps that working when the module is compiled: mypyc binds an imported module at compile time,
but looks a plain global up each time it is read. The annotation matters: without it mypy takes
``clock = time`` for a module alias, and mypyc binds that too.
"""

from __future__ import annotations

from typing import Protocol


class Clock(Protocol):
    def time(self) -> float: ...

    def monotonic(self) -> float: ...
