"""The portal in process (httpx over ASGI) with a real slapd: sign-in, sessions, CSRF, brute
force, admin pages, keys, and the LDAP account rules (groups, required group, local names).
"""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import ldap_doc
from helpers import settings_for
from ldap_server import Slapd
from sqlalchemy import update

from fleetgate.app import Gateway, create_app
from fleetgate.localnet import free_port
from fleetgate.portal.routes import GENERIC_REFUSAL
from fleetgate.services import Context, accounts, audit
from fleetgate.services import groups as group_svc
from fleetgate.services import users as user_svc
from fleetgate.store import repo
from fleetgate.store.tables import portal_sessions

CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


def portal_settings(tmp: Path, sim_url: str, slapd: Slapd, **ldap_over: Any) -> Any:
    return settings_for(tmp, sim_url, portal={"enabled": True,
                                              "public_url": "http://llm.example.org"},
                        ldap=ldap_doc(slapd, **ldap_over))


class Portal:
    def __init__(self, app: Gateway, client: httpx.AsyncClient) -> None:
        self.app, self.client = app, client
        self.ctx = Context(app.engine, app.settings)

    async def login(self, user: str, password: str, **kw: Any) -> httpx.Response:
        page = await self.client.get("/portal/login")
        token = CSRF.search(page.text).group(1)  # type: ignore[union-attr]
        return await self.client.post("/portal/login", data={
            "username": user, "password": password, "csrf_token": token}, **kw)

    async def csrf(self, path: str = "/portal/keys") -> str:
        page = await self.client.get(path)
        assert page.status_code == 200, page.text
        return CSRF.search(page.text).group(1)  # type: ignore[union-attr]


def session(sid: str) -> dict[str, str]:
    """Headers that send only this session id (an explicit Cookie header beats the jar)."""
    return {"cookie": f"fleetgate_session={sid}"}


async def _portal(app: Gateway, base_url: str = "http://gw") -> AsyncIterator[Portal]:
    await app.startup()
    transport = httpx.ASGITransport(app=app, client=("10.1.2.3", 5555))
    async with httpx.AsyncClient(transport=transport, base_url=base_url) as client:
        yield Portal(app, client)
    await app.shutdown()


@pytest.fixture
async def portal(tmp_path: Path, sim_url: str, slapd: Slapd) -> AsyncIterator[Portal]:
    app = create_app(portal_settings(tmp_path, sim_url, slapd))
    ctx = Context(app.engine, app.settings)
    async for p in _portal(app):
        group_svc.create_group(ctx, "research", models=["sim"])
        group_svc.create_group(ctx, "gpu", models=["other"])
        group_svc.create_group(ctx, "manual", models=[])
        user_svc.create_user(ctx, "dora")
        accounts.set_password(ctx, "dora", "dora-password")
        accounts.set_password(ctx, "admin", "admin-password")
        yield p


# -- sign-in ------------------------------------------------------------------------------------

async def test_a_good_sign_in_is_a_303_with_a_safe_session_cookie(portal: Portal) -> None:
    r = await portal.login("dora", "dora-password")
    assert r.status_code == 303 and r.headers["location"] == "/portal/"
    cookie = next(c for c in r.headers.get_list("set-cookie")
                  if c.startswith("fleetgate_session="))
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Path=/" in cookie
    assert "Secure" not in cookie  # public_url is http here
    page = await portal.client.get("/portal/")
    assert page.status_code == 200 and "My models" in page.text and "dora" in page.text


async def test_the_cookie_is_secure_when_the_public_url_is_https(
    tmp_path: Path, sim_url: str, slapd: Slapd
) -> None:
    s = portal_settings(tmp_path, sim_url, slapd)
    s = s.model_copy(update={"portal": s.portal.model_copy(
        update={"public_url": "https://llm.example.org"})})
    async for p in _portal(create_app(s), "https://gw"):  # a Secure cookie needs https
        r = await p.login("alice", "alice-pw")
        assert r.status_code == 303
        assert "; Secure" in r.headers["set-cookie"]


