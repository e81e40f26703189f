"""The authenticator with users, groups and rotation, driven through the services; and the
header parsing and fail-closed rules, pinned down so a mutant of them can't pass."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

import pytest

from fleetgate import config
from fleetgate.auth import keys
from fleetgate.auth.authn import Authenticator, bearer_token, readable
from fleetgate.errors import AuthError
from fleetgate.services import Context
from fleetgate.services import groups as G
from fleetgate.services import keys as K
from fleetgate.services import users as U
from fleetgate.store.db import migrate, open_engine

MODELS = ("Qwen/Qwen3-8B", "meta/llama-3-8b", "demo")


@pytest.fixture
def ctx(tmp_path: Path) -> Context:
    settings = config.parse({
        "store": {"url": f"sqlite:///{tmp_path / 'k.db'}"},
        "models": [{"name": m, "backend": {"type": "static", "urls": ["http://127.0.0.1:9"]}}
                   for m in MODELS],
    })
    e = open_engine(settings.store.url)
    migrate(e)
    return Context(e, settings)


def authn(ctx: Context, **kw) -> Authenticator:
    return Authenticator(config.AuthSettings(mode="keys", **kw), ctx.engine)


def hdr(k: str) -> bytes:
    return f"Bearer {k}".encode()


# -- the header -------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [
    b"Bearer abc", b"bearer abc", b"BEARER abc", b"  Bearer   abc  ",
])
def test_bearer_scheme_in_any_case_is_accepted(value):
    assert bearer_token(value) == "abc"


@pytest.mark.parametrize("value", [
    b"Basic abc", b"Token abc", b"abc", b"Bearer", b"Bearer ", b"Bearer a b", b"Bearerabc",
    b"Bearer\tabc", b"", None,
])
def test_other_schemes_and_shapes_are_refused(value):
    with pytest.raises(AuthError) as e:
        bearer_token(value)
    assert e.value.status == 401
    assert e.value.error_code in ("missing_api_key", "invalid_api_key")


async def test_a_valid_key_sent_with_another_scheme_is_refused(ctx):
    k, _ = K.create_key(ctx, name="k")
    a = authn(ctx)
    assert (await a.authenticate(hdr(k))).name == "k"
    for scheme in ("Basic", "Token", "Key"):
        with pytest.raises(AuthError):
            await a.authenticate(f"{scheme} {k}".encode())


@pytest.mark.parametrize("token", [
    keys.generate(),                      # well-formed, unknown
    "fg-" + "x" * 60,                     # fg- but malformed
    "fg-short",
    "sk-" + "s" * 40,                     # someone else's secret
    "s" * 64,
], ids=["well-formed-unknown", "fg-malformed", "fg-short", "foreign", "plain"])
async def test_a_401_never_echoes_more_than_the_display_prefix(ctx, token):
    for a in (authn(ctx), Authenticator(config.AuthSettings(mode="static", tokens=("t" * 20,)),
                                        None)):
        with pytest.raises(AuthError) as e:
            await a.authenticate(hdr(token))
        text = e.value.to_bytes().decode()
        assert token[: keys.DISPLAY_LEN + 1] not in text
        if keys.well_formed(token):  # shown so its owner can tell which key it was
            assert f"'{token[: keys.DISPLAY_LEN]}'" in text
        else:
            assert token[:5] not in text and "key starting" not in text


# -- failing closed: the thresholds come from the settings -------------------------------------


@pytest.mark.parametrize(("poll", "stale", "hang", "want"), [
    (1.0, None, None, (5.0, 30.0)),
    (0.1, None, None, (5.0, 30.0)),
    (2.0, None, None, (10.0, 30.0)),
    (4.0, None, None, (20.0, 40.0)),
    (1.0, 0.5, 2.5, (0.5, 2.5)),
])
def test_fail_closed_thresholds(ctx, poll, stale, hang, want):
    a = authn(ctx, revocation_poll_s=poll, store_stale_after_s=stale, store_hang_after_s=hang)
    assert (a.stale_after_s, a.hang_after_s) == want


@pytest.mark.parametrize(("now", "failing_since", "poll_started", "ok"), [
    (100.0, None, None, True),
    (100.0, 96.0, None, True),     # failing for 4 s of 5
    (100.0, 95.0, None, True),     # exactly 5: not yet
    (100.0, 94.9, None, False),
    (100.0, None, 71.0, True),     # one poll running for 29 s of 30
    (100.0, None, 70.0, True),
    (100.0, None, 69.9, False),
    (100.0, 99.0, 99.5, True),
])
def test_readable(now, failing_since, poll_started, ok):
    assert readable(now, failing_since, poll_started, 5.0, 30.0) is ok


def test_thresholds_are_settings_with_limits():
    with pytest.raises(Exception):  # noqa: B017 - pydantic's ValidationError
        config.AuthSettings(store_stale_after_s=0)


# -- principals from the store ----------------------------------------------------------------


async def test_principal_carries_user_groups_role_and_effective_access(ctx):
    G.create_group(ctx, "nlp", models=["Qwen/*", "demo"])
    U.create_user(ctx, "alice", groups=["nlp"], models=["Qwen/*"])
    k, rec = K.create_key(ctx, name="laptop", user="alice")
    p = await authn(ctx).authenticate(hdr(k))
    assert (p.name, p.key_id, p.user, p.role, p.groups) == ("laptop", rec.id, "alice", "user",
                                                            ("nlp",))
    assert p.key_prefix == keys.display_prefix(k) and p.user_id is not None
    assert [m for m in MODELS if p.allows(m)] == ["Qwen/Qwen3-8B"]
    # the built-in default (a key without --user) may use everything; admin keys are admin
    d, _ = K.create_key(ctx, name="d")
    adm, _ = K.create_key(ctx, name="a", admin=True)
    a = authn(ctx)
    pd, pa = await a.authenticate(hdr(d)), await a.authenticate(hdr(adm))
    assert pd.user == "default" and not pd.admin and all(pd.allows(m) for m in MODELS)
    assert pa.user == "admin" and pa.admin and all(pa.allows(m) for m in MODELS)


async def test_principals_are_computed_at_load_not_per_request(ctx, monkeypatch):
    from fleetgate.auth import access

    U.create_user(ctx, "root", role="admin")
    k, _ = K.create_key(ctx, name="k", user="root")
    a = authn(ctx)
    await a.reload()
    monkeypatch.setattr(access, "effective", lambda *x: pytest.fail("computed per request"))
    for _ in range(3):
        assert (await a.authenticate(hdr(k))).admin


async def test_narrowing_a_group_narrows_every_key_under_it_at_the_next_poll(ctx):
    G.create_group(ctx, "g", models=["Qwen/*", "demo"])
    for n in ("alice", "bob"):
        U.create_user(ctx, n, groups=["g"])
    ka, _ = K.create_key(ctx, name="a", user="alice", models=["demo", "Qwen/*"])
    kb, _ = K.create_key(ctx, name="b", user="bob")
    a = authn(ctx)
    await a.reload()
    assert (await a.authenticate(hdr(ka))).allows("demo")
    assert (await a.authenticate(hdr(kb))).allows("demo")
    G.update_group(ctx, "g", models=["Qwen/*"])
    await a.poll_once()
    for k in (ka, kb):
        p = await a.authenticate(hdr(k))
        assert not p.allows("demo") and p.allows("Qwen/Qwen3-8B")
    U.update_user(ctx, "bob", remove_groups=["g"])  # no group left: nothing
    await a.poll_once()
    pb = await a.authenticate(hdr(kb))
    assert not any(pb.allows(m) for m in MODELS)


async def test_disabling_a_user_stops_their_keys_at_the_next_poll_and_enabling_restores(ctx):
    U.create_user(ctx, "root", role="admin")
    k1, _ = K.create_key(ctx, name="1", user="root")
    k2, _ = K.create_key(ctx, name="2", user="root")
    other, _ = K.create_key(ctx, name="other")
    a = authn(ctx)
    await a.reload()
    for k in (k1, k2):
        await a.authenticate(hdr(k))
    U.set_enabled(ctx, "root", False)
    await a.poll_once()
    for k in (k1, k2):
        with pytest.raises(AuthError):
            await a.authenticate(hdr(k))
    await a.authenticate(hdr(other))  # someone else's key is untouched
    b = authn(ctx)  # a gateway starting now doesn't load them either
    await b.reload()
    with pytest.raises(AuthError):
        await b.authenticate(hdr(k1))
    U.set_enabled(ctx, "root", True)
    await a.poll_once()  # the negative cache forgets them too
    assert (await a.authenticate(hdr(k1))).admin


async def test_changing_a_role_reaches_the_cache(ctx):
    U.create_user(ctx, "carol", role="admin")
    k, _ = K.create_key(ctx, name="k", user="carol")
    a = authn(ctx)
    assert (await a.authenticate(hdr(k))).admin
    U.update_user(ctx, "carol", role="user")
    await a.poll_once()
    assert not (await a.authenticate(hdr(k))).admin


# -- rotation ---------------------------------------------------------------------------------


async def test_rotation_old_value_works_during_the_overlap_then_stops(ctx):
    old, rec = K.create_key(ctx, name="k", models=["demo"])
    a = authn(ctx)
    await a.reload()
    assert (await a.authenticate(hdr(old))).key_id == rec.id
    new, rec2 = K.rotate_key(ctx, rec.id, overlap=dt.timedelta(seconds=1))
    assert rec2.id == rec.id and rec2.name == "k" and rec2.models == ("demo",)
    await a.poll_once()
    p_old, p_new = await a.authenticate(hdr(old)), await a.authenticate(hdr(new))
    assert p_old.key_id == p_new.key_id == rec.id and p_new.key_prefix == new[:9]
    assert K.get_key(ctx, rec.id).status == "rotating"
    b = authn(ctx)  # a fresh gateway, loading from the store, accepts both as well
    await b.reload()
    await b.authenticate(hdr(old))
    await asyncio.sleep(1.1)  # the overlap ends; no poll needed
    for gw in (a, b, authn(ctx)):
        with pytest.raises(AuthError):
            await gw.authenticate(hdr(old))
        assert (await gw.authenticate(hdr(new))).key_id == rec.id
    assert K.get_key(ctx, rec.id).status == "active"


async def test_rotation_with_no_overlap_stops_the_old_value_at_the_next_poll(ctx):
    old, rec = K.create_key(ctx, name="k")
    a = authn(ctx)
    await a.authenticate(hdr(old))
    new, _ = K.rotate_key(ctx, rec.id, overlap=dt.timedelta(0))
    await a.poll_once()
    with pytest.raises(AuthError):
        await a.authenticate(hdr(old))
    await a.authenticate(hdr(new))
    assert K.get_key(ctx, rec.id).status == "active"


async def test_a_second_rotation_drops_the_first_old_value(ctx):
    v1, rec = K.create_key(ctx, name="k")
    a = authn(ctx)
    await a.reload()
    v2, _ = K.rotate_key(ctx, rec.id)
    await a.poll_once()
    await a.authenticate(hdr(v1))
    v3, _ = K.rotate_key(ctx, rec.id)
    await a.poll_once()
    with pytest.raises(AuthError):
        await a.authenticate(hdr(v1))
    for v in (v2, v3):
        assert (await a.authenticate(hdr(v))).key_id == rec.id


async def test_revoking_a_rotating_key_stops_both_values(ctx):
    old, rec = K.create_key(ctx, name="k")
    new, _ = K.rotate_key(ctx, rec.id)
    a = authn(ctx)
    await a.reload()
    await a.authenticate(hdr(old))
    K.revoke_key(ctx, rec.id)
    await a.poll_once()
    for v in (old, new):
        with pytest.raises(AuthError):
            await a.authenticate(hdr(v))


async def test_the_negative_cache_remembers_the_newest_bad_keys(ctx, monkeypatch):
    from fleetgate.store import repo

    a = authn(ctx, negative_cache_size=2)
    bad = [keys.generate() for _ in range(3)]
    for b in bad:
        with pytest.raises(AuthError) as e:
            await a.authenticate(hdr(b))
        assert e.value.error_code == "invalid_api_key"
    looked_up: list[str] = []
    real = repo.grant_by_digest
    monkeypatch.setattr(repo, "grant_by_digest",
                        lambda eng, d: looked_up.append(d) or real(eng, d))
    for b in bad[1:]:  # the two newest are remembered: refused without the store
        with pytest.raises(AuthError):
            await a.authenticate(hdr(b))
    assert looked_up == []
    with pytest.raises(AuthError):  # the oldest was pushed out: the store is asked again
        await a.authenticate(hdr(bad[0]))
    assert looked_up == [keys.digest(bad[0])]
    one = authn(ctx, negative_cache_size=1)
    with pytest.raises(AuthError):
        await one.authenticate(hdr(bad[0]))
    monkeypatch.setattr(repo, "grant_by_digest", lambda *x: pytest.fail("store asked"))
    with pytest.raises(AuthError):
        await one.authenticate(hdr(bad[0]))


def test_allows_is_memoised():
    from fleetgate.auth.access import ModelAccess

    acc = ModelAccess([["a*"]])
    assert acc.allows("ab") and not acc.allows("b")
    assert acc._memo == {"ab": True, "b": False}
    acc._compiled = ()  # a memo hit doesn't look at the patterns again
    assert acc.allows("ab") and not acc.allows("b")
