"""Pure parts of the portal: the sign-in limiter (fake clock), cookies, the chart, passwords."""

from __future__ import annotations

import datetime as dt

import pytest

from fleetgate.auth import passwords, sessions
from fleetgate.config import parse
from fleetgate.errors import ConfigError
from fleetgate.portal.chart import Bar, stacked_bars
from fleetgate.portal.ratelimit import SigninLimiter


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_the_limiter_blocks_a_name_after_its_failures_until_the_window_ends() -> None:
    clock = Clock()
    lim = SigninLimiter(per_user=3, per_address=100, window_s=60, clock=clock)
    for _ in range(3):
        assert not lim.blocked("Ana", "1.2.3.4")
        lim.failed("Ana", "1.2.3.4")
    assert lim.blocked("ana", "5.6.7.8")  # names compare case-insensitively, any address
    clock.t += 59
    assert lim.blocked("ana", "5.6.7.8")
    clock.t += 1
    assert not lim.blocked("ana", "5.6.7.8")


def test_a_good_sign_in_clears_the_name_but_not_the_address() -> None:
    lim = SigninLimiter(per_user=2, per_address=3, window_s=60, clock=Clock())
    lim.failed("a", "ip")
    lim.failed("b", "ip")
    lim.succeeded("a")
    assert not lim.blocked("a", "other")
    lim.failed("c", "ip")
    assert lim.blocked("d", "ip")


def test_the_limiter_stays_bounded_under_a_flood_of_names() -> None:
    lim = SigninLimiter(per_user=5, per_address=10**9, max_entries=100, clock=Clock())
    for i in range(10_000):
        lim.failed(f"user{i}", "ip")
    assert len(lim._counts) <= 100
    assert lim.blocked("x", "ip") is False  # the address entry is the newest, so it is kept
    assert lim._counts["a:ip"][1] == 10_000


def test_session_cookies_are_httponly_lax_and_secure_on_https() -> None:
    c = sessions.cookie("fleetgate_session", "abc", secure=True, max_age=10, path="/").decode()
    assert c == "fleetgate_session=abc; Path=/; HttpOnly; SameSite=Lax; Max-Age=10; Secure"
    assert "Secure" not in sessions.cookie("n", "v", secure=False, max_age=None, path="/").decode()
    assert sessions.read_cookie(b"a=1; fleetgate_session=xyz; b=2", "fleetgate_session") == "xyz"
    assert sessions.read_cookie(b"fleetgate_session=", "fleetgate_session") is None
    assert not sessions.same(None, "x") and not sessions.same("", "") and sessions.same("t", "t")


def test_the_chart_is_plain_svg_with_escaped_names() -> None:
    day = dt.date(2026, 11, 1)
    svg = stacked_bars([Bar(day, "<m>", 30), Bar(day, "b", 12)], [day], "T")
    assert svg.startswith("<svg") and "<script" not in svg and "style=" not in svg
    assert "&lt;m&gt;" in svg and "<m>" not in svg
    assert ">0</text>" in svg and ">60</text>" in svg  # 42 tokens: four steps of 20, up to 80


def test_passwords_hash_and_verify() -> None:
    h = passwords.hash_password("correct horse")
    assert h.startswith("$argon2id$")
    assert passwords.verify(h, "correct horse")
    assert not passwords.verify(h, "wrong horse") and not passwords.verify(h, "")
    assert not passwords.verify(None, "correct horse") and not passwords.verify("junk", "x" * 9)
    with pytest.raises(ValueError):
        passwords.hash_password("short")


