"""The identity services on both stores (SQLite and a real PostgreSQL): users, groups, keys,
audit, and who may do what."""

from __future__ import annotations

import datetime as dt

import pytest

from fleetgate.auth.principals import Principal
from fleetgate.errors import Conflict, GatewayError, InvalidRequest, NotFound, PermissionDenied
from fleetgate.services import Context, audit, authz
from fleetgate.services import groups as G
from fleetgate.services import keys as K
from fleetgate.services import users as U
from fleetgate.store import repo


def actions(ctx: Context) -> list[tuple[str, str, str]]:
    return [(r.actor, r.action, r.outcome) for r in reversed(audit.list_entries(ctx))]


def test_builtin_users_exist_after_migration(ctx):
    users = {u.name: u for u in U.list_users(ctx)}
    assert users["default"].role == "user" and users["admin"].role == "admin"
    assert users["default"].enabled and users["default"].groups == ()


def test_users_and_groups_round_trip(ctx):
    G.create_group(ctx, "nlp", models=["Qwen/*"], weight=2.5)
    G.create_group(ctx, "vision", models=[])
    u = U.create_user(ctx, "alice", groups=["nlp", "vision"], models=["Qwen/Qwen3-8B"])
    assert (u.role, u.groups, u.models, u.source) == ("user", ("nlp", "vision"),
                                                      ("Qwen/Qwen3-8B",), "local")
    u = U.update_user(ctx, "alice", remove_groups=["vision"], models=None, role="admin")
    assert (u.role, u.groups, u.models) == ("admin", ("nlp",), None)
    g = G.update_group(ctx, "nlp", weight=3)
    assert g.weight == 3.0 and g.models == ("Qwen/*",) and g.members == ("alice",)
    g = G.update_group(ctx, "nlp", models=["demo"])
    assert g.weight == 3.0 and g.models == ("demo",)
    assert [x.name for x in G.list_groups(ctx)] == ["nlp", "vision"]
    assert U.get_user(ctx, "alice").groups == ("nlp",)


@pytest.mark.parametrize(("call", "error"), [
    (lambda c: U.create_user(c, "default"), Conflict),
    (lambda c: U.create_user(c, "bad name"), InvalidRequest),
    (lambda c: U.create_user(c, ""), InvalidRequest),
    (lambda c: U.create_user(c, "x", role="owner"), InvalidRequest),
    (lambda c: U.create_user(c, "x", groups=["nope"]), NotFound),
    (lambda c: U.create_user(c, "x", models="demo"), InvalidRequest),  # a string, not a list
    (lambda c: U.create_user(c, "x", models=["a,b"]), InvalidRequest),
    (lambda c: U.update_user(c, "nobody", role="admin"), NotFound),
    (lambda c: U.update_user(c, "default", role="admin"), InvalidRequest),
    (lambda c: U.update_user(c, "admin", role="user"), InvalidRequest),
    (lambda c: U.delete_user(c, "default"), Conflict),
    (lambda c: U.set_enabled(c, "nobody", False), NotFound),
    (lambda c: G.create_group(c, "g", weight=0), InvalidRequest),
    (lambda c: G.create_group(c, "g", weight=float("nan")), InvalidRequest),
    (lambda c: G.create_group(c, "g", weight=True), InvalidRequest),
    (lambda c: G.update_group(c, "nope", weight=2), NotFound),
    (lambda c: G.delete_group(c, "nope"), NotFound),
])
def test_refusals(ctx, call, error):
    before = len(audit.list_entries(ctx))
    with pytest.raises(error) as e:
        call(ctx)
    assert isinstance(e.value, GatewayError) and e.value.message
    assert len(audit.list_entries(ctx)) == before  # a refused change changes nothing


def test_a_group_with_members_needs_force_to_delete(ctx):
    G.create_group(ctx, "g", models=["demo"])
    U.create_user(ctx, "bob", groups=["g"])
    with pytest.raises(Conflict, match="member"):
        G.delete_group(ctx, "g")
    G.delete_group(ctx, "g", force=True)
    assert U.get_user(ctx, "bob").groups == ()


def test_a_user_who_owns_keys_is_disabled_not_deleted(ctx):
    U.create_user(ctx, "carol", role="admin")
    U.create_user(ctx, "dave")
    K.create_key(ctx, name="k", user="carol")
    with pytest.raises(Conflict, match="disable"):
        U.delete_user(ctx, "carol")
    U.delete_user(ctx, "dave")
    with pytest.raises(NotFound):
        U.get_user(ctx, "dave")


