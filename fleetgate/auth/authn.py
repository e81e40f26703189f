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

A key's :class:`Principal` (its user, role, groups and effective model access, compiled) is built
when the key is loaded into the cache, never per request. Anything that changes what a key may do
(revocation, rotation, disabling its user, a change to the user's or a group's model list) bumps
the key's ``updated_at`` in the store, so it reaches the cache through the same poll. During a
rotation's overlap both the new and the old value are cached and resolve to the same key id; the
old value's entry expires when the overlap ends. A disabled user's keys are refused like revoked
ones.

The principal's admission fields are built at the same time, from the store (:func:`admission`):
``limits`` for ``Subject("user", name)``, each ``Subject("group", name)`` and
``Subject("key", str(id))`` (the id, so a rotation keeps the key's counters), ``quotas`` for the
user and groups, ``weight`` (the highest of the groups' weights, 1 without a group) and
``networks`` (the user's and the key's allow-lists; both apply). A stored value that no longer
parses fails closed: the key is refused from every address, and the log says why.

In ``static`` mode each token gets a stable identity of its own: user and name
``static-<8 hex of the token's digest>``, role ``admin`` for ``auth.admin_tokens``. Every token
is compared, without an early exit, so the time taken doesn't say which one matched.
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

from fleetgate.auth import access, keys
from fleetgate.auth.networks import NetworkPolicy
from fleetgate.auth.principals import ANONYMOUS, Principal, SubjectLimits, SubjectQuotas
from fleetgate.clock import Clock
from fleetgate.config import AuthSettings
from fleetgate.errors import AuthError, StoreUnavailable
from fleetgate.limits.spec import Limits, Quota, Subject
from fleetgate.store import repo

log = logging.getLogger("fleetgate.auth")

# The clocks this module reads (``time()`` for expiry, ``monotonic()`` for the store's health);
# tests move them (see fleetgate/clock.py).
clock: Clock = time


@dataclass(slots=True)
class _Entry:
    principal: Principal
    expires_at: float | None  # epoch seconds
    cached_at: float
    version: dt.datetime | None = None  # the key row's updated_at when read
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


def readable(
    now: float, failing_since: float | None, poll_started: float | None, stale_after: float,
    hang_after: float,
) -> bool:
    """Whether the key store counts as readable (pure; times are ``clock.monotonic()``)."""
    if failing_since is not None and now - failing_since > stale_after:
        return False
    return poll_started is None or now - poll_started <= hang_after


def _epoch(t: dt.datetime | None) -> float | None:
    return t.replace(tzinfo=dt.UTC).timestamp() if t is not None else None


# A policy no address satisfies: one list, empty.
_NOWHERE = NetworkPolicy(((),))


def admission(g: repo.KeyGrant) -> tuple[SubjectLimits, SubjectQuotas, float, NetworkPolicy]:
    """The limits, quotas, fair-share weight and network policy of one key (pure)."""
    limits: list[tuple[Subject, Limits]] = []
    quotas: list[tuple[Subject, Quota]] = []
    try:
        owners: list[tuple[Subject, dict[str, int] | None, tuple[int, str] | None]] = [
            (Subject("user", g.user), g.user_limits, g.user_quota)]
        owners += [(Subject("group", ga.name), ga.limits, ga.quota) for ga in g.group_admission]
        owners.append((Subject("key", str(g.key.id)), g.key.limits, None))
        for subject, lim, quota in owners:
            if lim:
                limits.append((subject, Limits(**lim)))
            if quota is not None:
                quotas.append((subject, Quota(quota[0], quota[1])))  # type: ignore[arg-type]
        networks = NetworkPolicy.of(g.user_allow_ips, g.key.allow_ips)
    except (TypeError, ValueError) as e:
        log.warning("key %d has unreadable limits or allow-lists in the store (%s); refusing it "
                    "from every address", g.key.id, e)
        return (), (), 1.0, _NOWHERE
    weight = max((ga.weight for ga in g.group_admission), default=1.0)
    return tuple(limits), tuple(quotas), weight, networks


def _static_principal(token: str, role: str) -> tuple[bytes, Principal]:
    d = keys.digest(token)
    who = f"static-{d[:8]}"
    return d.encode(), Principal(name=who, user=who, role=role)


def _invalid(token: str) -> AuthError:
    # Only a well-formed key's display prefix is shown: of a short or foreign secret, even a
    # prefix could be most of it.
    shown = keys.display_prefix(token) if keys.well_formed(token) else None
    where = f" (key starting '{shown}')" if shown else ""
    return AuthError(f"Incorrect API key provided{where}.", code="invalid_api_key")


class Authenticator:
    def __init__(self, settings: AuthSettings, engine: Engine | None) -> None:
        self.settings = settings
        self.engine = engine
        self._cache: dict[str, _Entry] = {}
        self._negative: OrderedDict[str, float] = OrderedDict()
        self._static = [_static_principal(t, "user") for t in settings.tokens] + [
            _static_principal(t, "admin") for t in settings.admin_tokens
        ]
        self._last_used: dict[int, dt.datetime] = {}
        self._failing_since: float | None = None  # first failure of the current streak
        self._poll_started: float | None = None  # the poll in flight, if any
        self._poll_since = repo.utcnow()
        self._loaded_at = -float("inf")
        # Failing polls for this long, or one poll hanging for hang_after, and the store counts
        # as unreadable. A poll that is merely slow (the machine is saturated) doesn't count.
        poll = settings.revocation_poll_s
        self._stale_after = settings.store_stale_after_s or max(5.0, 5 * poll)
        self._hang_after = settings.store_hang_after_s or max(30.0, 10 * poll)

    # -- request path -------------------------------------------------------------------------

    @property
    def stale_after_s(self) -> float:
        """Polls failing for longer than this and the store counts as unreadable."""
        return self._stale_after

    @property
    def hang_after_s(self) -> float:
        """One poll running for longer than this and the store counts as unreadable."""
        return self._hang_after

    def store_readable(self) -> bool:
        if self.settings.mode != "keys":
            return True
        return readable(
            clock.monotonic(), self._failing_since, self._poll_started, self._stale_after,
            self._hang_after,
        )

    async def authenticate(self, header: bytes | None) -> Principal:
        mode = self.settings.mode
        if mode == "none":
            return ANONYMOUS
        token = bearer_token(header)
        if mode == "static":
            d = keys.digest(token).encode()
            found: Principal | None = None
            for s_digest, principal in self._static:  # no early exit: constant time over tokens
                if hmac.compare_digest(d, s_digest):
                    found = principal
            if found is None:
                raise _invalid(token)
            return found
        return await self._from_store(token)

    def cached(self, header: bytes | None) -> Principal | None:
        """The caller of a request whose key is in the cache, fresh and valid, without waiting;
        None for anything else (no key, a key to load, refused): :meth:`authenticate` decides
        those."""
        if self.settings.mode != "keys" or not header or header[:7] != b"Bearer ":
            return None
        token = header[7:].decode("latin-1")
        if not keys.well_formed(token) or not self.store_readable():
            return None
        now = clock.time()
        entry = self._cache.get(keys.digest(token))
        if entry is None or now - entry.cached_at > 2 * self.settings.cache_ttl_s:
            return None
        if entry.expires_at is not None and now >= entry.expires_at:
            return None
        return self._touch(entry, now)

    async def _from_store(self, token: str) -> Principal:
        if not self.store_readable():
            raise StoreUnavailable("The key store can't be read; refusing requests.", retry_after=5)
        if not keys.well_formed(token):
            raise _invalid(token)
        d = keys.digest(token)
        now = clock.time()
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
        return self._touch(entry, now)

    def _touch(self, entry: _Entry, now: float) -> Principal:
        p = entry.principal
        if p.key_id is not None and now - entry.touched >= LAST_USED_RESOLUTION_S:
            entry.touched = now
            self._last_used[p.key_id] = dt.datetime.fromtimestamp(now, dt.UTC).replace(tzinfo=None)
        return p

    @staticmethod
    def _entries(g: repo.KeyGrant, now: float) -> dict[str, _Entry]:
        """The cache entries of one key: its value, and its old value while rotating."""
        rec = g.key
        limits, quotas, weight, networks = admission(g)
        principal = Principal(
            name=rec.name,
            key_id=rec.id,
            key_prefix=rec.prefix,
            user=g.user,
            user_id=g.user_id,
            role=g.role,
            groups=tuple(name for name, _ in g.groups),
            access=access.effective(
                g.user, g.role, [models for _, models in g.groups], g.user_models, rec.models
            ),
            limits=limits,
            quotas=quotas,
            weight=weight,
            networks=networks,
        )
        exp = _epoch(rec.expires_at)
        out = {rec.digest: _Entry(principal, exp, now, rec.updated_at)}
        prev, until = rec.previous_digest, _epoch(rec.previous_valid_until)
        if prev is not None and until is not None and now < until:
            # The old value stops when the overlap ends (or the key expires, if that is sooner).
            out[prev] = _Entry(principal, until if exp is None else min(exp, until), now,
                               rec.updated_at)
        return out

    async def reload(self) -> int:
        """Replace the cache with every active key in the store. Returns how many."""
        assert self.engine is not None
        started = repo.utcnow()
        records = await asyncio.to_thread(repo.active_grants, self.engine)
        now = clock.time()
        cache: dict[str, _Entry] = {}
        for g in records:
            cache.update(self._entries(g, now))
        self._cache = cache
        self._negative.clear()
        self._loaded_at = clock.monotonic()
        # Changes after the query started are still seen by the next poll.
        self._poll_since = min(self._poll_since, started)
        return len(records)

    async def _load(self, d: str, token: str, now: float) -> _Entry:
        assert self.engine is not None
        try:
            rec = await asyncio.to_thread(repo.grant_by_digest, self.engine, d)
        except Exception as e:  # the store is down: fail closed
            log.warning("key store lookup failed: %s", type(e).__name__)
            raise StoreUnavailable(
                "The key store can't be read; refusing requests.", retry_after=5
            ) from None
        entries = self._entries(rec, now) if rec is not None else {}
        entry = entries.get(d)
        if (
            rec is None
            or entry is None
            or rec.key.revoked_at is not None
            or not rec.user_enabled
        ):  # unknown, revoked, the user disabled, or an old value whose overlap has ended
            self._remember_invalid(d, now)
            self._cache.pop(d, None)
            raise _invalid(token)
        self._cache.update(entries)
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

    def _poll(
        self, since: dt.datetime, last_used: dict[int, dt.datetime]
    ) -> list[repo.Change]:
        """Blocking store work for one refresh: runs in a worker thread, touches no shared state."""
        assert self.engine is not None
        changed = repo.changed_since(self.engine, since)
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
        # The window overlaps the last one, so a change comes again in the next polls: a cached
        # entry read at that change's version (or later) is current and stays, or every poll in
        # the overlap would evict it again and its next request would read the store. An entry
        # is found by its key id, so a rotation's old value (and an earlier one) goes too.
        if changed:
            newest: dict[int | None, dt.datetime] = {}
            for key_id, d, prev, at in changed:
                if key_id not in newest or at > newest[key_id]:
                    newest[key_id] = at
                for x in (d, prev):
                    if x is not None:
                        self._negative.pop(x, None)
            stale = [x for x, e in self._cache.items()
                     if (newer := newest.get(e.principal.key_id)) is not None
                     and (e.version is None or e.version < newer)]
            for x in stale:
                del self._cache[x]
        self._poll_since = started

    async def run_refresher(self) -> None:
        if self.settings.mode != "keys":
            return
        failures = 0
        while True:
            self._poll_started = clock.monotonic()
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
