"""Limits, quotas and network allow-lists on users, groups and keys, on both stores (SQLite and
a real PostgreSQL): stored, changed one by one, audited, and built into each key's Principal."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest

from fleetgate import config
from fleetgate.auth.authn import Authenticator
from fleetgate.auth.principals import Principal
from fleetgate.errors import InvalidRequest, PermissionDenied
from fleetgate.limits.spec import Limits, Quota, Subject
from fleetgate.services import Context, audit, authz
from fleetgate.services import groups as G
from fleetgate.services import keys as K
from fleetgate.services import users as U
from fleetgate.services.validation import KEEP
from fleetgate.store import repo


def principal(ctx: Context, key: str) -> Principal:
    a = Authenticator(config.AuthSettings(), ctx.engine)

    async def go() -> Principal:
        await a.reload()
        return await a.authenticate(f"Bearer {key}".encode())

    return asyncio.run(go())


def test_limits_quotas_and_lists_reach_the_principal(ctx):
    assert not repo.any_limits(ctx.engine)
    G.create_group(ctx, "nlp", models=["*"], weight=2, limits={"rpm": 600, "tpm": 0},
                   quota_tokens=5_000_000, quota_period="day")
    G.create_group(ctx, "ml", models=["demo"], weight=3)
    U.create_user(ctx, "alice", groups=["nlp", "ml"], limits={"rpm": 10, "max_tokens": 256},
                  quota_tokens=1000, allow_ips=["10.1.2.3/8", "127.0.0.1"])
    key, rec = K.create_key(ctx, name="k", user="alice", limits={"max_concurrent": 2},
                            allow_ips=["127.0.0.0/8"])
    assert repo.any_limits(ctx.engine)
    p = principal(ctx, key)
    assert dict(p.limits) == {
        Subject("user", "alice"): Limits(rpm=10, max_tokens=256),
        Subject("group", "nlp"): Limits(rpm=600),  # tpm 0 is no limit
        Subject("key", str(rec.id)): Limits(max_concurrent=2),
    }
    assert dict(p.quotas) == {Subject("user", "alice"): Quota(1000, "month"),
                              Subject("group", "nlp"): Quota(5_000_000, "day")}
    assert p.weight == 3.0  # the highest of the groups'
    # Both lists apply: the user's (normalised) and the key's narrower one.
    assert U.get_user(ctx, "alice").allow_ips == ("10.0.0.0/8", "127.0.0.1/32")
    assert p.networks.allows(ipaddress.ip_address("127.0.0.1"))
    assert not p.networks.allows(ipaddress.ip_address("10.0.0.1"))  # outside the key's list
    assert not p.networks.allows(ipaddress.ip_address("192.168.0.1"))


def test_updates_change_named_limits_only_and_bump_keys(ctx):
    U.create_user(ctx, "bob", limits={"rpm": 5, "tpm": 1000})
    key, rec = K.create_key(ctx, name="k", user="bob")
    before = principal(ctx, key)
    assert before.networks.restricted is False and before.weight == 1.0
    stamp = repo.get_key(ctx.engine, rec.id)
    u = U.update_user(ctx, "bob", limits={"rpm": 0, "max_n": 2}, quota_tokens=50,
                      allow_ips=["192.168.0.0/16"])
    assert u.limits == {"tpm": 1000, "max_n": 2} and u.quota == (50, "month")
    changed = {k for k, *_ in repo.changed_since(ctx.engine, stamp.created_at)}
    assert rec.id in changed  # the change feed carries it to running gateways
    p = principal(ctx, key)
    assert dict(p.limits) == {Subject("user", "bob"): Limits(tpm=1000, max_n=2)}
    assert not p.networks.allows(ipaddress.ip_address("127.0.0.1"))
    u = U.update_user(ctx, "bob", quota_period="day")
    assert u.quota == (50, "day")
    u = U.update_user(ctx, "bob", limits={"tpm": None, "max_n": 0}, quota_tokens=0,
                      allow_ips=[])
    assert (u.limits, u.quota, u.allow_ips) == (None, None, None)
    assert not repo.any_limits(ctx.engine)
    p = principal(ctx, key)
    assert (p.limits, p.quotas, p.networks.restricted) == ((), (), False)
    # The audit log has each change, without anything but the values.
    details = [e.detail for e in audit.list_entries(ctx) if e.action == "user.update"][::-1]
    assert details[0] == {"limits": {"tpm": 1000, "max_n": 2}, "allow_ips": ["192.168.0.0/16"],
                           "quota": {"tokens": 50, "period": "month"}}
    assert details[1] == {"quota": {"tokens": 50, "period": "day"}}
    assert details[2] == {"limits": None, "quota": None, "allow_ips": None}


def test_group_changes_reach_members_keys(ctx):
    G.create_group(ctx, "g", models=["*"])
    U.create_user(ctx, "carol", groups=["g"])
    key, _ = K.create_key(ctx, name="k", user="carol")
    assert principal(ctx, key).limits == ()
    g = G.update_group(ctx, "g", limits={"rpm": 7}, quota_tokens=99, weight=4)
    assert (g.limits, g.quota) == ({"rpm": 7}, (99, "month"))
    p = principal(ctx, key)
    assert dict(p.limits) == {Subject("group", "g"): Limits(rpm=7)}
    assert dict(p.quotas) == {Subject("group", "g"): Quota(99, "month")} and p.weight == 4.0
    assert G.as_json(g)["limits"]["rpm"] == 7 and G.as_json(g)["quota"] == {
        "tokens": 99, "period": "month"}
    g = G.update_group(ctx, "g", quota_tokens=KEEP, quota_period=KEEP, limits={"rpm": 0})
    assert g.limits is None and g.quota == (99, "month")


@pytest.mark.parametrize(("call", "param"), [
    (lambda c: U.create_user(c, "x", limits={"rpm": -1}), "limits.rpm"),
    (lambda c: U.create_user(c, "x", limits={"rpm": 1.5}), "limits.rpm"),
    (lambda c: U.create_user(c, "x", limits={"rpm": True}), "limits.rpm"),
    (lambda c: U.create_user(c, "x", limits={"burst": 1}), "limits"),
    (lambda c: U.create_user(c, "x", quota_tokens=10, quota_period="week"), "quota.period"),
    (lambda c: U.create_user(c, "x", quota_tokens=-5), "quota.tokens"),
    (lambda c: U.create_user(c, "x", allow_ips=["10.0.0.0/33"]), "allow_ips"),
    (lambda c: U.create_user(c, "x", allow_ips="10.0.0.0/8"), "allow_ips"),
    (lambda c: U.update_user(c, "default", quota_period="day"), "quota_tokens"),
    (lambda c: G.create_group(c, "x", limits={"tpm": "many"}), "limits.tpm"),
    (lambda c: K.create_key(c, name="x", allow_ips=["nowhere"]), "allow_ips"),
    (lambda c: K.create_key(c, name="x", limits={"max_n": 2**60}), "limits.max_n"),
])
def test_bad_values_are_refused_naming_the_field(ctx, call, param):
    with pytest.raises(InvalidRequest) as e:
        call(ctx)
    assert e.value.param == param
    assert not repo.any_limits(ctx.engine)


def test_a_user_may_set_allow_ips_on_their_own_key_but_no_limit(ctx):
    U.create_user(ctx, "dan")
    dan = Principal(name="k", user="dan", role="user")
    authz.check_user_may(dan, "key.create", "dan", ("name", "allow_ips"))
    for fields in (("limits",), ("name", "rpm"), ("quota",)):
        with pytest.raises(PermissionDenied):
            authz.check_user_may(dan, "key.create", "dan", fields)
    with pytest.raises(PermissionDenied):
        authz.check_user_may(dan, "user.update", "dan", ("allow_ips",))
    with pytest.raises(PermissionDenied):
        authz.check_user_may(dan, "key.create", "alice", ("name", "allow_ips"))


def test_unreadable_stored_values_fail_closed(ctx):
    from sqlalchemy import update

    from fleetgate.store.tables import users

    U.create_user(ctx, "eve")
    key, _ = K.create_key(ctx, name="k", user="eve")
    with ctx.engine.begin() as conn:  # written by hand, past the services' checks
        conn.execute(update(users).where(users.c.name == "eve").values(allow_ips=["nope"]))
    p = principal(ctx, key)
    assert not p.networks.allows(ipaddress.ip_address("127.0.0.1"))
