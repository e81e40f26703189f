"""Migration 0002 on a store written by the previous version, on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, text

from fleetgate.auth import keys
from fleetgate.auth.authn import Authenticator
from fleetgate.config import AuthSettings
from fleetgate.store import db, repo


def _to(engine: Engine, revision: str) -> None:
    cfg = Config()
    cfg.set_main_option("script_location", str(db._MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        if revision == "base":
            command.downgrade(cfg, revision)
        else:
            command.upgrade(cfg, revision)


async def test_existing_keys_go_to_the_builtin_users_and_keep_working(engine):
    _to(engine, "base")  # the fixture migrated to head; start again from an empty store
    _to(engine, "0001")
    now = dt.datetime(2026, 1, 1)
    plain, admin = keys.generate(), keys.generate()
    with engine.begin() as c:
        for name, k, is_admin in (("old", plain, False), ("ops", admin, True)):
            c.execute(text(
                "INSERT INTO api_keys (name, prefix, digest, models, admin, created_at, "
                "updated_at) VALUES (:n, :p, :d, :m, :a, :t, :t)"),
                {"n": name, "p": keys.display_prefix(k), "d": keys.digest(k),
                 "m": '["demo"]' if not is_admin else None, "a": is_admin, "t": now})
        c.execute(text(
            "INSERT INTO usage_events (key_id, model, endpoint, status, stream, prompt_tokens, "
            "completion_tokens, latency_ms, created_at) VALUES (1, 'demo', 'completions', 200, "
            "false, 1, 2, 3, :t)"), {"t": now})
    db.migrate(engine)
    users = {u.id: u.name for u in repo.list_users(engine)}
    assert sorted(users.values()) == ["admin", "default"]
    owners = {r.name: users[r.user_id] for r in repo.list_keys(engine)}
    assert owners == {"old": "default", "ops": "admin"}
    a = Authenticator(AuthSettings(mode="keys"), engine)
    assert await a.reload() == 2
    p = await a.authenticate(f"Bearer {plain}".encode())
    assert p.user == "default" and p.allows("demo") and not p.allows("other")
    q = await a.authenticate(f"Bearer {admin}".encode())
    assert q.user == "admin" and q.admin and q.allows("other")
    assert repo.usage_totals(engine)[0]["requests"] == 1


async def test_a_key_written_without_an_owner_belongs_to_a_builtin_user(engine):
    # as a bulk insert (bench/paths.py) or a gateway of the previous version writes it
    k = keys.generate()
    with engine.begin() as c:
        c.execute(text(
            "INSERT INTO api_keys (name, prefix, digest, admin, created_at, updated_at) "
            "VALUES ('bulk', 'fg-x', :d, true, :t, :t)"), {"d": keys.digest(k), "t": repo.utcnow()})
    a = Authenticator(AuthSettings(mode="keys"), engine)
    p = await a.authenticate(f"Bearer {k}".encode())
    assert p.user == "admin" and p.admin
    await a.reload()
    assert (await a.authenticate(f"Bearer {k}".encode())).user == "admin"
