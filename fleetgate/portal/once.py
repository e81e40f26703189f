"""What the portal does once: a new key's value shown once, a form acted on once.

Key creation and rotation answer their POST with a 303 to a GET page (POST/redirect/GET), so a
reload repeats the GET, never the form. Two things make that work without the key's value ever
travelling in a URL (browser history, proxy logs, ``Referer``):

- :class:`Flash` keeps a value the portal just made between the POST and that GET: one slot per
  (session, key id), for ``ttl_s`` (5 minutes), emptied by the first read. A session is named by
  the SHA-256 of its id (:func:`session_key`), never by the id, as the store does. Only the
  value's holder (the session that made it) can read it; nothing here logs a value, and a
  :class:`Secret`'s ``repr`` hides it.
- :class:`Submissions` remembers each form's one-time token (a hidden ``form_token`` field, a
  fresh one in every rendered form) per session and form (the action and its object): a second post of the same form (a double
  click, a resend) is answered with where the first one went, after waiting for it if it is
  still running, instead of doing it twice. A first post that failed is forgotten, so the same
  form may be sent again; a post without a token is simply done.

Both are bounded (``max_entries``; past it the oldest go) and live in this process's memory
only: with ``serve --workers N`` or several instances, a GET that reaches another process (a
browser that opened a new connection for it) finds no value, and the page says the value was
shown once and how to get a new one, the same as a reload. Single-threaded: event loop only.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from fleetgate.errors import Unavailable

TTL_S = 300.0
MAX_ENTRIES = 1000
MAX_TOKEN = 64  # a longer form_token is not one of ours: the form is done without the check
WAIT_S = 30.0  # how long a repeated post waits for the first one's answer


def session_key(session_id: str | None) -> str:
    """The name of a session in these maps: its id's SHA-256 (the id itself is not kept)."""
    return hashlib.sha256((session_id or "").encode()).hexdigest()


def new_form_token() -> str:
    return secrets.token_urlsafe(16)


@dataclass(frozen=True, slots=True)
class Secret:
    """A value to show once; ``repr`` never shows it (a log line or a traceback might)."""

    value: str = field(repr=False)


K = TypeVar("K")
V = TypeVar("V")


class _Expiring(Generic[K, V]):
    """An insertion-ordered map whose entries go after ``ttl_s`` or past ``max_entries``."""

    def __init__(self, ttl_s: float, max_entries: int, clock: Callable[[], float]) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.clock = clock
        self._items: OrderedDict[K, tuple[float, V]] = OrderedDict()

    def _expire(self, now: float) -> None:
        # Entries are in the order they were put, each with the same TTL: the stale are first.
        while self._items:
            born, _ = next(iter(self._items.values()))
            if now - born < self.ttl_s:
                break
            self._items.popitem(last=False)

    def put(self, key: K, value: V) -> None:
        now = self.clock()
        self._expire(now)
        self._items.pop(key, None)
        self._items[key] = (now, value)
        while len(self._items) > self.max_entries:
            self._items.popitem(last=False)

    def get(self, key: K) -> V | None:
        self._expire(self.clock())
        entry = self._items.get(key)
        return None if entry is None else entry[1]

    def pop(self, key: K) -> V | None:
        self._expire(self.clock())
        entry = self._items.pop(key, None)
        return None if entry is None else entry[1]

    def drop_where(self, pred: Callable[[K], bool]) -> None:
        for key in [k for k in self._items if pred(k)]:
            del self._items[key]

    def __len__(self) -> int:
        return len(self._items)


class Flash:
    """New key values waiting for the GET that shows them, one per (session, key id)."""

    def __init__(self, *, ttl_s: float = TTL_S, max_entries: int = MAX_ENTRIES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._slots: _Expiring[tuple[str, int], Secret] = _Expiring(ttl_s, max_entries, clock)

    def put(self, session: str, key_id: int, value: str) -> None:
        self._slots.put((session, key_id), Secret(value))

    def take(self, session: str, key_id: int) -> str | None:
        """The value, once: a second call (a reload) gets ``None``, as does another session."""
        s = self._slots.pop((session, key_id))
        return None if s is None else s.value

    def drop(self, session: str) -> None:
        """Forget a session's values (it signed out)."""
        self._slots.drop_where(lambda k: k[0] == session)

    def __len__(self) -> int:
        return len(self._slots)


class Submissions:
    """Forms already posted, by (session, form, token): the answer of the first post is reused."""

    def __init__(self, *, ttl_s: float = TTL_S, max_entries: int = MAX_ENTRIES,
                 wait_s: float = WAIT_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.wait_s = wait_s
        self._posts: _Expiring[tuple[str, str, str], asyncio.Future[str | None]] = _Expiring(
            ttl_s, max_entries, clock)

    async def once(self, session: str, form: str, token: str,
                   work: Callable[[], Awaitable[str]]) -> str:
        """Where to send the browser: ``work()``'s answer, or the first post's of this form.

        ``form`` names what the form does (``create``, ``rotate 7``), so a token sent back
        with another action or key is another form.

        A first post that raised is forgotten, so a post that waited for it, or the same form
        sent again later, is done as a first post (and fails the same way if it must).
        """
        if not token or len(token) > MAX_TOKEN:
            return await work()
        key = (session, form, token)
        first = self._posts.get(key)
        while first is not None:
            try:
                done = await asyncio.wait_for(asyncio.shield(first), self.wait_s)
            except TimeoutError:
                raise Unavailable("This form is still being handled; reload the page in a "
                                  "moment.", code="form_pending") from None
            if done is not None:
                return done
            # That one failed; another waiter may have claimed the token again since.
            first = self._posts.get(key)
        # Claimed before the next await: a second post can't slip in between check and claim.
        mine: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._posts.put(key, mine)
        try:
            location = await work()
        except BaseException:
            if self._posts.get(key) is mine:
                self._posts.pop(key)
            mine.set_result(None)
            raise
        mine.set_result(location)
        return location

    def __len__(self) -> int:
        return len(self._posts)

