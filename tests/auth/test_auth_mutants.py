"""Who gets in, pinned down where the mutation run (``scripts/mutants.sh``) found the module tests
silent: error codes of every refusal, expiry and rotation against a controlled clock, the
negative cache, the control-plane refresher (reload, logging, recovery, the final flush), time
zones, and key digests of odd strings.

The clock is faked by swapping the ``time`` module that :mod:`fleetgate.auth.authn` reads, so
no test waits for an expiry; the refresher tests run for real, bounded in count and time.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from fleetgate import config
from fleetgate.auth import authn, keys
from fleetgate.auth.authn import Authenticator, bearer_token
from fleetgate.errors import AuthError, StoreUnavailable
from fleetgate.services import Context
from fleetgate.services import keys as K
from fleetgate.store import repo
from fleetgate.store.db import migrate, open_engine


@pytest.fixture
def ctx(tmp_path: Path) -> Context:
    settings = config.parse({
        "store": {"url": f"sqlite:///{tmp_path / 'k.db'}"},
        "models": [{"name": "demo", "backend": {"type": "static", "urls": ["http://127.0.0.1:9"]}}],
    })
    e = open_engine(settings.store.url)
    migrate(e)
    return Context(e, settings)


class Clock:
    """Wall clock and monotonic clock, moved together by hand."""

    def __init__(self) -> None:
        self.wall = time.time()
        self.mono = 1000.0

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(authn, "clock", SimpleNamespace(time=lambda: c.wall,
                                                        monotonic=lambda: c.mono))
    return c


def authn_for(ctx: Context, **kw: object) -> Authenticator:
    return Authenticator(config.AuthSettings(mode="keys", **kw), ctx.engine)


def hdr(k: str) -> bytes:
    return f"Bearer {k}".encode()


def count_lookups(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every store lookup of a single key (the request path's only store access)."""
    calls: list[str] = []
    real = repo.grant_by_digest

    def counted(engine, digest):  # type: ignore[no-untyped-def]
        calls.append(digest)
        return real(engine, digest)

    monkeypatch.setattr(repo, "grant_by_digest", counted)
    return calls


# -- the header: which refusal is which --------------------------------------------------------


@pytest.mark.parametrize("value", [None, b""])
def test_no_key_at_all_is_missing_api_key(value: bytes | None) -> None:
    with pytest.raises(AuthError) as e:
        bearer_token(value)
    assert e.value.error_code == "missing_api_key" and e.value.status == 401
    assert "Bearer" in e.value.message  # says how to send one


@pytest.mark.parametrize("value", [b"Basic abc", b"Token abc", b"Bearer", b"Bearer a b"])
def test_a_malformed_header_is_invalid_api_key(value: bytes) -> None:
    with pytest.raises(AuthError) as e:
        bearer_token(value)
    assert e.value.error_code == "invalid_api_key" and e.value.message


async def test_unknown_and_malformed_keys_are_invalid_api_key_every_time(ctx: Context) -> None:
    a = authn_for(ctx)
    for token in (keys.generate(), "fg-short", "s" * 30):
        for _ in range(2):  # the second refusal comes from the negative cache
            with pytest.raises(AuthError) as e:
                await a.authenticate(hdr(token))
            assert e.value.error_code == "invalid_api_key"
            if not keys.well_formed(token):
                assert "key starting" not in e.value.message


def test_store_unavailable_says_when_to_retry() -> None:
    e = StoreUnavailable("The key store can't be read.", retry_after=5)
    assert e.status == 503 and e.error_code == "auth_store_unavailable"
    assert e.headers["retry-after"] == "5" and e.retry_after == 5


async def test_other_modes_never_report_the_store_unreadable() -> None:
    for mode, kw in (("none", {}), ("static", {"tokens": ("t" * 20,)})):
        a = Authenticator(config.AuthSettings(mode=mode, **kw), None)
        assert a.store_readable()


# -- expiry and rotation, against the clock ----------------------------------------------------


async def test_a_key_stops_at_its_expiry_without_any_poll(ctx: Context, clock: Clock) -> None:
    k, _ = K.create_key(ctx, name="k", expires=dt.timedelta(minutes=10))
    a = authn_for(ctx)
    assert await a.reload() == 1
    assert (await a.authenticate(hdr(k))).name == "k"
    clock.advance(9 * 60)
    await a.authenticate(hdr(k))
    clock.advance(61)
    with pytest.raises(AuthError) as e:
        await a.authenticate(hdr(k))
    assert e.value.error_code == "expired_api_key"
    assert keys.display_prefix(k) in e.value.message and k not in e.value.message


