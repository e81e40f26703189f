"""The authenticator: modes, caching, and failing closed when the store can't be read."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from sqlalchemy import text

from fleetgate import config
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
    real_poll = a._poll
    delay = {"s": 0.4}

    def slow(*args):
        _time.sleep(delay["s"])
        return real_poll(*args)

    monkeypatch.setattr(a, "_poll", slow)
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
