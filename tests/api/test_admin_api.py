"""The admin API, in-process: every route and field a ``user`` key may not use is refused (403)
and audited, admins can do everything, and a user can manage only their own keys.

The refusal tables are generated from the gateway's own route list, so a route added later is
tested without anyone remembering to add it here.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from fleetgate.api.routing import Route
from fleetgate.services import Context
from fleetgate.services import groups as group_svc
from fleetgate.services import users as user_svc
from fleetgate.store import repo

CHAT = {"model": "sim", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def admin_routes(gw: Any) -> list[Route]:
    return [r for r in gw.app.router.routes if r.path.startswith("/admin/v1/")]


def concrete(path: str, *, name: str = "bob", key_id: int = 1) -> str:
    return path.replace("{name}", name).replace("{id}", str(key_id))


@pytest.fixture
def people(gw: Any) -> dict[str, Any]:
    ctx = Context(gw.app.engine, gw.app.settings)
    group_svc.create_group(ctx, "research", models=["sim"])
    group_svc.create_group(ctx, "ops", models=["*"])
    user_svc.create_user(ctx, "alice", groups=["research"])
    user_svc.create_user(ctx, "bob", groups=["research"])
    user_svc.create_user(ctx, "root", role="admin")
    keys = {
        "alice": gw.key("alice-laptop", user="alice"),
        "bob": gw.key("bob-laptop", user="bob"),
        "root": gw.key("root", user="root"),
    }
    ids = {r.name: r.id for r in repo.list_keys(gw.app.engine)}
    return {"keys": keys, "ids": ids}


async def request(gw: Any, method: str, path: str, key: str, body: Any = None) -> Any:
    kw: dict[str, Any] = {"headers": bearer(key)}
    if body is not None:
        kw["json"] = body
    return await gw.client.request(method, path, **kw)


def audit_denied(gw: Any) -> list[repo.AuditRecord]:
    return [a for a in repo.list_audit(gw.app.engine, limit=1000) if a.outcome == "denied"]


async def test_every_admin_route_refuses_a_user_key_and_audits_it(gw: Any, people: Any) -> None:
    alice = people["keys"]["alice"]
    routes = [r for r in admin_routes(gw) if r.auth == "admin"]
    assert len(routes) >= 14  # users, groups, keys, audit
    for r in routes:
        before = len(audit_denied(gw))
        body = {"name": "x", "role": "admin"} if r.method in ("POST", "PATCH") else None
        path = concrete(r.path, key_id=people["ids"]["bob-laptop"])
        resp = await request(gw, r.method, path, alice, body)
        assert resp.status_code == 403, (r.method, r.path, resp.text)
        assert resp.json()["error"]["code"] == "admin_required"
        denied = audit_denied(gw)
        assert len(denied) == before + 1, (r.method, r.path)
        assert denied[0].actor == "alice"
    # Nothing changed: bob is still a plain user with his key, alice still not an admin.
    assert repo.get_user(gw.app.engine, "alice").role == "user"
    assert (await request(gw, "POST", "/v1/chat/completions", people["keys"]["bob"],
                          CHAT)).status_code == 200


# Every field that could raise a role, join a group, widen access or act for someone else.
FORBIDDEN_FIELDS = {
    "role": "admin", "groups": ["ops"], "add_groups": ["ops"], "user": "bob", "admin": True,
    "enabled": True, "weight": 10, "limits": {"rpm": 0}, "quota": {"tokens": 10**9},
    "rpm": 10**6, "max_tokens": 10**6,
}


def self_service_routes(gw: Any) -> list[Route]:
    return [r for r in admin_routes(gw) if r.auth == "key"]


async def test_a_user_key_cannot_raise_itself_by_any_route_or_field(gw: Any, people: Any) -> None:
    alice = people["keys"]["alice"]
    own = people["ids"]["alice-laptop"]
    tried = 0
    for r, (field, value) in itertools.product(self_service_routes(gw), FORBIDDEN_FIELDS.items()):
        if r.method not in ("POST", "PATCH"):
            continue
        body = {"name": "sneaky", field: value}
        resp = await request(gw, r.method, concrete(r.path, name="alice", key_id=own), alice, body)
        assert resp.status_code == 403, (r.method, r.path, field, resp.text)
        assert resp.json()["error"]["code"] == "forbidden"
        tried += 1
    assert tried >= 2 * len(FORBIDDEN_FIELDS)
    # And no PATCH on herself through the admin routes either.
    resp = await request(gw, "PATCH", "/admin/v1/users/alice", alice, {"role": "admin"})
    assert resp.status_code == 403
    u = repo.get_user(gw.app.engine, "alice")
    assert u.role == "user" and u.groups == ("research",)
    assert len(audit_denied(gw)) >= tried


async def test_a_user_key_cannot_reach_another_users_objects(gw: Any, people: Any) -> None:
    alice = people["keys"]["alice"]
    bobs = people["ids"]["bob-laptop"]
    r = await request(gw, "GET", "/admin/v1/users/bob", alice)
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    for method, path in (("DELETE", f"/admin/v1/me/keys/{bobs}"),
                         ("POST", f"/admin/v1/me/keys/{bobs}/rotate")):
        r = await request(gw, method, path, alice)
        assert r.status_code in (403, 404), r.text
    # Bob's key still works.
    r = await request(gw, "POST", "/v1/chat/completions", people["keys"]["bob"], CHAT)
    assert r.status_code == 200


async def test_a_user_manages_their_own_keys(gw: Any, people: Any) -> None:
    alice = people["keys"]["alice"]
    me = (await request(gw, "GET", "/admin/v1/me", alice)).json()
    assert me["name"] == "alice" and me["role"] == "user" and me["groups"] == ["research"]
    assert me["key"]["name"] == "alice-laptop"
    assert (await request(gw, "GET", "/admin/v1/users/alice", alice)).status_code == 200

    made = await request(gw, "POST", "/admin/v1/me/keys", alice,
                         {"name": "notebook", "models": ["sim"], "expires": "30d"})
    assert made.status_code == 201, made.text
    new = made.json()
    assert new["key"].startswith("fg-") and new["user"] == "alice" and new["models"] == ["sim"]
    listed = (await request(gw, "GET", "/admin/v1/me/keys", alice)).json()["data"]
    assert {k["name"] for k in listed} == {"alice-laptop", "notebook"}
    assert all("key" not in k and "digest" not in k for k in listed)  # never shown again

    # A key can't be wider than its owner: 'other' isn't in alice's group.
    wide = await request(gw, "POST", "/admin/v1/me/keys", alice,
                         {"name": "wide", "models": ["other"]})
    assert wide.status_code == 400 and wide.json()["error"]["param"] == "models"

    rotated = await request(gw, "POST", f"/admin/v1/me/keys/{new['id']}/rotate", alice,
                            {"overlap": 0})
    assert rotated.status_code == 200 and rotated.json()["id"] == new["id"]
    assert rotated.json()["key"] != new["key"]
    gone = await request(gw, "DELETE", f"/admin/v1/me/keys/{new['id']}", alice)
    assert gone.status_code == 200 and gone.json()["status"] == "revoked"


async def test_an_admin_manages_users_groups_and_keys(gw: Any, people: Any) -> None:
    root = people["keys"]["root"]
    r = await request(gw, "POST", "/admin/v1/groups", root, {"name": "vision", "models": ["o*"]})
    assert r.status_code == 201 and r.json()["models"] == ["o*"]
    r = await request(gw, "POST", "/admin/v1/users", root,
                      {"name": "carol", "groups": ["vision"]})
    assert r.status_code == 201 and r.json()["groups"] == ["vision"]
    r = await request(gw, "POST", "/admin/v1/keys", root, {"name": "carol-1", "user": "carol"})
    assert r.status_code == 201
    carol = r.json()["key"]
    assert (await request(gw, "POST", "/v1/chat/completions", carol,
                          {**CHAT, "model": "other"})).status_code == 200
    assert (await request(gw, "POST", "/v1/chat/completions", carol, CHAT)).status_code == 403

    r = await request(gw, "PATCH", "/admin/v1/users/carol", root, {"add_groups": ["research"]})
    assert r.status_code == 200 and sorted(r.json()["groups"]) == ["research", "vision"]
    r = await request(gw, "GET", "/admin/v1/users", root)
    assert {"alice", "bob", "carol", "root", "default", "admin"} <= {
        u["name"] for u in r.json()["data"]
    }
    r = await request(gw, "DELETE", "/admin/v1/groups/vision", root)
    assert r.status_code == 409  # still has a member
    r = await request(gw, "DELETE", "/admin/v1/groups/vision?force=true", root)
    assert r.status_code == 200
    log = (await request(gw, "GET", "/admin/v1/audit?limit=50", root)).json()["data"]
    actions = [e["action"] for e in log if e["actor"] == "root"]
    assert {"group.create", "user.create", "key.create", "user.update", "group.delete"} <= set(
        actions
    )
    secrets = [carol, *people["keys"].values()]
    assert not [e for e in log for k in secrets if k in str(e) or k[:12] in str(e)]


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("POST", "/admin/v1/users", {"name": "x", "nonsense": 1}, 400),
        ("POST", "/admin/v1/users", ["not", "an", "object"], 400),
        ("POST", "/admin/v1/users", {"name": "bad name!"}, 400),
        ("POST", "/admin/v1/users", {"name": "alice"}, 409),
        ("POST", "/admin/v1/users", {"name": "z", "role": "god"}, 400),
        ("POST", "/admin/v1/groups", {"name": "g", "weight": -1}, 400),
        ("POST", "/admin/v1/keys", {"name": "k", "user": "nobody"}, 404),
        ("POST", "/admin/v1/keys", {"name": "k", "expires": "soon"}, 400),
        ("GET", "/admin/v1/keys/abc", None, 400),
        ("GET", "/admin/v1/keys/99999", None, 404),
        ("GET", "/admin/v1/users/nobody", None, 404),
        ("GET", "/admin/v1/audit?limit=x", None, 400),
        ("PUT", "/admin/v1/users", None, 405),
        ("GET", "/admin/v1/nothing", None, 404),
    ],
)
async def test_bad_admin_requests_get_clear_errors(
    gw: Any, people: Any, method: str, path: str, body: Any, status: int
) -> None:
    r = await request(gw, method, path, people["keys"]["root"], body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["source"] == "gateway" and err["message"]


async def test_openapi_lists_every_admin_route(gw: Any) -> None:
    r = await gw.client.get("/admin/v1/openapi.json")
    assert r.status_code == 200
    doc = r.json()
    assert doc["openapi"].startswith("3.")
    listed = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert listed == {
        (r.method, r.path) for r in admin_routes(gw) if r.path != "/admin/v1/openapi.json"
    }
    assert "security" in doc["paths"]["/admin/v1/users"]["get"]


async def test_admin_api_needs_a_key(gw: Any) -> None:
    for r in admin_routes(gw):
        if r.auth == "public":
            continue
        resp = await gw.client.request(r.method, concrete(r.path))
        assert resp.status_code == 401, (r.method, r.path)


@pytest.mark.parametrize(
    "path",
    ["/admin/v1/keys?users=alice", "/admin/v1/keys?user=", "/admin/v1/keys?user=a&user=b",
     "/admin/v1/audit?limit=", "/admin/v1/audit?limit=ten", "/admin/v1/audit?since=",
     "/admin/v1/audit?since=7y", "/admin/v1/users?x=1", "/admin/v1/groups/vision?force=yes"],
)
async def test_query_strings_are_checked_not_ignored(gw: Any, people: Any, path: str) -> None:
    """A typo in a query parameter is a 400, never a silently wider answer."""
    method = "DELETE" if "force" in path else "GET"
    r = await request(gw, method, path, people["keys"]["root"])
    assert r.status_code == 400, r.text