# -- keys: a key can't widen its owner's access ------------------------------------------------


@pytest.mark.parametrize(("groups", "own", "key", "ok"), [
    ([["Qwen/*"]], None, ["Qwen/Qwen3-8B"], True),
    ([["Qwen/*"]], None, ["Qwen/*"], True),
    ([["Qwen/*"]], None, ["*"], True),                   # cut to Qwen/* on every request
    ([["Qwen/*"]], None, ["demo"], False),               # names a model the owner may not use
    ([["Qwen/*"]], None, ["meta/*"], False),             # matches none the owner may use
    ([["Qwen/*"]], ["Qwen/Qwen3-8B"], ["Qwen/Qwen3-32B"], False),  # the user's own list counts
    ([["Qwen/*"], ["demo"]], None, ["demo", "Qwen/Qwen3-32B"], True),  # union of groups
    ([[]], None, ["demo"], False),                       # a group with no list: nothing
    ([], None, ["demo"], False),                         # no group: nothing
    ([["*"]], None, ["no-such-model"], False),           # unknown
])
def test_key_patterns_must_stay_within_the_owner(ctx, groups, own, key, ok):
    for i, lst in enumerate(groups):
        G.create_group(ctx, f"g{i}", models=lst)
    U.create_user(ctx, "alice", groups=[f"g{i}" for i in range(len(groups))], models=own)
    if ok:
        _, rec = K.create_key(ctx, name="k", user="alice", models=key)
        assert rec.models == tuple(key)
    else:
        with pytest.raises(InvalidRequest) as e:
            K.create_key(ctx, name="k", user="alice", models=key)
        assert e.value.param == "models" and "alice" in e.value.message
        assert K.list_keys(ctx) == []


def test_key_owner_rules(ctx):
    U.create_user(ctx, "erin")
    with pytest.raises(NotFound):
        K.create_key(ctx, name="k", user="nobody")
    with pytest.raises(InvalidRequest, match="role admin"):
        K.create_key(ctx, name="k", user="erin", admin=True)
    U.set_enabled(ctx, "erin", False)
    with pytest.raises(InvalidRequest, match="disabled"):
        K.create_key(ctx, name="k", user="erin")
    with pytest.raises(InvalidRequest):
        K.create_key(ctx, name="k", models=[])
    with pytest.raises(InvalidRequest):
        K.create_key(ctx, name="", models=None)
    with pytest.raises(InvalidRequest):
        K.create_key(ctx, name="k", expires=dt.timedelta(0))
    key, rec = K.create_key(ctx, name="k", admin=True)
    assert K.get_key(ctx, rec.id).user == "admin" and key.startswith("fg-")
    _, rec = K.create_key(ctx, name="k2", expires=dt.timedelta(days=30))
    assert rec.expires_at is not None and K.get_key(ctx, rec.id).user == "default"


def test_rotate_revoke_list_and_ownership(ctx):
    U.create_user(ctx, "frank", role="admin")
    k1, r1 = K.create_key(ctx, name="laptop", user="frank", models=["demo"],
                          expires=dt.timedelta(days=3))
    _, r2 = K.create_key(ctx, name="other")
    new, rr = K.rotate_key(ctx, r1.id, owner="frank")
    assert (rr.id, rr.name, rr.models, rr.expires_at) == (r1.id, r1.name, r1.models,
                                                          r1.expires_at)
    assert new != k1 and rr.previous_digest == r1.digest and rr.digest != r1.digest
    assert rr.previous_valid_until is not None
    assert abs((rr.previous_valid_until - repo.utcnow()) - K.DEFAULT_OVERLAP) < dt.timedelta(
        minutes=1)
    assert [(v.key.id, v.user, v.status) for v in K.list_keys(ctx, user="frank")] == [
        (r1.id, "frank", "rotating")]
    assert {v.key.id for v in K.list_keys(ctx)} == {r1.id, r2.id}
    # another user's key is "not found" to a caller acting as its owner
    for call in (lambda: K.rotate_key(ctx, r2.id, owner="frank"),
                 lambda: K.revoke_key(ctx, r2.id, owner="frank"),
                 lambda: K.get_key(ctx, r2.id, owner="frank"),
                 lambda: K.revoke_key(ctx, 999999)):
        with pytest.raises(NotFound):
            call()
    with pytest.raises(InvalidRequest):
        K.rotate_key(ctx, r1.id, overlap=dt.timedelta(days=31))
    K.revoke_key(ctx, r1.id, owner="frank")
    assert K.get_key(ctx, r1.id).status == "revoked"
    with pytest.raises(Conflict, match="revoked"):
        K.rotate_key(ctx, r1.id)
    U.set_enabled(ctx, "default", False)
    assert K.get_key(ctx, r2.id).status == "disabled"


