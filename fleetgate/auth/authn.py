"""Authentication: from an ``Authorization`` header to a :class:`Principal`.

The request path calls :meth:`Authenticator.authenticate`. In ``keys`` mode every active key is
held in memory: the control plane loads them all at start-up and again every
``auth.cache_ttl_s``, so a request never waits on the store for a key that existed then. Only a
key created since the last load is looked up, once, in a worker thread. A control-plane task
(:meth:`Authenticator.run_refresher`) polls the store for changed keys every
``auth.revocation_poll_s`` and evicts them, so a revocation takes effect within about that long.
If that poll keeps failing, the store is treated as unreadable and every request is refused
(fail closed) until it succeeds again. ``last used`` times are collected in memory and written in
batches by the same task, never inline.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hmac
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

from sqlalchemy import Engine

from fleetgate.auth import keys
from fleetgate.auth.principals import ANONYMOUS, Principal
from fleetgate.config import AuthSettings
from fleetgate.errors import AuthError, StoreUnavailable
from fleetgate.store import repo

log = logging.getLogger("fleetgate.auth")


@dataclass(slots=True)
class _Entry:
    principal: Principal
    expires_at: float | None  # epoch seconds
    cached_at: float
    touched: float = 0.0  # when ``last used`` was last queued for this key


# ``last used`` is kept to the minute: a busy key costs one UPDATE a minute, not one a request.
LAST_USED_RESOLUTION_S = 60.0


def bearer_token(header: bytes | None) -> str:
    """The token from ``Authorization: Bearer <token>``; the scheme is case-insensitive."""
    if not header:
        raise AuthError(
            "Missing API key. Send it as 'Authorization: Bearer <key>'.", code="missing_api_key"
        )
    try:
        text = header.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
        text = ""
    scheme, _, token = text.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        raise AuthError(
            "Malformed Authorization header. Send it as 'Authorization: Bearer <key>'.",
            code="invalid_api_key",
        )
    return token


def _invalid(token: str) -> AuthError:
    shown = keys.display_prefix(token) if token.startswith(keys.KEY_PREFIX) else None
    where = f" (key starting '{shown}')" if shown else ""
    return AuthError(f"Incorrect API key provided{where}.", code="invalid_api_key")


class Authenticator:
    def __init__(self, settings: AuthSettings, engine: Engine | None) -> None:
        self.settings = settings
        self.engine = engine
        self._cache: dict[str, _Entry] = {}
        self._negative: OrderedDict[str, float] = OrderedDict()
        self._static = [keys.digest(t).encode() for t in settings.tokens]
        self._static_admin = [keys.digest(t).encode() for t in settings.admin_tokens]
        self._last_used: dict[int, dt.datetime] = {}
        self._failing_since: float | None = None  # first failure of the current streak
        self._poll_started: float | None = None  # the poll in flight, if any
        self._poll_since = repo.utcnow()
        self._loaded_at = -float("inf")
        # Failing polls for this long, or one poll hanging for hang_after, and the store counts
        # as unreadable. A poll that is merely slow (the machine is saturated) doesn't count.
        self._stale_after = max(5.0, 5 * settings.revocation_poll_s)
        self._hang_after = max(30.0, 10 * settings.revocation_poll_s)

    # -- request path -------------------------------------------------------------------------

    def store_readable(self) -> bool:
        if self.settings.mode != "keys":
            return True
        now = time.monotonic()
        if self._failing_since is not None and now - self._failing_since > self._stale_after:
            return False
        return self._poll_started is None or now - self._poll_started <= self._hang_after

    async def authenticate(self, header: bytes | None) -> Principal:
        mode = self.settings.mode
        if mode == "none":
            return ANONYMOUS
        token = bearer_token(header)
        if mode == "static":
            d = keys.digest(token).encode()
            user = admin = False
            for s in self._static:  # no early exit: constant time over the token lists
                user |= hmac.compare_digest(d, s)
            for s in self._static_admin:
                admin |= hmac.compare_digest(d, s)
            if admin:
                return Principal(name="static-admin-token", admin=True)
            if not user:
                raise _invalid(token)
            return Principal(name="static-token")
        return await self._from_store(token)

    async def _from_store(self, token: str) -> Principal:
        if not self.store_readable():
            raise StoreUnavailable("The key store can't be read; refusing requests.", retry_after=5)
        if not keys.well_formed(token):
            raise _invalid(token)
        d = keys.digest(token)
        now = time.time()
        entry = self._cache.get(d)
        # The whole cache is reloaded every cache_ttl_s; an entry twice that old missed a reload.
        if entry is None or now - entry.cached_at > 2 * self.settings.cache_ttl_s:
            if d in self._negative and now - self._negative[d] < self.settings.cache_ttl_s:
                raise _invalid(token)
            entry = await self._load(d, token, now)
        if entry.expires_at is not None and now >= entry.expires_at:
            raise AuthError(
                f"API key '{keys.display_prefix(token)}' has expired.", code="expired_api_key"
            )
        p = entry.principal
        if p.key_id is not None and now - entry.touched >= LAST_USED_RESOLUTION_S:
            entry.touched = now
            self._last_used[p.key_id] = dt.datetime.fromtimestamp(now, dt.UTC).replace(tzinfo=None)
        return p

    @staticmethod
    def _entry(rec: repo.KeyRecord, now: float) -> _Entry:
        exp = rec.expires_at.replace(tzinfo=dt.UTC).timestamp() if rec.expires_at else None
        principal = Principal(
            name=rec.name,
            key_id=rec.id,
            key_prefix=rec.prefix,
            models=frozenset(rec.models) if rec.models is not None else None,
            admin=rec.admin,
        )
        return _Entry(principal, exp, now)

    async def reload(self) -> int:
        """Replace the cache with every active key in the store. Returns how many."""
        assert self.engine is not None
        started = repo.utcnow()
        records = await asyncio.to_thread(repo.active_keys, self.engine)
        now = time.time()
        self._cache = {r.digest: self._entry(r, now) for r in records}
        self._negative.clear()
        self._loaded_at = time.monotonic()
        # Changes after the query started are still seen by the next poll.
        self._poll_since = min(self._poll_since, started)
        return len(records)

    async def _load(self, d: str, token: str, now: float) -> _Entry:
        assert self.engine is not None
        try:
            rec = await asyncio.to_thread(repo.get_key_by_digest, self.engine, d)
        except Exception as e:  # the store is down: fail closed
            log.warning("key store lookup failed: %s", type(e).__name__)
            raise StoreUnavailable(
                "The key store can't be read; refusing requests.", retry_after=5
            ) from None
        if rec is None or not hmac.compare_digest(rec.digest, d) or rec.revoked_at is not None:
            self._remember_invalid(d, now)
            self._cache.pop(d, None)
            raise _invalid(token)
        entry = self._entry(rec, now)
        self._cache[d] = entry
        return entry

    def _remember_invalid(self, d: str, now: float) -> None:
        limit = self.settings.negative_cache_size
        if limit <= 0:
            return
        self._negative[d] = now
        self._negative.move_to_end(d)
        while len(self._negative) > limit:
            self._negative.popitem(last=False)

    # -- control plane ------------------------------------------------------------------------

    def _poll(self, since: dt.datetime, last_used: dict[int, dt.datetime]) -> list[str]:
        """Blocking store work for one refresh: runs in a worker thread, touches no shared state."""
        assert self.engine is not None
        changed = repo.digests_changed_since(self.engine, since)
        repo.touch_last_used(self.engine, last_used)
        return changed

    async def poll_once(self) -> None:
        """Evict keys changed in the store and write pending ``last used`` times."""
        # Overlap the window a little: a clock tick or a slow commit must not hide a revocation.
        since = self._poll_since - dt.timedelta(seconds=2)
        started = repo.utcnow()
        pending, self._last_used = self._last_used, {}
        try:
            changed = await asyncio.to_thread(self._poll, since, pending)
        except BaseException:
            for k, v in pending.items():  # keep them for the next round
                self._last_used.setdefault(k, v)
            raise
        for d in changed:
            self._cache.pop(d, None)
            self._negative.pop(d, None)
        self._poll_since = started

    async def run_refresher(self) -> None:
        if self.settings.mode != "keys":
            return
        failures = 0
        while True:
            self._poll_started = time.monotonic()
            try:
                if self._poll_started - self._loaded_at >= self.settings.cache_ttl_s:
                    await self.reload()
                await self.poll_once()
                if failures:
                    log.info("key store readable again")
                failures = 0
                self._failing_since = None
            except Exception as e:
                failures += 1
                if self._failing_since is None:
                    self._failing_since = self._poll_started
                if failures == 1 or failures % 60 == 0:
                    log.warning(
                        "key store poll failed (%d in a row): %s", failures, type(e).__name__
                    )
            finally:
                self._poll_started = None
            await asyncio.sleep(self.settings.revocation_poll_s)

    async def flush(self) -> None:
        if self.settings.mode == "keys" and self.engine is not None:
            try:
                await self.poll_once()
            except Exception as e:
                log.warning("final last-used flush failed: %s", type(e).__name__)
