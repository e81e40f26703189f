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