def test_every_change_writes_one_audit_row_without_secrets(ctx):
    G.create_group(ctx, "g", models=["demo"])
    U.create_user(ctx, "gina", groups=["g"])
    U.update_user(ctx, "gina", models=["demo"])
    key, rec = K.create_key(ctx, name="k", user="gina")
    new, _ = K.rotate_key(ctx, rec.id, overlap=dt.timedelta(0))
    K.revoke_key(ctx, rec.id)
    U.set_enabled(ctx, "gina", False)
    U.set_enabled(ctx, "gina", True)
    G.update_group(ctx, "g", weight=2)
    G.delete_group(ctx, "g", force=True)
    assert actions(ctx) == [("root", a, "ok") for a in (
        "group.create", "user.create", "user.update", "key.create", "key.rotate", "key.revoke",
        "user.disable", "user.enable", "group.update", "group.delete")]
    rows = audit.list_entries(ctx)
    assert all(r.actor_key_id == 7 for r in rows)
    text = repr(rows)
    for secret in (key, new, key[3:], new[3:], rec.digest):
        assert secret not in text
    assert key[:9] in text  # the display prefix is what identifies it
    created = [r for r in rows if r.action == "key.create"][0]
    assert created.object_type == "key" and created.object_id == str(rec.id)
    assert audit.list_entries(ctx, limit=2)[0].action == "group.delete"
    assert audit.list_entries(ctx, actor="nobody") == []
    with pytest.raises(InvalidRequest):
        audit.list_entries(ctx, limit=0)


def test_changes_bump_the_keys_they_affect(ctx, engine):
    G.create_group(ctx, "g", models=["demo"])
    U.create_user(ctx, "hal", groups=["g"])
    U.create_user(ctx, "ivy")
    _, kh = K.create_key(ctx, name="h", user="hal")
    K.create_key(ctx, name="i", user="ivy")  # never touched by any of these
    _, kd = K.create_key(ctx, name="d")
    for change, touched in (
        (lambda: G.update_group(ctx, "g", models=["demo", "Qwen/*"]), {kh.id}),
        (lambda: U.update_user(ctx, "hal", models=["demo"]), {kh.id}),
        (lambda: U.set_enabled(ctx, "hal", False), {kh.id}),
        (lambda: U.update_user(ctx, "default", add_groups=["g"]), {kd.id}),
        (lambda: G.delete_group(ctx, "g", force=True), {kh.id, kd.id}),
    ):
        since = repo.utcnow()
        change()
        assert {i for i, *_ in repo.changed_since(engine, since)} == touched


# -- who may do what --------------------------------------------------------------------------

ADMIN = Principal(name="k", key_id=1, user="root", role="admin")
ALICE = Principal(name="k", key_id=2, user="alice")


@pytest.mark.parametrize("action", authz.ACTIONS)
def test_an_admin_may_do_everything(action):
    authz.check_user_may(ADMIN, action, "anyone", ("role", "groups", "models", "admin"))


@pytest.mark.parametrize("action", authz.ACTIONS)
def test_a_user_may_do_only_self_service_on_their_own_things(action):
    if action in authz.SELF_SERVICE:
        authz.check_user_may(ALICE, action, "alice")
        for target in ("bob", None, "Alice"):
            with pytest.raises(PermissionDenied) as e:
                authz.check_user_may(ALICE, action, target)
            assert e.value.error_code == "forbidden" and e.value.status == 403
    else:
        for target in ("alice", "bob", None):
            with pytest.raises(PermissionDenied) as e:
                authz.check_user_may(ALICE, action, target)
            assert e.value.error_code == "admin_required" and e.value.status == 403


@pytest.mark.parametrize("field", [
    "role", "groups", "add_groups", "admin", "user", "enabled", "weight", "limits", "id",
])
@pytest.mark.parametrize("action", ["key.create", "key.rotate", "user.read"])
def test_a_user_can_never_send_a_privileged_field(action, field):
    with pytest.raises(PermissionDenied) as e:
        authz.check_user_may(ALICE, action, "alice", ("name", field) if action == "key.create"
                             else (field,))
    assert e.value.error_code == "forbidden" and e.value.param == field