@pytest.mark.parametrize("user,password", [
    ("dora", "wrong-password"), ("nobody", "dora-password"), ("alice", "bob-pw"),
])
async def test_a_failed_sign_in_is_a_401_that_does_not_say_whether_the_user_exists(
    portal: Portal, user: str, password: str
) -> None:
    r = await portal.login(user, password)
    assert r.status_code == 401
    assert GENERIC_REFUSAL in r.text and 'action="/portal/login"' in r.text
    assert "fleetgate_session=" not in r.headers.get("set-cookie", "")


async def test_repeated_failures_are_refused_per_user_name_and_per_address(
    portal: Portal,
) -> None:
    for _ in range(5):
        assert (await portal.login("dora", "wrong-password")).status_code == 401
    # Now even the right password is refused for that name, with no hint of why beyond waiting.
    r = await portal.login("dora", "dora-password")
    assert r.status_code == 429 and "Too many" in r.text
    # Another name from the same address still works until the address's own limit.
    assert (await portal.login("alice", "alice-pw")).status_code == 303
    for i in range(20):
        await portal.login(f"guess{i}", "wrong-password")
    assert (await portal.login("carol", "carol-pw")).status_code == 429


async def test_the_sign_in_form_needs_its_csrf_token(portal: Portal) -> None:
    await portal.client.get("/portal/login")  # sets the form's cookie
    for data in ({"username": "dora", "password": "dora-password"},
                 {"username": "dora", "password": "dora-password", "csrf_token": "forged"}):
        r = await portal.client.post("/portal/login", data=data)
        assert r.status_code == 403
        assert "fleetgate_session=" not in r.headers.get("set-cookie", "")


async def test_the_session_id_is_rotated_at_sign_in(portal: Portal) -> None:
    await portal.login("dora", "dora-password")
    first = portal.client.cookies["fleetgate_session"]
    await portal.login("dora", "dora-password")
    second = portal.client.cookies["fleetgate_session"]
    assert first != second
    stale = await portal.client.get("/portal/keys", headers=session(first))
    assert stale.status_code == 303 and stale.headers["location"] == "/portal/login"


# -- sessions and CSRF --------------------------------------------------------------------------

async def test_forms_without_or_with_a_wrong_csrf_token_are_refused(portal: Portal) -> None:
    await portal.login("dora", "dora-password")
    await portal.csrf()
    for extra in ({}, {"csrf_token": "not-the-token"}, {"csrf_token": ""}):
        r = await portal.client.post("/portal/keys/create",
                                     data={"name": "sneaky", "expires": "30d", **extra})
        assert r.status_code == 403 and "CSRF" in r.text
        assert r.headers["content-type"].startswith("text/html")
    keys = await portal.client.get("/portal/keys")
    assert "sneaky" not in keys.text


async def test_a_session_past_its_expiry_is_refused(portal: Portal) -> None:
    await portal.login("dora", "dora-password")
    token = await portal.csrf()
    with portal.app.engine.begin() as c:
        c.execute(update(portal_sessions).values(expires_at=repo.utcnow()))
    r = await portal.client.get("/portal/keys")
    assert r.status_code == 303 and r.headers["location"] == "/portal/login"
    r = await portal.client.post("/portal/keys/create",
                                 data={"name": "late", "expires": "30d", "csrf_token": token})
    assert r.status_code == 401 and "sign in again" in r.text


async def test_sign_out_ends_the_session(portal: Portal) -> None:
    await portal.login("dora", "dora-password")
    sid = portal.client.cookies["fleetgate_session"]
    token = await portal.csrf()
    r = await portal.client.post("/portal/logout", data={"csrf_token": token})
    assert r.status_code == 303 and r.headers["location"] == "/portal/login"
    assert "Max-Age=0" in r.headers["set-cookie"]
    again = await portal.client.get("/portal/", headers=session(sid))
    assert again.status_code == 303


async def test_no_session_redirects_to_sign_in_and_root_redirects_to_the_portal(
    portal: Portal,
) -> None:
    assert (await portal.client.get("/portal/usage")).headers["location"] == "/portal/login"
    root = await portal.client.get("/")
    assert root.status_code == 303 and root.headers["location"] == "/portal/"
    # The API keeps its own JSON errors.
    api = await portal.client.get("/v1/fleet/status")
    assert api.status_code == 401 and api.json()["error"]["code"] == "missing_api_key"


