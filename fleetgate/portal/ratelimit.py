"""Failed sign-ins, counted per user name and per client address, in memory and bounded.

A name or an address with ``max_failures`` failures inside ``window_s`` is refused until the
window that started with its first failure ends; a good sign-in clears its name's count (not
its address's: one person's success must not unlock an address guessing for others). At most
``max_entries`` names and addresses are kept; past that the oldest are forgotten, so a flood of
made-up names costs bounded memory (and forgetting only ever lets a few more attempts through).
Pure and single-threaded: called from the event loop only.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable


class SigninLimiter:
    def __init__(
        self, *, per_user: int = 5, per_address: int = 20, window_s: float = 300.0,
        max_entries: int = 10_000, clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.per_user = per_user
        self.per_address = per_address
        self.window_s = window_s
        self.max_entries = max_entries
        self.clock = clock
        self._counts: OrderedDict[str, tuple[float, int]] = OrderedDict()

    def _get(self, key: str, now: float) -> int:
        entry = self._counts.get(key)
        if entry is None:
            return 0
        if now - entry[0] >= self.window_s:
            del self._counts[key]
            return 0
        return entry[1]

    def blocked(self, user: str, address: str) -> bool:
        now = self.clock()
        return (self._get("u:" + user.lower(), now) >= self.per_user
                or self._get("a:" + address, now) >= self.per_address)

    def failed(self, user: str, address: str) -> None:
        now = self.clock()
        for key in ("u:" + user.lower(), "a:" + address):
            n = self._get(key, now)
            start = self._counts[key][0] if n else now
            self._counts[key] = (start, n + 1)
            self._counts.move_to_end(key)
        while len(self._counts) > self.max_entries:
            self._counts.popitem(last=False)

    def succeeded(self, user: str) -> None:
        self._counts.pop("u:" + user.lower(), None)