def test_a_user_may_send_the_key_fields_that_only_narrow():
    authz.check_user_may(ALICE, "key.create", "alice", ("name", "models", "expires"))
    authz.check_user_may(ALICE, "key.rotate", "alice", ("overlap",))
    with pytest.raises(ValueError):
        authz.check_user_may(ADMIN, "user.explode", None)


def test_authorize_records_each_refusal(ctx):
    with pytest.raises(PermissionDenied):
        authz.authorize(ctx, ALICE, "user.update", "alice", ("role",))
    with pytest.raises(PermissionDenied):
        authz.authorize(ctx, ALICE, "key.revoke", "bob", object_id=5)
    authz.authorize(ctx, ALICE, "key.read", "alice")
    rows = list(reversed(audit.list_entries(ctx)))
    assert [(r.actor, r.actor_key_id, r.action, r.object_id, r.outcome) for r in rows] == [
        ("alice", 2, "user.update", "alice", "denied"),
        ("alice", 2, "key.revoke", "5", "denied"),
    ]
    assert rows[0].detail == {"code": "admin_required", "fields": ["role"]}


# -- the audit rows, exactly -------------------------------------------------------------------


def test_each_audit_row_names_the_action_object_and_what_changed(ctx):
    def last() -> tuple:
        r = audit.list_entries(ctx, limit=1)[0]
        return (r.action, r.object_type, r.object_id, r.detail, r.outcome, r.actor)

    G.create_group(ctx, "g", models=["demo"], weight=2)
    assert last() == ("group.create", "group", "g", {"models": ["demo"], "weight": 2.0}, "ok",
                      "root")
    G.create_group(ctx, "h")
    U.create_user(ctx, "ann", groups=["g", "h", "g"], models=["demo"])
    assert last() == ("user.create", "user", "ann",
                      {"role": "user", "groups": ["g", "h"], "models": ["demo"]}, "ok", "root")
    U.create_user(ctx, "bo", role="admin")
    assert last()[3] == {"role": "admin", "groups": [], "models": None}
    U.update_user(ctx, "ann", role="admin", models=["Qwen/*"], add_groups=["h"],
                  remove_groups=["g"])
    assert last() == ("user.update", "user", "ann",
                      {"role": "admin", "models": ["Qwen/*"], "add_groups": ["h"],
                       "remove_groups": ["g"]}, "ok", "root")
    u = U.get_user(ctx, "ann")
    assert (u.role, u.models, u.groups) == ("admin", ("Qwen/*",), ("h",))
    U.update_user(ctx, "ann", models=[])  # an empty list removes the narrowing, like None
    assert last()[3] == {"models": None} and U.get_user(ctx, "ann").models is None
    U.set_enabled(ctx, "bo", False)
    assert last()[:3] == ("user.disable", "user", "bo") and not U.get_user(ctx, "bo").enabled
    U.set_enabled(ctx, "bo", True)
    assert last()[:3] == ("user.enable", "user", "bo") and U.get_user(ctx, "bo").enabled
    U.create_user(ctx, "cy")
    U.delete_user(ctx, "cy")
    assert last()[:4] == ("user.delete", "user", "cy", None)
    G.update_group(ctx, "g", models=["demo", "Qwen/*"])
    assert last() == ("group.update", "group", "g", {"models": ["demo", "Qwen/*"]}, "ok", "root")
    G.update_group(ctx, "g", weight=0.5)
    assert last()[3] == {"weight": 0.5}
    G.delete_group(ctx, "h", force=True)
    assert last()[:4] == ("group.delete", "group", "h", {"members": ["ann"]})
    _, rec = K.create_key(ctx, name="k", user="bo", models=["demo"],
                          expires=dt.timedelta(days=1))
    assert last()[:3] == ("key.create", "key", str(rec.id))
    assert last()[3] == {"name": "k", "user": "bo", "prefix": rec.prefix, "models": ["demo"],
                         "expires_at": rec.expires_at.isoformat() + "Z"}
    _, rot = K.rotate_key(ctx, rec.id, overlap=dt.timedelta(minutes=5))
    assert last()[:4] == ("key.rotate", "key", str(rec.id), {
        "old_prefix": rec.prefix, "prefix": rot.prefix, "overlap_s": 300.0})
    revoked = K.revoke_key(ctx, rec.id)
    assert last()[:4] == ("key.revoke", "key", str(rec.id), {"prefix": rot.prefix})
    assert revoked.id == rec.id and revoked.revoked_at is not None