# -- admin pages --------------------------------------------------------------------------------

def admin_paths(app: Gateway) -> list[tuple[str, str]]:
    return [(r.method, r.path) for r in app.router.routes if r.path.startswith("/portal/admin/")
            ] + [("POST", "/portal/models/stop")]


async def test_a_user_is_refused_every_admin_page(portal: Portal) -> None:
    await portal.login("dora", "dora-password")
    token = await portal.csrf()
    paths = admin_paths(portal.app)
    assert len(paths) >= 6
    for method, path in paths:
        if method == "GET":
            r = await portal.client.get(path)
        else:
            r = await portal.client.post(path, data={"csrf_token": token, "model": "sim"})
        assert r.status_code == 403, (method, path)
        assert r.headers["content-type"].startswith("text/html")
    denied = [e for e in audit.list_entries(portal.ctx, limit=100) if e.outcome == "denied"]
    assert {e.object_id for e in denied} >= {p for m, p in paths if m == "GET"}


async def test_an_admin_sees_every_admin_page(portal: Portal) -> None:
    await portal.login("admin", "admin-password")
    for method, path in admin_paths(portal.app):
        if method == "GET":
            r = await portal.client.get(path)
            assert r.status_code == 200, path
    users = await portal.client.get("/portal/admin/users")
    assert "dora" in users.text and "research" in users.text


# -- keys ---------------------------------------------------------------------------------------

NEW_KEY = re.compile(r'id="new-key">(fg-[^<]+)<')
FORM_TOKEN = re.compile(r'name="form_token" value="([^"]+)"')


async def key_form(portal: Portal, name: str, expires: str = "30d") -> dict[str, str]:
    """The create form as the keys page renders it, filled in: CSRF and one-time token."""
    page = await portal.client.get("/portal/keys")
    return {"name": name, "expires": expires,
            "csrf_token": CSRF.search(page.text).group(1),  # type: ignore[union-attr]
            "form_token": FORM_TOKEN.search(page.text).group(1)}  # type: ignore[union-attr]


async def create_key(portal: Portal, name: str) -> tuple[httpx.Response, str]:
    """Post the create form and follow its 303 by hand: (the POST's answer, the new key)."""
    r = await portal.client.post("/portal/keys/create", data=await key_form(portal, name))
    assert r.status_code == 303, r.text
    shown = await portal.client.get(r.headers["location"])
    assert shown.status_code == 200 and shown.headers["cache-control"] == "no-store"
    return r, NEW_KEY.search(shown.text).group(1)  # type: ignore[union-attr]


def keys_named(portal: Portal, user: str, name: str) -> list[Any]:
    from fleetgate.services import keys as key_svc

    return [v for v in key_svc.list_keys(portal.ctx, user=user) if v.key.name == name]


