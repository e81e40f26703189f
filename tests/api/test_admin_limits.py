"""The admin API's limits, quotas and allow-lists, in-process: admins set them on users, groups
and keys and the gateway applies them; a user may narrow their own key's network list and set
nothing else; ``/usage`` shows a user only their own, ``/me`` the limits and quota left."""

from __future__ import annotations

from typing import Any

import pytest

from fleetgate.services import Context
from fleetgate.services import groups as group_svc
from fleetgate.services import users as user_svc
from fleetgate.store import repo

CHAT = {"model": "sim", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def people(gw: Any) -> dict[str, str]:
    ctx = Context(gw.app.engine, gw.app.settings)
    group_svc.create_group(ctx, "research", models=["sim"])
    user_svc.create_user(ctx, "alice", groups=["research"])
    user_svc.create_user(ctx, "bob", groups=["research"])
    user_svc.create_user(ctx, "root", role="admin")
    return {n: gw.key(f"{n}-1", user=n) for n in ("alice", "bob", "root")}


async def call(gw: Any, method: str, path: str, key: str, body: Any = None) -> Any:
    kw: dict[str, Any] = {"headers": bearer(key)}
    if body is not None:
        kw["json"] = body
    return await gw.client.request(method, path, **kw)


async def reload(gw: Any) -> None:
    await gw.app.authn.poll_once()  # what the refresher does every auth.revocation_poll_s


async def test_admins_set_limits_quotas_and_lists(gw: Any, people: dict[str, str]) -> None:
    root = people["root"]
    r = await call(gw, "PATCH", "/admin/v1/groups/research", root,
                   {"limits": {"rpm": 100, "max_n": 1}, "quota": {"tokens": 10**6,
                                                                  "period": "day"}})
    assert r.status_code == 200, r.text
    assert r.json()["limits"] == {"rpm": 100, "tpm": None, "max_concurrent": None,
                                  "max_tokens": None, "max_n": 1}
    assert r.json()["quota"] == {"tokens": 10**6, "period": "day"}
    r = await call(gw, "PATCH", "/admin/v1/users/alice", root,
                   {"limits": {"max_tokens": 5}, "allow_ips": ["127.0.0.0/8"]})
    assert r.status_code == 200 and r.json()["allow_ips"] == ["127.0.0.0/8"]
    await reload(gw)
    alice = people["alice"]
    ok = await call(gw, "POST", "/v1/chat/completions", alice, CHAT)
    assert ok.status_code == 200, ok.text
    capped = await call(gw, "POST", "/v1/chat/completions", alice, {**CHAT, "max_tokens": 6})
    assert capped.status_code == 400 and capped.json()["error"]["code"] == "max_tokens_above_cap"
    n = await call(gw, "POST", "/v1/chat/completions", alice, {**CHAT, "n": 2})
    assert n.status_code == 400 and n.json()["error"]["code"] == "n_above_cap"

    # A key whose list leaves out the test client's address (127.0.0.1) is refused.
    r = await call(gw, "POST", "/admin/v1/keys", root,
                   {"name": "far", "user": "bob", "allow_ips": ["10.0.0.0/8"],
                    "limits": {"rpm": 3}})
    assert r.status_code == 201, r.text
    assert r.json()["allow_ips"] == ["10.0.0.0/8"] and r.json()["limits"]["rpm"] == 3
    far = await call(gw, "POST", "/v1/chat/completions", r.json()["key"], CHAT)
    assert far.status_code == 403 and far.json()["error"]["code"] == "ip_not_allowed"

    # Removing: null or 0 removes a limit, null the quota and the list.
    r = await call(gw, "PATCH", "/admin/v1/users/alice", root,
                   {"limits": {"max_tokens": 0}, "allow_ips": None})
    assert r.json()["limits"]["max_tokens"] is None and r.json()["allow_ips"] is None
    r = await call(gw, "PATCH", "/admin/v1/groups/research", root, {"quota": None})
    assert r.json()["quota"] is None and r.json()["limits"]["rpm"] == 100
    await reload(gw)
    assert (await call(gw, "POST", "/v1/chat/completions", alice,
                       {**CHAT, "max_tokens": 6})).status_code == 200


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/admin/v1/users/alice", {"limits": {"rpm": -1}}, "limits.rpm"),
    ("/admin/v1/users/alice", {"limits": {"rpm": "10"}}, "limits.rpm"),
    ("/admin/v1/users/alice", {"limits": {"burst": 1}}, "limits"),
    ("/admin/v1/users/alice", {"limits": [1]}, "limits"),
    ("/admin/v1/users/alice", {"quota": {"tokens": 5, "period": "week"}}, "quota.period"),
    ("/admin/v1/users/alice", {"quota": {"tokens": 5, "extra": 1}}, "extra"),
    ("/admin/v1/users/alice", {"allow_ips": ["10.0.0.0/40"]}, "allow_ips"),
    ("/admin/v1/users/alice", {"allow_ips": "10.0.0.0/8"}, "allow_ips"),
    ("/admin/v1/groups/research", {"quota": {"tokens": -3}}, "quota.tokens"),
])
async def test_bad_values_are_400_naming_the_field(
    gw: Any, people: dict[str, str], path: str, body: Any, param: str
) -> None:
    r = await call(gw, "PATCH", path, people["root"], body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert not repo.any_limits(gw.app.engine)


async def test_a_user_may_only_narrow_their_own_keys_network(gw: Any, people: dict[str, str]) -> None:
    alice = people["alice"]
    r = await call(gw, "POST", "/admin/v1/me/keys", alice,
                   {"name": "office", "allow_ips": ["10.0.0.0/8"]})
    assert r.status_code == 201 and r.json()["allow_ips"] == ["10.0.0.0/8"]
    far = await call(gw, "POST", "/v1/chat/completions", r.json()["key"], CHAT)
    assert far.status_code == 403 and far.json()["error"]["code"] == "ip_not_allowed"
    refusals = [
        ("POST", "/admin/v1/me/keys", {"name": "x", "limits": {"rpm": 10**6}}, "forbidden"),
        ("POST", "/admin/v1/me/keys", {"name": "x", "quota": {"tokens": 1}}, "forbidden"),
        ("PATCH", "/admin/v1/users/alice", {"allow_ips": None}, "admin_required"),
        ("PATCH", "/admin/v1/users/bob", {"allow_ips": ["0.0.0.0/0"]}, "admin_required"),
        ("POST", "/admin/v1/keys", {"name": "x", "user": "bob", "allow_ips": ["0.0.0.0/0"]},
         "admin_required"),
        ("PATCH", "/admin/v1/groups/research", {"limits": {"rpm": 0}}, "admin_required"),
    ]
    for method, path, body, code in refusals:
        r = await call(gw, method, path, alice, body)
        assert r.status_code == 403 and r.json()["error"]["code"] == code, (path, body, r.text)
    assert not repo.any_limits(gw.app.engine)
    assert repo.get_user(gw.app.engine, "bob").allow_ips is None


async def test_usage_is_everyones_for_admins_and_only_ones_own_for_users(
    gw: Any, people: dict[str, str]
) -> None:
    root = people["root"]
    await call(gw, "PATCH", "/admin/v1/users/alice", root,
               {"quota": {"tokens": 1000}, "limits": {"rpm": 50}})
    await reload(gw)
    for who, n in (("alice", 2), ("bob", 3)):
        for _ in range(n):
            assert (await call(gw, "POST", "/v1/chat/completions", people[who],
                               CHAT)).status_code == 200
    await gw.app.usage.flush()
    everyone = (await call(gw, "GET", "/admin/v1/usage?by=user&since=1d", root)).json()["data"]
    assert {r["user"]: r["requests"] for r in everyone} == {"alice": 2, "bob": 3}
    assert all(r["total_tokens"] == r["prompt_tokens"] + r["completion_tokens"] > 0
               for r in everyone)
    for query in ("?by=user", "?by=key", "?by=model", "?by=day", ""):
        mine = (await call(gw, "GET", "/admin/v1/usage" + query, people["alice"])).json()
        assert sum(r["requests"] for r in mine["data"]) == 2, (query, mine)
    r = await call(gw, "GET", "/admin/v1/usage?by=team", root)
    assert r.status_code == 400
    me = (await call(gw, "GET", "/admin/v1/me", people["alice"])).json()
    used = next(r["total_tokens"] for r in everyone if r["user"] == "alice")
    assert me["quotas"] == [{"subject": "user alice", "tokens": 1000, "period": "month",
                             "used": used, "left": 1000 - used,
                             "resets_at": me["quotas"][0]["resets_at"]}]
    assert me["applied_limits"] == [{"subject": "user", "name": "alice", "rpm": 50, "tpm": None,
                                     "max_concurrent": None, "max_tokens": None,
                                     "max_n": None}]
    assert me["quota"] == {"tokens": 1000, "period": "month"}
    # An admin reads the same for any user: what is used and left of each quota that applies.
    alice = (await call(gw, "GET", "/admin/v1/users/alice", root)).json()
    assert alice["quotas"] == me["quotas"]
    bob = (await call(gw, "GET", "/admin/v1/users/bob", root)).json()
    assert bob["quotas"] == []