@pytest.mark.parametrize(("call", "param"), [
    (lambda c: U.create_user(c, "default"), "name"),
    (lambda c: U.create_user(c, "x", groups=["nope"]), "groups"),
    (lambda c: U.create_user(c, "x", role="owner"), "role"),
    (lambda c: U.update_user(c, "default", role="admin"), "role"),
    (lambda c: U.update_user(c, "nobody"), "user"),
    (lambda c: U.delete_user(c, "admin"), "user"),
    (lambda c: G.create_group(c, "g", weight=-1), "weight"),
    (lambda c: G.create_group(c, "g", models=[""]), "models"),
    (lambda c: G.create_group(c, "g h"), "name"),
    (lambda c: G.get_group(c, "nope"), "group"),
    (lambda c: K.rotate_key(c, 1, overlap=dt.timedelta(seconds=-1)), "overlap"),
    (lambda c: K.get_key(c, 424242), "id"),
    (lambda c: audit.list_entries(c, limit=1001), "limit"),
])
def test_refusals_name_the_field(ctx, call, param):
    with pytest.raises(GatewayError) as e:
        call(ctx)
    assert e.value.param == param


def test_deleting_a_user_who_owns_keys_names_the_field(ctx):
    U.create_user(ctx, "kim")
    U.create_user(ctx, "lee", role="admin")
    K.create_key(ctx, name="k", user="lee")
    with pytest.raises(Conflict) as e:
        U.delete_user(ctx, "lee")
    assert e.value.param == "user" and "1 key" in e.value.message
    G.create_group(ctx, "g")
    U.update_user(ctx, "kim", add_groups=["g"])
    with pytest.raises(Conflict) as e:
        G.delete_group(ctx, "g")
    assert e.value.param == "group"


@pytest.mark.parametrize(("value", "ok"), [
    (1, True), (0.001, True), (1e6, True), (1e6 + 1, False), (0, False), (-1, False),
    (float("inf"), False), (float("nan"), False), (True, False), ("2", False), (None, False),
])
def test_weights(ctx, value, ok):
    if ok:
        assert G.create_group(ctx, "g", weight=value).weight == float(value)
    else:
        with pytest.raises(InvalidRequest):
            G.create_group(ctx, "g", weight=value)


@pytest.mark.parametrize(("overlap", "ok"), [
    (dt.timedelta(0), True), (dt.timedelta(days=30), True),
    (dt.timedelta(days=30, seconds=1), False), (dt.timedelta(seconds=-1), False),
])
def test_overlaps(ctx, overlap, ok):
    _, rec = K.create_key(ctx, name="k")
    if ok:
        _, r = K.rotate_key(ctx, rec.id, overlap=overlap)
        assert (r.previous_digest is not None) == bool(overlap)
    else:
        with pytest.raises(InvalidRequest):
            K.rotate_key(ctx, rec.id, overlap=overlap)


def test_audit_listing_filters_and_pages(ctx):
    for i in range(5):
        G.create_group(ctx, f"g{i}")
    rows = audit.list_entries(ctx)
    assert [r.object_id for r in rows] == ["g4", "g3", "g2", "g1", "g0"]
    assert [r.object_id for r in audit.list_entries(ctx, limit=2, before_id=rows[1].id)] == [
        "g2", "g1"]
    assert audit.list_entries(ctx, since=repo.utcnow() + dt.timedelta(minutes=1)) == []
    assert len(audit.list_entries(ctx, since=repo.utcnow() - dt.timedelta(minutes=1))) == 5
    assert len(audit.list_entries(ctx, limit=1000)) == 5
    assert [r.actor for r in audit.list_entries(ctx, actor="root")] == ["root"] * 5
    as_json = audit.as_json(rows[0])
    assert as_json["action"] == "group.create" and as_json["at"].endswith("Z")


def test_a_refusal_is_recorded_under_the_callers_name_and_object_kind(ctx):
    with pytest.raises(PermissionDenied) as e:
        authz.authorize(ctx, ALICE, "group.delete", None, object_id="g")
    assert "group.delete" in e.value.message
    with pytest.raises(PermissionDenied) as e:
        authz.authorize(ctx, ALICE, "key.create", "alice", ("name", "role", "admin"))
    assert e.value.param == "admin" and "admin, role" in e.value.message
    rows = audit.list_entries(ctx, limit=2)
    assert [(r.action, r.object_type, r.object_id) for r in rows] == [
        ("key.create", "key", "alice"), ("group.delete", "group", "g")]
    assert rows[0].detail == {"code": "forbidden", "fields": ["admin", "name", "role"]}