async def test_a_new_key_is_shown_once_and_works(portal: Portal) -> None:
    await portal.login("alice", "alice-pw")
    r, key = await create_key(portal, "laptop")
    chat = await portal.client.post(
        "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
        json={"model": "sim", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert chat.status_code == 200
    later = await portal.client.get("/portal/keys")
    assert key not in later.text and "laptop" in later.text and key[:9] in later.text
    await portal.app.usage.flush()
    usage = await portal.client.get("/portal/usage")
    assert usage.status_code == 200 and "<svg" in usage.text
    row = re.search(r"<td><code>sim</code></td><td>(\d+)</td><td>(\d+)</td><td>(\d+)</td>",
                    usage.text)
    assert row is not None and row.group(1) == "1" and int(row.group(3)) > 0


async def test_a_user_cannot_revoke_someone_elses_key(portal: Portal) -> None:
    from fleetgate.services import keys as key_svc

    _, rec = key_svc.create_key(portal.ctx, name="doras", user="dora")
    await portal.login("alice", "alice-pw")
    token = await portal.csrf()
    r = await portal.client.post("/portal/keys/revoke",
                                 data={"id": str(rec.id), "csrf_token": token})
    assert r.status_code == 404
    assert key_svc.get_key(portal.ctx, rec.id).status == "active"


# -- LDAP accounts ------------------------------------------------------------------------------

async def test_first_ldap_sign_in_makes_the_user_with_mapped_groups(portal: Portal) -> None:
    assert (await portal.login("alice", "alice-pw")).status_code == 303
    u = user_svc.get_user(portal.ctx, "alice")
    assert u.source == "ldap" and u.role == "user" and set(u.groups) == {"research", "gpu"}
    models = await portal.client.get("/portal/")
    assert "<code>sim</code>" in models.text and "<code>other</code>" in models.text


async def test_mapped_groups_follow_the_directory_and_manual_ones_stay(
    portal: Portal, slapd: Slapd
) -> None:
    await portal.login("alice", "alice-pw")
    user_svc.update_user(portal.ctx, "alice", add_groups=["manual"])
    # The directory mapping changes: gpu-power no longer maps to anything.
    narrower = ldap_doc(slapd, group_map={ldap_doc(slapd)["required_group"]: "research"})
    s = portal.app.settings.model_copy(
        update={"ldap": type(portal.app.settings.ldap).model_validate(narrower)})
    from fleetgate.auth.ldap import Directory

    ident = Directory(s.ldap).authenticate("alice", "alice-pw")  # type: ignore[arg-type]
    u = accounts.ldap_signin(Context(portal.app.engine, s), ident)
    assert set(u.groups) == {"research", "manual"}


async def test_required_group_refuses_everyone_outside_it(portal: Portal) -> None:
    r = await portal.login("bob", "bob-pw")
    assert r.status_code == 403 and "not in the group" in r.text
    assert "fleetgate_session=" not in r.headers.get("set-cookie", "")


async def test_an_ldap_sign_in_never_reaches_an_unlinked_local_account(portal: Portal) -> None:
    # The directory has an 'admin' entry; FleetGate's built-in 'admin' is a local admin.
    r = await portal.login("admin", "admin-pw")
    assert r.status_code == 403 and "--link-ldap" in r.text
    assert user_svc.get_user(portal.ctx, "admin").source == "local"
    accounts.link_ldap(portal.ctx, "admin")
    assert (await portal.login("admin", "admin-pw")).status_code == 303


async def test_an_empty_password_never_reaches_a_bind(portal: Portal, slapd: Slapd) -> None:
    def binds() -> int:
        return slapd.log_text().count('BIND dn="uid=carol,')

    before = binds()
    r = await portal.login("carol", "")
    assert r.status_code == 401
    await asyncio.sleep(0.05)
    assert binds() == before
    assert (await portal.login("carol", "carol-pw")).status_code == 303
    await asyncio.sleep(0.05)
    assert binds() > before  # the check above would have seen one


@pytest.mark.parametrize("name", ["*)(uid=*", "admin)(|(uid=*", "alice\x00", "*"])
async def test_injection_user_names_sign_nobody_in(portal: Portal, name: str) -> None:
    r = await portal.login(name, "alice-pw")
    assert r.status_code == 401 and GENERIC_REFUSAL in r.text
    assert {u.name for u in user_svc.list_users(portal.ctx)} == {"default", "admin", "dora"}


async def test_a_directory_that_is_down_gives_a_clear_message(
    tmp_path: Path, sim_url: str, slapd: Slapd
) -> None:
    s = portal_settings(tmp_path, sim_url, slapd, url=f"ldaps://localhost:{free_port()}")
    async for p in _portal(create_app(s)):
        r = await p.login("alice", "alice-pw")
        assert r.status_code == 503 and "directory can" in r.text


async def test_a_silent_directory_times_out_with_a_message(
    tmp_path: Path, sim_url: str, slapd: Slapd
) -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"ldaps://localhost:{silent.getsockname()[1]}"
        s = portal_settings(tmp_path, sim_url, slapd, url=url, timeout_s=1)
        async for p in _portal(create_app(s)):
            r = await p.login("alice", "alice-pw")
            assert r.status_code == 503 and "did not answer in time" in r.text
            # The event loop was never blocked: another page answered meanwhile.
            assert (await p.client.get("/portal/login")).status_code == 200


async def test_portal_errors_are_html_and_api_errors_stay_json(portal: Portal) -> None:
    missing = await portal.client.get("/portal/no-such-page")
    assert missing.status_code == 404 and missing.headers["content-type"].startswith("text/html")
    wrong = await portal.client.delete("/portal/keys")
    assert wrong.status_code == 405 and "GET" in wrong.headers["allow"]
    assert wrong.headers["content-type"].startswith("text/html")
    api = await portal.client.get("/v1/no-such-route")
    assert api.status_code == 404 and api.json()["error"]["code"] == "unknown_url"


async def test_a_user_may_start_a_model_they_may_use_and_no_other(portal: Portal) -> None:
    await portal.login("dora", "dora-password")  # dora is in no group: no model
    token = await portal.csrf()
    r = await portal.client.post("/portal/models/start", data={"csrf_token": token,
                                                               "model": "sim"})
    assert r.status_code == 403
    await portal.login("alice", "alice-pw")  # research: sim
    token = await portal.csrf()
    r = await portal.client.post("/portal/models/start", data={"csrf_token": token,
                                                               "model": "sim"})
    assert r.status_code == 303 and r.headers["location"] == "/portal/"
    r = await portal.client.post("/portal/models/start", data={"csrf_token": token,
                                                               "model": "nope"})
    assert r.status_code == 404 and "does not exist" in r.text


async def test_the_usage_page_shows_quotas_and_what_is_left(portal: Portal) -> None:
    from fleetgate.services import keys as key_svc
    from fleetgate.store.tables import groups, users

    await portal.login("alice", "alice-pw")
    with portal.app.engine.begin() as c:
        c.execute(update(users).where(users.c.name == "alice")
                  .values(quota_tokens=1000, quota_period="day"))
        c.execute(update(groups).where(groups.c.name == "research")
                  .values(quota_tokens=50000, quota_period="month"))
    key, _ = key_svc.create_key(portal.ctx, name="q", user="alice")
    chat = await portal.client.post(
        "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
        json={"model": "sim", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5})
    assert chat.status_code == 200, chat.text
    used = chat.json()["usage"]["total_tokens"]
    await portal.app.usage.flush()
    page = await portal.client.get("/portal/usage")
    assert f"<th scope=\"row\">user alice</th><td>1,000 / day</td><td>{used}</td>" \
           f"<td>{1000 - used:,}</td>" in page.text
    assert "group research</th><td>50,000 / month</td>" in page.text


# -- keys: POST/redirect/GET, shown once --------------------------------------------------------

async def test_create_answers_303_and_a_reload_neither_shows_the_key_nor_makes_another(
    portal: Portal, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    await portal.login("alice", "alice-pw")
    form = await key_form(portal, "laptop")
    r = await portal.client.post("/portal/keys/create", data=form)
    assert r.status_code == 303 and r.content == b""
    location = r.headers["location"]
    [view] = keys_named(portal, "alice", "laptop")
    assert location == f"/portal/keys?created={view.key.id}"
    first = await portal.client.get(location)
    key = NEW_KEY.search(first.text).group(1)  # type: ignore[union-attr]
    assert key.startswith(view.key.prefix) and "Copy it now" in first.text
    assert key not in location and key not in str(r.headers)
    # The reload: the same GET again. The list, a note, no value, no second key.
    again = await portal.client.get(location)
    assert again.status_code == 200
    assert key not in again.text and 'id="new-key"' not in again.text
    assert "was shown once" in again.text and "laptop" in again.text
    assert len(keys_named(portal, "alice", "laptop")) == 1
    assert key not in caplog.text


async def test_the_same_create_form_posted_twice_makes_one_key(portal: Portal) -> None:
    await portal.login("alice", "alice-pw")
    form = await key_form(portal, "twice")
    # A double click: both posts in flight at once, then a resend of the same form later.
    a, b = await asyncio.gather(portal.client.post("/portal/keys/create", data=form),
                                portal.client.post("/portal/keys/create", data=form))
    c = await portal.client.post("/portal/keys/create", data=form)
    assert a.status_code == b.status_code == c.status_code == 303
    assert a.headers["location"] == b.headers["location"] == c.headers["location"]
    assert len(keys_named(portal, "alice", "twice")) == 1
    shown = await portal.client.get(a.headers["location"])
    assert NEW_KEY.search(shown.text) is not None  # the first post's key, still shown once
    # A fresh form (a new token) is a new key, even with the same name.
    await create_key(portal, "twice")
    assert len(keys_named(portal, "alice", "twice")) == 2


async def test_a_new_key_is_shown_only_to_the_session_that_made_it(portal: Portal) -> None:
    await portal.login("alice", "alice-pw")
    r = await portal.client.post("/portal/keys/create", data=await key_form(portal, "mine"))
    location = r.headers["location"]
    mine = portal.client.cookies["fleetgate_session"]
    # The same user signed in elsewhere (another session) follows the same address.
    transport = httpx.ASGITransport(app=portal.app, client=("10.9.9.9", 5555))
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as other:
        elsewhere = Portal(portal.app, other)
        assert (await elsewhere.login("alice", "alice-pw")).status_code == 303
        page = await other.get(location)
        assert page.status_code == 200 and 'id="new-key"' not in page.text
    shown = await portal.client.get(location, headers=session(mine))
    assert NEW_KEY.search(shown.text) is not None


async def test_rotate_answers_303_shows_the_new_value_once_and_rotates_once(
    portal: Portal,
) -> None:
    from fleetgate.services import keys as key_svc

    await portal.login("alice", "alice-pw")
    _, old = await create_key(portal, "rotating")
    [view] = keys_named(portal, "alice", "rotating")
    page = await portal.client.get("/portal/keys")
    rotate_form = re.search(
        r'action="/portal/keys/rotate".*?name="form_token" value="([^"]+)">'
        rf'<input type="hidden" name="id" value="{view.key.id}">', page.text, re.S)
    assert rotate_form is not None
    form = {"csrf_token": CSRF.search(page.text).group(1),  # type: ignore[union-attr]
            "form_token": rotate_form.group(1), "id": str(view.key.id)}
    a, b = await asyncio.gather(portal.client.post("/portal/keys/rotate", data=form),
                                portal.client.post("/portal/keys/rotate", data=form))
    assert a.status_code == b.status_code == 303
    location = a.headers["location"]
    assert location == b.headers["location"] == f"/portal/keys?rotated={view.key.id}"
    shown = await portal.client.get(location)
    new = NEW_KEY.search(shown.text).group(1)  # type: ignore[union-attr]
    assert new != old and new not in location and "new value of key rotating" in shown.text
    assert key_svc.get_key(portal.ctx, view.key.id).key.prefix == new[:len(view.key.prefix)]
    again = await portal.client.get(location)
    assert new not in again.text and "was shown once" in again.text
    rotations = [e for e in audit.list_entries(portal.ctx, limit=100)
                 if e.action == "key.rotate" and e.object_id == str(view.key.id)]
    assert len(rotations) == 1


async def test_bad_create_and_rotate_forms_keep_their_error_pages(portal: Portal) -> None:
    await portal.login("alice", "alice-pw")
    form = await key_form(portal, "later", expires="7d")
    r = await portal.client.post("/portal/keys/create", data=form)
    assert r.status_code == 400 and "Pick an expiry" in r.text
    assert r.headers["content-type"].startswith("text/html")
    # The failed post is not remembered: the same form, put right, makes the key.
    r = await portal.client.post("/portal/keys/create", data={**form, "expires": "30d"})
    assert r.status_code == 303 and len(keys_named(portal, "alice", "later")) == 1
    r = await portal.client.post("/portal/keys/create",
                                 data=await key_form(portal, " "))
    assert r.status_code == 400
    token = await portal.csrf()
    r = await portal.client.post("/portal/keys/rotate", data={"csrf_token": token, "id": "x"})
    assert r.status_code == 400 and "No key was chosen" in r.text
    r = await portal.client.post("/portal/keys/rotate", data={"csrf_token": token, "id": "999"})
    assert r.status_code == 404


async def test_a_made_up_created_address_shows_no_note(portal: Portal) -> None:
    from fleetgate.services import keys as key_svc

    _, rec = key_svc.create_key(portal.ctx, name="doras", user="dora")
    await portal.login("alice", "alice-pw")
    for q in (f"created={rec.id}", "created=nope", "rotated=-1"):
        page = await portal.client.get(f"/portal/keys?{q}")
        assert page.status_code == 200 and "was shown once" not in page.text
        assert "doras" not in page.text
