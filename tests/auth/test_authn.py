"""The authenticator: modes, caching, and failing closed when the store can't be read."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from sqlalchemy import text

from fleetgate import config
from fleetgate.auth import authn as authn_mod
from fleetgate.auth import keys
from fleetgate.auth.authn import Authenticator
from fleetgate.errors import AuthError, StoreUnavailable
from fleetgate.store import repo
from fleetgate.store.db import migrate, open_engine


@pytest.fixture
def engine(tmp_path: Path):
    e = open_engine(f"sqlite:///{tmp_path / 'k.db'}")
    migrate(e)
    return e


def add_key(engine, **kw) -> str:
    k = keys.generate()
    repo.insert_key(engine, name=kw.get("name", "k"), prefix=keys.display_prefix(k),
                    digest=keys.digest(k), models=kw.get("models"), expires_at=None)
    return k


def auth(mode="keys", **kw) -> config.AuthSettings:
    return config.AuthSettings(mode=mode, **kw)


async def test_static_mode_accepts_each_listed_token_with_a_stable_identity_of_its_own():
    tokens = ("t" * 20, "u" * 20, "w" * 20)
    a = Authenticator(auth("static", tokens=tokens), None)
    seen = set()
    for t in tokens:
        p = await a.authenticate(f"Bearer {t}".encode())
        assert p.name == p.user == f"static-{keys.digest(t)[:8]}"
        assert not p.admin and p.allows("anything")
        assert p == await a.authenticate(f"Bearer {t}".encode())  # stable
        seen.add(p.user)
    assert len(seen) == 3
    # a fresh authenticator (a restart) gives the same identities
    b = Authenticator(auth("static", tokens=tokens), None)
    assert (await b.authenticate(b"Bearer " + b"u" * 20)).user in seen
    with pytest.raises(AuthError):
        await a.authenticate(b"Bearer " + b"v" * 20)
    with pytest.raises(AuthError):
        await a.authenticate(None)


async def test_none_mode_lets_everyone_in_as_anonymous():
    a = Authenticator(auth("none"), None)
    p = await a.authenticate(None)
    assert p.name == "anonymous" and p.allows("anything")


async def test_keys_mode_caches_after_first_lookup(engine, monkeypatch):
    k = add_key(engine, models=["a"])
    a = Authenticator(auth(), engine)
    p = await a.authenticate(f"Bearer {k}".encode())
    assert p.allows("a") and not p.allows("b")
    calls = []
    monkeypatch.setattr(repo, "grant_by_digest", lambda *x: calls.append(x))
    for _ in range(5):
        await a.authenticate(f"Bearer {k}".encode())
    assert calls == []


async def test_unknown_keys_are_negatively_cached_and_bounded(engine, monkeypatch):
    a = Authenticator(auth(negative_cache_size=3), engine)
    bad = [keys.generate() for _ in range(5)]
    for b in bad:
        with pytest.raises(AuthError):
            await a.authenticate(f"Bearer {b}".encode())
    assert len(a._negative) == 3


async def test_store_failure_on_lookup_fails_closed(engine):
    k = add_key(engine)
    a = Authenticator(auth(), engine)
    with engine.begin() as c:
        c.execute(text("DROP TABLE usage_events"))
        c.execute(text("DROP TABLE api_keys"))
    with pytest.raises(StoreUnavailable) as e:
        await a.authenticate(f"Bearer {k}".encode())
    assert e.value.status == 503 and "retry-after" in e.value.headers


async def test_stale_store_refuses_even_cached_keys(engine):
    k = add_key(engine)
    a = Authenticator(auth(revocation_poll_s=0.05, store_stale_after_s=0.3), engine)
    await a.authenticate(f"Bearer {k}".encode())
    with engine.begin() as c:
        c.execute(text("DROP TABLE usage_events"))
        c.execute(text("DROP TABLE api_keys"))
    task = asyncio.create_task(a.run_refresher())
    try:
        await asyncio.sleep(0.6)
        assert not a.store_readable()
        with pytest.raises(StoreUnavailable):
            await a.authenticate(f"Bearer {k}".encode())
    finally:
        task.cancel()


async def test_last_used_is_written_by_the_poll_not_inline(engine):
    k = add_key(engine)
    a = Authenticator(auth(), engine)
    await a.authenticate(f"Bearer {k}".encode())
    assert repo.list_keys(engine)[0].last_used_at is None
    await a.poll_once()
    assert repo.list_keys(engine)[0].last_used_at is not None


async def test_reload_holds_every_active_key_so_requests_never_touch_the_store(engine, monkeypatch):
    ks = [add_key(engine) for _ in range(50)]
    revoked = add_key(engine)
    rec = repo.get_key_by_digest(engine, keys.digest(revoked))
    repo.revoke_key(engine, rec.id)
    a = Authenticator(auth(), engine)
    assert await a.reload() == 50
    monkeypatch.setattr(repo, "grant_by_digest", lambda *x: pytest.fail("store was queried"))
    for k in ks:
        await a.authenticate(f"Bearer {k}".encode())
    monkeypatch.undo()
    with pytest.raises(AuthError):
        await a.authenticate(f"Bearer {revoked}".encode())


async def test_a_key_created_after_the_load_is_found(engine):
    a = Authenticator(auth(), engine)
    await a.reload()
    k = add_key(engine)
    assert (await a.authenticate(f"Bearer {k}".encode())).name == "k"


async def test_last_used_for_many_keys_is_one_batch(engine):
    ks = [add_key(engine) for _ in range(20)]
    a = Authenticator(auth(), engine)
    for k in ks:
        await a.authenticate(f"Bearer {k}".encode())
    await a.poll_once()
    assert all(r.last_used_at is not None for r in repo.list_keys(engine))


async def test_a_slow_poll_is_not_a_failure_but_a_hung_one_is(engine, monkeypatch):
    import time as _time

    k = add_key(engine)
    a = Authenticator(
        auth(revocation_poll_s=0.05, store_stale_after_s=0.1, store_hang_after_s=1.0), engine
    )
    await a.authenticate(f"Bearer {k}".encode())
    real_poll = repo.changed_since  # the poll's first store read, in its worker thread
    delay = {"s": 0.4}

    def slow(*args):
        _time.sleep(delay["s"])
        return real_poll(*args)

    monkeypatch.setattr(repo, "changed_since", slow)
    task = asyncio.create_task(a.run_refresher())
    try:
        await asyncio.sleep(0.6)  # slower than stale_after, but succeeding: still readable
        assert a.store_readable()
        await a.authenticate(f"Bearer {k}".encode())
        delay["s"] = 3.0
        await asyncio.sleep(1.8)  # one poll now hangs past hang_after: fail closed
        assert not a.store_readable()
        with pytest.raises(StoreUnavailable):
            await a.authenticate(f"Bearer {k}".encode())
    finally:
        task.cancel()
        delay["s"] = 0


async def test_static_admin_tokens_are_admin_and_plain_ones_are_not():
    a = Authenticator(auth("static", tokens=("u" * 20,), admin_tokens=("a" * 20,)), None)
    assert (await a.authenticate(b"Bearer " + b"a" * 20)).admin
    assert not (await a.authenticate(b"Bearer " + b"u" * 20)).admin
    with pytest.raises(AuthError):
        await a.authenticate(b"Bearer " + b"b" * 20)


# -- cached: the express path's look-up, which never waits and never lets in more ----------------


async def test_cached_finds_only_a_key_already_held_and_valid(engine, monkeypatch):
    k = add_key(engine)
    a = Authenticator(auth(), engine)
    h = f"Bearer {k}".encode()
    assert a.cached(h) is None  # not loaded yet: authenticate loads it (and may wait)
    p = await a.authenticate(h)
    assert a.cached(h) is p
    assert a.cached(None) is None and a.cached(b"") is None
    other = add_key(engine, name="other")
    assert a.cached(f"Bearer {other}".encode()) is None  # in the store, not in the cache
    # An entry past twice the cache's time to live missed its reloads: not trusted.

    now = authn_mod.time.time()
    monkeypatch.setattr(authn_mod.time, "time", lambda: now + 2 * a.settings.cache_ttl_s + 1)
    assert a.cached(h) is None


async def _warm(engine):
    """An authenticator whose cache holds one key: it, the key's header, and the cache entry."""
    a = Authenticator(auth(), engine)
    h = f"Bearer {add_key(engine)}".encode()
    await a.authenticate(h)
    return a, h, next(iter(a._cache.values()))