def test_model_access_equality_and_hash():
    from fleetgate.auth.access import ModelAccess

    a, b, c = ModelAccess([["x"]]), ModelAccess([["x"]]), ModelAccess([["y"]])
    assert a == b and hash(a) == hash(b) and a != c and hash(a) != hash(c)
    assert a != (("x",),) and "x" in repr(a)


def test_an_expired_key_is_not_rotated_and_an_ownerless_key_lists_under_its_builtin_user(
        ctx, engine):
    from sqlalchemy import update

    from fleetgate.store.tables import api_keys

    _, rec = K.create_key(ctx, name="k")
    with engine.begin() as c:
        c.execute(update(api_keys).where(api_keys.c.id == rec.id).values(
            expires_at=repo.utcnow() - dt.timedelta(seconds=1), user_id=None, admin=True))
    with pytest.raises(Conflict, match="expired") as e:
        K.rotate_key(ctx, rec.id)
    assert e.value.param == "id"
    v = K.get_key(ctx, rec.id)
    assert (v.user, v.status) == ("admin", "expired")


def test_each_call_returns_the_object_it_named(ctx):
    for n in ("a", "b", "c"):
        assert G.create_group(ctx, n).name == n
    assert G.get_group(ctx, "b").name == "b"
    assert G.update_group(ctx, "c", weight=4).name == "c"
    assert G.get_group(ctx, "a").weight == 1.0  # the default weight
    for n in ("zed", "yan"):
        U.create_user(ctx, n)
    assert U.set_enabled(ctx, "zed", False).name == "zed"
    assert U.get_user(ctx, "yan").name == "yan"


def test_listing_defaults_to_the_newest_hundred(ctx):
    with ctx.engine.begin() as conn:
        for i in range(101):
            repo.insert_audit(conn, actor="cli", actor_key_id=None, action="x", object_type="t",
                              object_id=str(i), detail=None, outcome="ok")
    rows = audit.list_entries(ctx)
    assert len(rows) == 100 and rows[0].object_id == "100" and rows[-1].object_id == "1"


def test_json_views(ctx):
    G.create_group(ctx, "g", models=["demo"], weight=2)
    U.create_user(ctx, "ann", groups=["g"], models=["demo"])
    _, rec = K.create_key(ctx, name="k", user="ann", expires=dt.timedelta(days=1))
    gj, uj = G.as_json(G.get_group(ctx, "g")), U.as_json(U.get_user(ctx, "ann"))
    assert {k: gj[k] for k in ("name", "models", "weight", "members")} == {
        "name": "g", "models": ["demo"], "weight": 2.0, "members": ["ann"]}
    assert {k: uj[k] for k in ("name", "role", "source", "groups", "models", "enabled")} == {
        "name": "ann", "role": "user", "source": "local", "groups": ["g"], "models": ["demo"],
        "enabled": True}
    assert U.as_json(U.get_user(ctx, "default"))["models"] is None
    for j in (gj, uj):
        assert j["created_at"].endswith("Z") and j["updated_at"].endswith("Z")
    kj = K.as_json(K.get_key(ctx, rec.id))
    assert {k: kj[k] for k in ("id", "user", "name", "prefix", "models", "status", "revoked_at",
                               "rotated_at", "previous_valid_until", "last_used_at")} == {
        "id": rec.id, "user": "ann", "name": "k", "prefix": rec.prefix, "models": None,
        "status": "active", "revoked_at": None, "rotated_at": None,
        "previous_valid_until": None, "last_used_at": None}
    assert kj["expires_at"] == rec.expires_at.isoformat() + "Z"
    assert kj["created_at"] == rec.created_at.isoformat() + "Z"
    r = audit.list_entries(ctx, limit=1)[0]
    assert audit.as_json(r) == {
        "id": r.id, "at": r.at.isoformat() + "Z", "actor": "root", "actor_key_id": 7,
        "action": "key.create", "object_type": "key", "object_id": str(rec.id),
        "detail": r.detail, "outcome": "ok"}


def test_an_ownerless_plain_key_lists_under_default(ctx, engine):
    from sqlalchemy import update

    from fleetgate.store.tables import api_keys

    _, rec = K.create_key(ctx, name="k")
    with engine.begin() as c:
        c.execute(update(api_keys).where(api_keys.c.id == rec.id).values(user_id=None))
    assert K.get_key(ctx, rec.id).user == "default"