async def test_the_old_value_of_a_rotated_key_stops_when_the_key_expires_if_sooner(
    ctx: Context, clock: Clock
) -> None:
    old, rec = K.create_key(ctx, name="k", expires=dt.timedelta(minutes=10))
    new, _ = K.rotate_key(ctx, rec.id, overlap=dt.timedelta(hours=1))
    for loaded in (True, False):  # through the cache's reload, and a lookup on first use
        a = authn_for(ctx)
        if loaded:
            await a.reload()
        assert (await a.authenticate(hdr(old))).key_id == rec.id
        assert (await a.authenticate(hdr(new))).key_id == rec.id
    clock.advance(11 * 60)
    for v in (old, new):
        with pytest.raises(AuthError) as e:
            await a.authenticate(hdr(v))
        assert e.value.error_code == "expired_api_key"
    clock.advance(-11 * 60)


async def test_a_cache_entry_that_missed_two_reloads_is_looked_up_again(
    ctx: Context, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    k, rec = K.create_key(ctx, name="k")
    a = authn_for(ctx, cache_ttl_s=10)
    await a.reload()
    K.revoke_key(ctx, rec.id)  # no poll runs in this test
    clock.advance(15)
    await a.authenticate(hdr(k))  # still within two reloads: cached
    clock.advance(6)  # 21 s: missed two reloads, so the store is asked and says revoked
    with pytest.raises(AuthError):
        await a.authenticate(hdr(k))


async def test_unknown_keys_are_remembered_for_cache_ttl_then_asked_again(
    ctx: Context, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = authn_for(ctx, cache_ttl_s=10)
    calls = count_lookups(monkeypatch)
    bad = keys.generate()
    for _ in range(3):
        with pytest.raises(AuthError):
            await a.authenticate(hdr(bad))
    assert len(calls) == 1
    clock.advance(9.5)
    with pytest.raises(AuthError):
        await a.authenticate(hdr(bad))
    assert len(calls) == 1
    clock.advance(1)
    with pytest.raises(AuthError):
        await a.authenticate(hdr(bad))
    assert len(calls) == 2


# -- time zones: the store's times are UTC, whatever the machine's zone ------------------------


@pytest.fixture(params=["Asia/Tokyo", "America/Los_Angeles"])
def machine_zone(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("TZ", request.param)
    time.tzset()
    yield request.param
    monkeypatch.undo()
    time.tzset()


async def test_expiry_and_last_used_are_utc_in_any_machine_time_zone(
    ctx: Context, machine_zone: str
) -> None:
    live, _ = K.create_key(ctx, name="live", expires=dt.timedelta(hours=1))
    gone, rec = K.create_key(ctx, name="gone", expires=dt.timedelta(hours=1))
    with ctx.engine.begin() as c:  # it expired a minute ago
        c.execute(repo.api_keys.update().where(repo.api_keys.c.id == rec.id).values(
            expires_at=repo.utcnow() - dt.timedelta(minutes=1)))
    a = authn_for(ctx)
    await a.reload()
    await a.authenticate(hdr(live))
    with pytest.raises(AuthError):
        await a.authenticate(hdr(gone))
    await a.poll_once()
    used = {r.name: r.last_used_at for r in repo.list_keys(ctx.engine)}["live"]
    assert used is not None and abs(used - repo.utcnow()) < dt.timedelta(minutes=2)


# -- the refresher ------------------------------------------------------------------------------


async def wait_until(cond: Callable[[], bool], limit_s: float = 10.0) -> bool:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if cond():
            return True
        await asyncio.sleep(0.01)
    return cond()


@pytest.fixture
def breakable_store(monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """The change feed fails while ``broken`` is set, as a store that went away would."""
    state = SimpleNamespace(broken=False, polls=0)
    real = repo.changed_since

    def feed(engine, since):  # type: ignore[no-untyped-def]
        state.polls += 1
        if state.broken:
            raise OSError("store unreachable")
        return real(engine, since)

    monkeypatch.setattr(repo, "changed_since", feed)
    return state


async def test_the_refresher_loads_every_key_at_start(
    ctx: Context, monkeypatch: pytest.MonkeyPatch, breakable_store: SimpleNamespace
) -> None:
    k, rec = K.create_key(ctx, name="k")
    with ctx.engine.begin() as c:  # made an hour ago, so the change feed doesn't evict it
        c.execute(repo.api_keys.update().values(updated_at=repo.utcnow() - dt.timedelta(hours=1)))
    a = authn_for(ctx, revocation_poll_s=0.01)
    task = asyncio.create_task(a.run_refresher())
    try:
        assert await wait_until(lambda: breakable_store.polls >= 2)
        monkeypatch.setattr(repo, "grant_by_digest",
                            lambda *x: pytest.fail("a loaded key was looked up"))
        assert (await a.authenticate(hdr(k))).key_id == rec.id
    finally:
        task.cancel()


async def test_reloading_every_cache_ttl_keeps_a_healthy_store_readable(
    ctx: Context, breakable_store: SimpleNamespace
) -> None:
    k, _ = K.create_key(ctx, name="k")
    a = authn_for(ctx, revocation_poll_s=0.01, cache_ttl_s=0.03, store_stale_after_s=0.1)
    task = asyncio.create_task(a.run_refresher())
    try:
        # many reloads and polls later, healthy all along: never unreadable
        seen_unreadable = False
        deadline = time.monotonic() + 10
        while breakable_store.polls < 30 and time.monotonic() < deadline:
            seen_unreadable |= not a.store_readable()
            await asyncio.sleep(0.005)
        assert breakable_store.polls >= 30 and not seen_unreadable
        await a.authenticate(hdr(k))
    finally:
        task.cancel()


async def test_the_refresher_logs_the_first_failure_then_every_sixtieth_and_the_recovery(
    ctx: Context, breakable_store: SimpleNamespace, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fleetgate.auth")

    def lines(word: str) -> list[str]:
        return [r.getMessage() for r in caplog.records if word in r.getMessage()]

    a = authn_for(ctx, revocation_poll_s=0.002, store_stale_after_s=0.05)
    task = asyncio.create_task(a.run_refresher())
    try:
        assert await wait_until(lambda: breakable_store.polls >= 2)
        assert lines("failed") == [] and lines("readable again") == []
        breakable_store.broken = True
        assert await wait_until(lambda: len(lines("failed")) >= 2)
        assert ["(1 in a row)" in x for x in lines("failed")[:2]] == [True, False]
        assert "(60 in a row)" in lines("failed")[1]
        assert await wait_until(lambda: not a.store_readable())
        breakable_store.broken = False
        assert await wait_until(lambda: len(lines("readable again")) == 1)
        assert await wait_until(a.store_readable)
        # a new streak counts from one again
        breakable_store.broken = True
        assert await wait_until(lambda: len(lines("failed")) >= 3)
        assert "(1 in a row)" in lines("failed")[2]
    finally:
        task.cancel()
        breakable_store.broken = False


async def test_last_used_times_survive_a_failed_poll(
    ctx: Context, breakable_store: SimpleNamespace
) -> None:
    k, _ = K.create_key(ctx, name="k")
    a = authn_for(ctx)
    await a.authenticate(hdr(k))
    breakable_store.broken = True
    with pytest.raises(OSError):
        await a.poll_once()
    breakable_store.broken = False
    await a.poll_once()
    assert repo.list_keys(ctx.engine)[0].last_used_at is not None


async def test_the_final_flush_writes_last_used_and_never_raises(
    ctx: Context, breakable_store: SimpleNamespace
) -> None:
    k1, _ = K.create_key(ctx, name="k1")
    k2, _ = K.create_key(ctx, name="k2")
    a = authn_for(ctx)
    await a.authenticate(hdr(k1))
    await a.flush()
    assert {r.name: r.last_used_at is not None for r in repo.list_keys(ctx.engine)} == {
        "k1": True, "k2": False}
    await a.authenticate(hdr(k2))
    breakable_store.broken = True
    await a.flush()  # a store gone at shutdown is logged, not raised
    for mode in ("none", "static"):  # nothing to flush without a store
        kw = {"tokens": ("t" * 20,)} if mode == "static" else {}
        await Authenticator(config.AuthSettings(mode=mode, **kw), None).flush()


# -- keys and access -----------------------------------------------------------------------------


def test_digest_takes_any_string_the_config_can_hold() -> None:
    # ${ENV} interpolation can bring undecodable bytes in as lone surrogates.
    odd = "static-token-\udcff\udcfe"
    assert len(keys.digest(odd)) == 64 and keys.digest(odd) != keys.digest("static-token-")


@pytest.mark.parametrize(("text", "seconds"), [("1s", 1), ("1h", 3600), ("1d", 86400)])
def test_a_duration_of_one_unit_is_accepted(text: str, seconds: int) -> None:
    assert keys.parse_duration(text) == dt.timedelta(seconds=seconds)


async def test_a_caller_without_groups_gets_the_default_fair_share_weight_of_one() -> None:
    # docs/cli.md: a group's --weight defaults to 1; a caller in no group weighs the same.
    a = Authenticator(config.AuthSettings(mode="static", tokens=("t" * 20,)), None)
    assert (await a.authenticate(hdr("t" * 20))).weight == 1.0
    assert (await Authenticator(config.AuthSettings(mode="none"), None).authenticate(None)
            ).weight == 1.0