@pytest.mark.parametrize("doc,problem", [
    ({"auth": {"mode": "none"}, "portal": {"enabled": True}}, "needs auth.mode: keys"),
    ({"ldap": {"url": "ldap://x", "user_dn_template": "uid={username}"}}, "start_tls"),
    ({"ldap": {"url": "ldaps://x"}}, "exactly one of"),
    ({"ldap": {"url": "ldaps://x", "user_dn_template": "uid=x"}}, "{username}"),
    ({"ldap": {"url": "ldaps://x", "user_dn_template": "uid={username}",
               "required_group": "cn=g"}}, "group_search"),
    ({"portal": {"public_url": "ftp://x"}}, "public_url"),
])
def test_portal_and_ldap_config_errors_name_the_problem(doc: dict, problem: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse(doc)
    assert problem in str(e.value)


def test_the_search_bind_password_is_redacted(tmp_path) -> None:
    from fleetgate import config, redact

    cfg = tmp_path / "gw.yaml"
    cfg.write_text("ldap:\n  url: ldaps://x\n  search: {base: b, bind_dn: cn=r, "
                   "bind_password: 'very-secret-reader'}\n")
    config.load(cfg)
    assert "very-secret-reader" not in redact.redact("bind with very-secret-reader")


def test_every_portal_route_is_documented(tmp_path) -> None:
    from pathlib import Path

    from fleetgate.app import create_app

    app = create_app(parse({"store": {"url": f"sqlite:///{tmp_path / 'fg.db'}"},
                            "portal": {"enabled": True}}))
    docs = Path(__file__).resolve().parents[2] / "docs" / "portal.md"
    text = docs.read_text()
    portal = [r for r in app.router.routes if r.path == "/" or r.path.startswith("/portal")]
    assert len(portal) > 15
    missing = [f"{r.method} {r.path}" for r in portal if f"`{r.method} {r.path}`" not in text]
    assert not missing, f"undocumented portal routes: {missing}"


def test_set_password_and_link_ldap_from_the_cli(tmp_path) -> None:
    from click.testing import CliRunner
    from sqlalchemy import select

    from fleetgate.cli.main import cli
    from fleetgate.services import Context, accounts
    from fleetgate.store.db import open_engine
    from fleetgate.store.tables import users

    cfg = tmp_path / "gw.yaml"
    cfg.write_text(f"store: {{url: 'sqlite:///{tmp_path / 'fg.db'}'}}\n")
    runner = CliRunner()
    assert runner.invoke(cli, ["users", "create", "--config", str(cfg), "eve"]).exit_code == 0
    short = runner.invoke(cli, ["users", "set-password", "--config", str(cfg), "eve"],
                          input="short\n")
    assert short.exit_code != 0 and "at least 8" in short.output
    ok = runner.invoke(cli, ["users", "set-password", "--config", str(cfg), "eve"],
                       input="a long enough one\n")
    assert ok.exit_code == 0, ok.output
    assert "a long enough one" not in ok.output
    engine = open_engine(f"sqlite:///{tmp_path / 'fg.db'}")
    with engine.connect() as c:
        stored = c.execute(select(users.c.password_hash).where(users.c.name == "eve")).scalar()
    assert stored.startswith("$argon2id$") and "a long enough one" not in stored
    ctx = Context(engine, parse({}))
    assert accounts.local_signin(ctx, "eve", "a long enough one") is not None
    assert accounts.local_signin(ctx, "eve", "a long enough two") is None
    linked = runner.invoke(cli, ["users", "update", "--config", str(cfg), "eve", "--link-ldap"])
    assert linked.exit_code == 0 and "linked" in linked.output
    with engine.connect() as c:
        assert c.execute(select(users.c.source).where(users.c.name == "eve")).scalar() == "ldap"


# -- one-time values and forms (fleetgate.portal.once) ------------------------------------------

def test_a_flash_value_is_read_once_by_its_own_session_and_key_only() -> None:
    from fleetgate.portal.once import Flash, session_key

    me, other = session_key("sid-1"), session_key("sid-2")
    assert me != other and "sid-1" not in me
    flash = Flash(clock=Clock())
    flash.put(me, 7, "fg-secret")
    assert flash.take(other, 7) is None  # another session
    assert flash.take(me, 8) is None  # another key
    assert flash.take(me, 7) == "fg-secret"
    assert flash.take(me, 7) is None  # a reload


def test_a_flash_value_goes_after_its_ttl_and_past_the_bound() -> None:
    from fleetgate.portal.once import Flash

    clock = Clock()
    flash = Flash(ttl_s=300, max_entries=3, clock=clock)
    flash.put("s", 1, "one")
    clock.t += 299
    assert flash.take("s", 1) == "one"
    flash.put("s", 2, "two")
    clock.t += 300
    assert flash.take("s", 2) is None
    for i in range(10):
        flash.put("s", i, f"v{i}")
    assert len(flash) == 3 and flash.take("s", 0) is None and flash.take("s", 9) == "v9"


def test_sign_out_drops_only_that_sessions_values_and_a_secret_hides_its_value() -> None:
    from fleetgate.portal.once import Flash, Secret

    flash = Flash(clock=Clock())
    flash.put("a", 1, "fg-a1")
    flash.put("a", 2, "fg-a2")
    flash.put("b", 1, "fg-b1")
    flash.drop("a")
    assert flash.take("a", 1) is None and flash.take("a", 2) is None
    assert flash.take("b", 1) == "fg-b1"
    assert "fg-x" not in repr(Secret("fg-x"))


async def test_a_form_posted_twice_is_done_once_even_while_the_first_still_runs() -> None:
    import asyncio

    from fleetgate.portal.once import Submissions

    subs = Submissions(clock=Clock())
    done: list[int] = []
    gate = asyncio.Event()

    async def work() -> str:
        done.append(1)
        await gate.wait()
        return f"/portal/keys?created={len(done)}"

    first = asyncio.create_task(subs.once("s", "create", "tok", work))
    second = asyncio.create_task(subs.once("s", "create", "tok", work))
    await asyncio.sleep(0)
    gate.set()
    assert await first == await second == "/portal/keys?created=1"
    # A resend, later.
    assert await subs.once("s", "create", "tok", work) == "/portal/keys?created=1"
    assert len(done) == 1
    # Another token, or the same token from another session or for another form, is new.
    assert await subs.once("s", "create", "tok2", work) == "/portal/keys?created=2"
    assert await subs.once("t", "create", "tok", work) == "/portal/keys?created=3"
    assert await subs.once("s", "rotate 1", "tok", work) == "/portal/keys?created=4"


async def test_a_failed_form_is_forgotten_and_a_form_without_a_token_is_just_done() -> None:
    from fleetgate.errors import InvalidRequest
    from fleetgate.portal.once import Submissions

    subs = Submissions(clock=Clock())
    calls: list[str] = []

    async def bad() -> str:
        calls.append("bad")
        raise InvalidRequest("Pick an expiry from the list.")

    async def good() -> str:
        calls.append("good")
        return "/there"

    with pytest.raises(InvalidRequest):
        await subs.once("s", "create", "tok", bad)
    assert await subs.once("s", "create", "tok", good) == "/there"
    assert len(subs) == 1
    for token in ("", "x" * 65):  # none, or not one of ours: no memory, no refusal
        assert await subs.once("s", "create", token, good) == "/there"
    assert calls == ["bad", "good", "good", "good"] and len(subs) == 1


async def test_a_repeated_post_waits_only_so_long_for_the_first() -> None:
    import asyncio

    from fleetgate.errors import Unavailable
    from fleetgate.portal.once import Submissions

    subs = Submissions(wait_s=0.05, clock=Clock())
    gate = asyncio.Event()

    async def slow() -> str:
        await gate.wait()
        return "/there"

    first = asyncio.create_task(subs.once("s", "create", "tok", slow))
    await asyncio.sleep(0)
    with pytest.raises(Unavailable):
        await subs.once("s", "create", "tok", slow)
    gate.set()
    assert await first == "/there"
