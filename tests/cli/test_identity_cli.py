"""``fleetgate users``, ``groups``, ``keys`` (with owners and rotation) and ``audit``, in-process
with click's runner, as the issue's CLI contract says."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from click.testing import CliRunner

from fleetgate import config
from fleetgate.auth.authn import Authenticator
from fleetgate.cli.main import cli
from fleetgate.errors import AuthError
from fleetgate.store.db import open_engine


@pytest.fixture
def cfg(tmp_path: Path) -> str:
    p = tmp_path / "gw.yaml"
    models = "".join(
        f"  - name: {m}\n    backend: {{type: static, urls: ['http://127.0.0.1:9']}}\n"
        for m in ("Qwen/Qwen3-8B", "Qwen/Qwen3-32B", "demo")
    )
    p.write_text(f"store: {{url: 'sqlite:///{tmp_path / 'fg.db'}'}}\nmodels:\n{models}")
    return str(p)


def run(*args: str, ok: bool = True):
    r = CliRunner().invoke(cli, list(args))
    if ok:
        assert r.exit_code == 0, (args, r.output)
    return r


def refused(*args: str, reason: str, code: int = 1) -> None:
    r = run(*args, ok=False)
    assert r.exit_code == code, (args, r.output)  # 2: click's usage errors
    assert reason in r.stderr and "Traceback" not in r.output
    assert r.stdout == ""


def rows(out: str) -> list[list[str]]:
    return [ln.split() for ln in out.strip().splitlines()[1:]]


def test_groups(cfg):
    run("groups", "create", "--config", cfg, "nlp", "--models", "Qwen/*,demo", "--weight", "2")
    run("groups", "create", "--config", cfg, "empty")
    run("users", "create", "--config", cfg, "alice", "--group", "nlp")
    assert rows(run("groups", "list", "--config", cfg).stdout) == [
        ["empty", "-", "1", "-", "-"], ["nlp", "Qwen/*,demo", "2", "alice", "-"]]
    run("groups", "update", "--config", cfg, "nlp", "--weight", "0.5")
    run("groups", "update", "--config", cfg, "empty", "--models", "demo")
    assert rows(run("groups", "list", "--config", cfg).stdout) == [
        ["empty", "demo", "1", "-", "-"], ["nlp", "Qwen/*,demo", "0.5", "alice", "-"]]
    run("groups", "update", "--config", cfg, "nlp", "--models", "")
    assert rows(run("groups", "list", "--config", cfg).stdout)[1][1] == "-"
    refused("groups", "delete", "--config", cfg, "nlp", reason="still has 1 member(s)")
    run("groups", "delete", "--config", cfg, "nlp", "--force")
    run("groups", "delete", "--config", cfg, "empty")
    refused("groups", "create", "--config", cfg, "x", "--weight", "0", reason="weight")
    refused("groups", "update", "--config", cfg, "nope", "--weight", "1", reason="no group")


def test_users(cfg):
    run("groups", "create", "--config", cfg, "g1", "--models", "demo")
    run("groups", "create", "--config", cfg, "g2", "--models", "Qwen/*")
    run("users", "create", "--config", cfg, "alice", "--group", "g1", "--group", "g2",
        "--models", "demo,Qwen/Qwen3-8B")
    run("users", "create", "--config", cfg, "ops", "--role", "admin")
    table = {r[0]: r for r in rows(run("users", "list", "--config", cfg).stdout)}
    assert table["alice"][:5] == ["alice", "user", "g1,g2", "demo,Qwen/Qwen3-8B", "enabled"]
    assert table["ops"][:5] == ["ops", "admin", "-", "-", "enabled"]
    assert {"default", "admin"} <= set(table)
    run("users", "update", "--config", cfg, "alice", "--remove-group", "g1", "--models", "")
    run("users", "disable", "--config", cfg, "alice")
    table = {r[0]: r for r in rows(run("users", "list", "--config", cfg).stdout)}
    assert table["alice"][:5] == ["alice", "user", "g2", "-", "disabled"]
    run("users", "enable", "--config", cfg, "alice")
    run("users", "update", "--config", cfg, "alice", "--role", "admin", "--add-group", "g1")
    table = {r[0]: r for r in rows(run("users", "list", "--config", cfg).stdout)}
    assert table["alice"][:5] == ["alice", "admin", "g1,g2", "-", "enabled"]
    refused("users", "create", "--config", cfg, "alice", reason="already exists")
    refused("users", "create", "--config", cfg, "bob", "--group", "nope", reason="no group")
    refused("users", "update", "--config", cfg, "default", "--role", "admin", reason="built-in")
    refused("users", "disable", "--config", cfg, "nobody", reason="no user")


def test_keys_with_owners_rotation_and_listing(cfg):
    run("groups", "create", "--config", cfg, "nlp", "--models", "Qwen/*")
    run("users", "create", "--config", cfg, "alice", "--group", "nlp")
    r = run("keys", "create", "--config", cfg, "--name", "laptop", "--user", "alice",
            "--models", "Qwen/Qwen3-8B", "--expires", "30d")
    key = r.stdout.strip().splitlines()[-1]
    assert key.startswith("fg-") and len(key) == 46 and r.stdout.strip() == key
    # wider than its owner, an unknown user, an admin key for a plain user: refused on stderr
    refused("keys", "create", "--config", cfg, "--name", "x", "--user", "alice",
            "--models", "demo", reason="may not use the model 'demo'")
    refused("keys", "create", "--config", cfg, "--name", "x", "--user", "alice",
            "--models", "meta/*", reason="matches no model")
    refused("keys", "create", "--config", cfg, "--name", "x", "--user", "nobody",
            reason="no user named 'nobody'")
    refused("keys", "create", "--config", cfg, "--name", "x", "--user", "alice", "--admin",
            reason="role admin")
    run("keys", "create", "--config", cfg, "--name", "ops", "--admin")
    run("keys", "create", "--config", cfg, "--name", "plain")
    listing = run("keys", "list", "--config", cfg).stdout
    assert key not in listing and key[:9] in listing
    assert listing.splitlines()[0].split()[:4] == ["ID", "USER", "NAME", "PREFIX"]
    by_id = {r[0]: r for r in rows(listing)}
    assert by_id["1"][1:3] == ["alice", "laptop"] and by_id["1"][4] == "Qwen/Qwen3-8B"
    assert by_id["2"][1:3] == ["admin", "ops"] and by_id["3"][1:3] == ["default", "plain"]
    assert by_id["3"][4] == "*" and by_id["1"][-1] == "active"
    assert [r[0] for r in rows(run("keys", "list", "--config", cfg, "--user", "alice").stdout)
            ] == ["1"]
    refused("keys", "list", "--config", cfg, "--user", "nobody", reason="no user")

    r = run("keys", "rotate", "--config", cfg, "1")
    new = r.stdout.strip().splitlines()[-1]
    assert new.startswith("fg-") and new != key and r.stdout.strip() == new
    row = rows(run("keys", "list", "--config", cfg, "--user", "alice").stdout)[0]
    assert row[0] == "1" and row[3] == new[:9] + "…" and row[-1] == "rotating"
    # the old and the new value both work, as the same key, through the authenticator
    settings = config.load(cfg)
    a = Authenticator(settings.auth, open_engine(settings.store.url))

    async def who(k: str) -> int | None:
        return (await a.authenticate(f"Bearer {k}".encode())).key_id

    assert asyncio.run(who(key)) == asyncio.run(who(new)) == 1
    newer = run("keys", "rotate", "--config", cfg, "1", "--overlap", "0").stdout.split()[-1]
    a = Authenticator(settings.auth, open_engine(settings.store.url))
    for old in (key, new):
        with pytest.raises(AuthError):
            asyncio.run(who(old))
    assert asyncio.run(who(newer)) == 1
    assert rows(run("keys", "list", "--config", cfg, "--user", "alice").stdout)[0][-1] == "active"
    refused("keys", "rotate", "--config", cfg, "1", "--overlap", "soon", reason="invalid",
            code=2)
    refused("keys", "rotate", "--config", cfg, "99", reason="no key with id 99")
    run("keys", "revoke", "--config", cfg, "1")
    refused("keys", "rotate", "--config", cfg, "1", reason="revoked")


def test_audit_lists_cli_changes_without_secrets(cfg):
    run("groups", "create", "--config", cfg, "g", "--models", "demo")
    run("users", "create", "--config", cfg, "alice", "--group", "g")
    key = run("keys", "create", "--config", cfg, "--name", "k", "--user", "alice").stdout.split()[-1]
    run("keys", "revoke", "--config", cfg, "1")
    out = run("audit", "--config", cfg).stdout
    lines = out.strip().splitlines()
    assert lines[0].split()[:4] == ["ID", "AT", "ACTOR", "ACTION"]
    assert [ln.split()[4] for ln in lines[1:]] == [
        "key.revoke", "key.create", "user.create", "group.create"]
    assert all(ln.split()[3] == "cli" for ln in lines[1:])
    assert key not in out and key[3:12] not in out.replace(key[:9], "")
    assert len(run("audit", "--config", cfg, "--limit", "1").stdout.strip().splitlines()) == 2
    assert len(run("audit", "--config", cfg, "--actor", "bob").stdout.strip().splitlines()) == 1
    assert "group.create" in run("audit", "--config", cfg, "--since", "1h").stdout


def test_new_commands_have_examples_in_help():
    for cmd in (["users"], ["groups"], ["audit"], ["keys"]):
        assert "Example" in run(*cmd, "--help").output, cmd