async def test_cached_refuses_an_expired_key_and_an_unreadable_store(engine, monkeypatch):
    a, h, entry = await _warm(engine)
    monkeypatch.setattr(entry, "expires_at", 0.0)
    assert a.cached(h) is None
    with pytest.raises(AuthError):
        await a.authenticate(h)
    monkeypatch.setattr(entry, "expires_at", None)
    assert a.cached(h) is not None
    # The store failing for longer than store_stale_after_s: unreadable.
    monkeypatch.setattr(a, "_failing_since", authn_mod.clock.monotonic() - a._stale_after - 1)
    assert not a.store_readable()
    assert a.cached(h) is None  # fails closed, as authenticate does (503)


async def test_cached_at_the_exact_edges_of_expiry_and_staleness(engine, monkeypatch):

    a, h, entry = await _warm(engine)
    at = entry.cached_at + 2 * a.settings.cache_ttl_s  # the last instant the entry is trusted
    monkeypatch.setattr(authn_mod.time, "time", lambda: at)
    assert a.cached(h) is not None
    monkeypatch.setattr(entry, "expires_at", at)  # expired from its expiry instant on
    assert a.cached(h) is None
    with pytest.raises(AuthError):
        await a.authenticate(h)


async def test_cached_is_for_key_mode_only():
    token = "sk-static-token-1234567890"
    for a in (Authenticator(auth("static", tokens=[token]), None),
              Authenticator(auth("none"), None)):
        assert a.cached(f"Bearer {token}".encode()) is None


async def test_whatever_cached_lets_in_authenticate_lets_in_as_the_same_caller(engine):
    k = add_key(engine)
    a = Authenticator(auth(), engine)
    await a.authenticate(f"Bearer {k}".encode())
    variants = [
        f"Bearer {k}", f"bearer {k}", f"BEARER {k}", f"Bearer  {k}", f"Bearer {k} ",
        f" Bearer {k}", f"Bearer\t{k}", f"Bearer {k}x", f"Bearer {k[:-1]}", f"Bearer {k} {k}",
        f"Basic {k}", f"Digest {k}", k, f"Bearer {k}\x00", f"Bearer {k.upper()}", "Bearer ",
    ]
    for v in variants:
        h = v.encode("latin-1")
        got = a.cached(h)
        if got is None:
            continue  # left to authenticate, which decides (and may refuse)
        assert await a.authenticate(h) is got, v
    assert a.cached(f"Bearer {k}".encode()) is not None
