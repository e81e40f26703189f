"""The portal end to end in a real browser: Debian's chromium driven by Playwright, against a
real ``fleetgate serve`` (a simulator behind it) and a real slapd.

A user who exists only in the directory signs in, creates a key, copies the example code from
the Get started page (through the page's own Copy button and the clipboard), runs it unchanged
with the official ``openai`` client, sees the request on the usage page, revokes the key and sees
the client fail with ``AuthenticationError``. Creating and rotating a key are POST/redirect/GET:
a reload shows the list without the value and makes or rotates nothing, and the same form sent
twice makes one key. An admin (a local account whose password was set
with ``fleetgate users set-password``) sees the admin pages. Screenshots of the main pages are
taken on every run; with ``FLEETGATE_SCREENSHOTS=1`` they replace ``docs/img/portal-*.png`` (the
README's), otherwise they go to a temporary folder, so a test run leaves the tree clean.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml
from conftest import ldap_doc
from helpers import FLEETGATE, free_port, gateway, sim
from ldap_server import Slapd

CHROMIUM = "/usr/bin/chromium"
SHOTS = (
    Path(__file__).resolve().parents[2] / "docs" / "img"
    if os.environ.get("FLEETGATE_SCREENSHOTS") == "1"
    else Path(tempfile.gettempdir()) / f"fleetgate-portal-shots-{os.getpid()}"
)

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason="Debian's chromium is not installed (scripts/test.sh)")


def cli(cfg: Path, *args: str, stdin: str | None = None) -> str:
    out = subprocess.run([*FLEETGATE, *args, "--config", str(cfg)], input=stdin, check=True,
                         capture_output=True, text=True, timeout=60)
    return out.stdout


def until(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, slapd: Slapd) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("portal-e2e")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with sim("engine", "--ttft-ms", "0", "--tokens-per-s", "0") as sim_url:
        cfg = tmp / "gw.yaml"
        cfg.write_text(yaml.safe_dump({
            "auth": {"mode": "keys", "revocation_poll_s": 0.2},
            "store": {"url": f"sqlite:///{tmp / 'fg.db'}"},
            "portal": {"enabled": True, "public_url": url},
            "ldap": ldap_doc(slapd),
            "models": [
                {"name": "qwen-small", "served_name": "engine",
                 "backend": {"type": "static", "urls": [sim_url]}},
                {"name": "llama-big", "served_name": "engine",
                 "backend": {"type": "static", "urls": [sim_url]}},
            ],
        }))
        # The operator's one-time set-up: groups the directory's groups map to, an admin login.
        cli(cfg, "groups", "create", "research", "--models", "qwen-small,llama-big")
        cli(cfg, "groups", "create", "gpu", "--models", "llama-big")
        cli(cfg, "users", "set-password", "admin", stdin="admin-password-1\n")
        with gateway(cfg, port) as gw_url:
            yield {"url": gw_url, "cfg": cfg}


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-background-networking", "--disable-gpu"])
        try:
            yield b
        finally:
            b.close()


def new_page(browser: Any, url: str, width: int = 1100) -> Any:
    ctx = browser.new_context(viewport={"width": width, "height": 800})
    ctx.grant_permissions(["clipboard-read", "clipboard-write"], origin=url)
    page = ctx.new_page()
    page.set_default_timeout(15_000)
    return page


def sign_in(page: Any, url: str, user: str, password: str) -> None:
    page.goto(url + "/")
    assert page.url.endswith("/portal/login")
    page.get_by_label("User name").fill(user)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(url + "/portal/")


def nav(page: Any, name: str) -> Any:
    return page.get_by_role("navigation", name="Main").get_by_role("link", name=name)


def shot(page: Any, name: str, **kw: Any) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"portal-{name}.png"), full_page=True, **kw)


def test_an_ldap_only_user_goes_from_sign_in_to_a_working_openai_call(
    stack: dict[str, Any], browser: Any, tmp_path: Path
) -> None:
    url = stack["url"]
    page = new_page(browser, url)
    page.goto(url + "/")
    shot(page, "login")
    sign_in(page, url, "alice", "alice-pw")
    assert page.get_by_role("heading", name="My models").is_visible()
    assert page.locator("code", has_text="qwen-small").first.is_visible()
    shot(page, "models")

    # 1. A key, shown once, copied with the page's own button.
    nav(page, "My keys").click()
    page.get_by_label("Name").fill("laptop")
    page.get_by_label("Expires after").select_option("90d")
    page.get_by_role("button", name="Create key").click()
    page.wait_for_url(re.compile(r".*/portal/keys\?created=\d+$"))  # POST, 303, GET
    key = page.locator("#new-key").inner_text().strip()
    assert key.startswith("fg-") and key not in page.url
    page.locator("button.copy[data-copy=new-key]").click()
    assert page.evaluate("navigator.clipboard.readText()") == key
    shot(page, "keys", mask=[page.locator("#new-key")])
    page.reload()  # a reload repeats the GET, not the form: no second key, no value
    assert key not in page.content() and page.locator("#shown-once").is_visible()
    assert key_rows(page, "laptop") == 1
    page.goto(url + "/portal/keys")  # any later visit: the key is gone for good
    assert key not in page.content()

    # 2. The example code, copied from Get started for the chosen model.
    nav(page, "Get started").click()
    page.get_by_label("Model").select_option("qwen-small")
    page.get_by_role("button", name="Show code for this model").click()
    page.locator("button.copy[data-copy=code-python]").click()
    code = page.evaluate("navigator.clipboard.readText()")
    assert f'"{url}/v1"' in code and '"qwen-small"' in code
    shot(page, "get-started")

    # 3. Run unchanged, as the user would, with only their key in the environment.
    script = tmp_path / "example.py"
    script.write_text(code)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    env["OPENAI_API_KEY"] = key
    run = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip()

    # 4. The request shows on the usage page (the usage writer is a batch behind).
    def usage_shows() -> bool:
        page.goto(url + "/portal/usage")
        return "qwen-small" in page.locator("#usage-table").inner_text()

    until(usage_shows, 20, "the request on the usage page")
    row = page.locator("#usage-table tbody tr", has_text="qwen-small").inner_text()
    assert "\t1\t" in row  # one request
    shot(page, "usage")

    # 5. Revoke it; the same client now fails.
    nav(page, "My keys").click()
    page.get_by_role("button", name="Revoke key laptop").click()
    assert "revoked" in page.locator("table").inner_text()
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=20)

    def refused() -> bool:
        try:
            client.chat.completions.create(
                model="qwen-small", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
            return False
        except openai.AuthenticationError:
            return True

    until(refused, 10, "the revoked key to be refused")

    # 6. Sign out: the portal is closed again.
    page.get_by_role("button", name="Sign out").click()
    page.wait_for_url(url + "/portal/login")
    page.goto(url + "/portal/keys")
    assert page.url.endswith("/portal/login")


def key_rows(page: Any, name: str) -> int:
    """How many rows of the keys table are a key with this name."""
    return int(page.locator("table tbody th[scope=row]", has_text=re.compile(
        f"^{re.escape(name)}$")).count())


def test_reload_and_double_click_make_one_key_and_rotate_once(
    stack: dict[str, Any], browser: Any
) -> None:
    url = stack["url"]
    page = new_page(browser, url)
    sign_in(page, url, "carol", "carol-pw")
    page.goto(url + "/portal/keys")
    page.get_by_label("Name").fill("double")
    # A double click whose two posts both got out: Chromium itself drops the first
    # navigation when the second click comes fast, so send the very form twice at once.
    statuses = page.evaluate("""async () => {
        const f = document.querySelector('form[action="/portal/keys/create"]');
        const post = () => fetch(f.action, {method: "POST", redirect: "manual",
                                            body: new URLSearchParams(new FormData(f))});
        return (await Promise.all([post(), post()])).map(r => r.type);
    }""")
    assert statuses == ["opaqueredirect", "opaqueredirect"]  # both answered 303
    page.get_by_role("button", name="Create key").click()  # the same form, a third time
    page.wait_for_url(re.compile(r".*/portal/keys\?created=\d+$"))
    key = page.locator("#new-key").inner_text().strip()
    assert key.startswith("fg-")
    assert key_rows(page, "double") == 1
    page.reload()
    assert key not in page.content() and key_rows(page, "double") == 1
    assert "was shown once" in page.locator("#shown-once").inner_text()

    # Rotate: the new value once, then a reload rotates nothing.
    prefix = page.locator("table tbody tr", has_text="double").locator("code").inner_text()
    page.get_by_role("button", name="Rotate key double").click()
    page.wait_for_url(re.compile(r".*/portal/keys\?rotated=\d+$"))
    new = page.locator("#new-key").inner_text().strip()
    assert new.startswith("fg-") and new != key and new not in page.url
    rotated = page.locator("table tbody tr", has_text="double").locator("code").inner_text()
    assert rotated != prefix and new.startswith(rotated.rstrip("…"))
    page.reload()
    assert new not in page.content() and page.locator("#shown-once").is_visible()
    after = page.locator("table tbody tr", has_text="double").locator("code").inner_text()
    assert after == rotated and key_rows(page, "double") == 1


def test_an_admin_sees_the_fleet_and_the_audit_log(
    stack: dict[str, Any], browser: Any
) -> None:
    url = stack["url"]
    page = new_page(browser, url)
    sign_in(page, url, "admin", "admin-password-1")
    nav(page, "Fleet").click()
    assert page.get_by_role("button", name="Stop qwen-small").is_visible()
    shot(page, "admin-fleet")
    nav(page, "Audit log").click()
    assert "key.create" in page.locator("table").inner_text()
    shot(page, "admin-audit")
    nav(page, "Users").click()
    assert "ldap" in page.locator("table").first.inner_text()


def test_a_user_is_refused_the_admin_pages_in_the_browser(
    stack: dict[str, Any], browser: Any
) -> None:
    url = stack["url"]
    page = new_page(browser, url, width=390)  # a phone's width: the pages still work
    sign_in(page, url, "carol", "carol-pw")
    assert nav(page, "Fleet").count() == 0
    shot(page, "narrow")
    for path in ("users", "keys", "usage", "audit", "models"):
        resp = page.goto(f"{url}/portal/admin/{path}")
        assert resp is not None and resp.status == 403
        assert "for admins" in page.content()

