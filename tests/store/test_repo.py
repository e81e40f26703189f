"""The store against both databases it supports: SQLite (embedded) and a real PostgreSQL."""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import Engine

from fleetgate.auth import keys
from fleetgate.auth.authn import Authenticator
from fleetgate.config import AuthSettings
from fleetgate.store import repo
from fleetgate.store.db import migrate, open_engine
from fleetgate.store.usage_writer import UsageWriter


def add(engine: Engine, name: str = "k", models: list[str] | None = None,
        expires_at: dt.datetime | None = None) -> tuple[str, repo.KeyRecord]:
    k = keys.generate()
    rec = repo.insert_key(engine, name=name, prefix=keys.display_prefix(k), digest=keys.digest(k),
                          models=models, expires_at=expires_at)
    return k, rec


def test_keys_round_trip(engine):
    k, rec = add(engine, "alice", ["a", "b"])
    assert rec.id >= 1 and rec.models == ("a", "b") and not rec.admin
    got = repo.get_key_by_digest(engine, keys.digest(k))
    assert got == rec
    _, rec2 = add(engine, "bob", None)
    assert [r.name for r in repo.list_keys(engine)] == ["alice", "bob"]
    assert rec2.models is None
    assert repo.get_key_by_digest(engine, "0" * 64) is None


def test_digest_is_unique(engine):
    k, _ = add(engine)
    with pytest.raises(Exception):  # noqa: B017 - IntegrityError from either driver
        repo.insert_key(engine, name="dup", prefix="fg-", digest=keys.digest(k), models=None,
                        expires_at=None)


def test_revoke_and_change_feed(engine):
    _, rec = add(engine)
    since = repo.utcnow() - dt.timedelta(seconds=1)
    assert repo.revoke_key(engine, rec.id)
    assert repo.revoke_key(engine, rec.id)  # twice is harmless
    assert not repo.revoke_key(engine, 999999)
    assert rec.digest in repo.digests_changed_since(engine, since)
    assert repo.digests_changed_since(engine, repo.utcnow() + dt.timedelta(seconds=5)) == []


def test_last_used_and_usage(engine):
    _, rec = add(engine)
    when = repo.utcnow().replace(microsecond=0)
    repo.touch_last_used(engine, {rec.id: when})
    assert repo.list_keys(engine)[0].last_used_at == when
    ev = repo.UsageEvent(key_id=rec.id, model="m", endpoint="chat.completions", status=200,
                         stream=True, prompt_tokens=3, completion_tokens=7, latency_ms=12,
                         created_at=when)
    assert repo.insert_usage(engine, [ev, ev]) == 2
    assert repo.usage_totals(engine) == [
        {"key_id": rec.id, "model": "m", "requests": 2, "prompt_tokens": 6,
         "completion_tokens": 14}
    ]


async def test_authenticator_and_usage_writer_on_this_store(engine):
    k, rec = add(engine, models=["m"])
    a = Authenticator(AuthSettings(mode="keys"), engine)
    p = await a.authenticate(f"Bearer {k}".encode())
    assert p.key_id == rec.id and p.allows("m") and not p.allows("n")
    await a.poll_once()
    assert repo.list_keys(engine)[0].last_used_at is not None
    w = UsageWriter(engine)
    w.record(repo.UsageEvent(key_id=rec.id, model="m", endpoint="completions", status=200,
                             stream=False, prompt_tokens=1, completion_tokens=2, latency_ms=1,
                             created_at=repo.utcnow()))
    await w.flush()
    assert w.written == 1


async def test_usage_writer_keeps_a_failed_batch_and_bounds_memory(tmp_path):
    e = open_engine(f"sqlite:///{tmp_path / 'u.db'}")  # never migrated: every write fails
    w = UsageWriter(e, max_pending=3)
    ev = repo.UsageEvent(key_id=None, model="m", endpoint="completions", status=200,
                         stream=False, prompt_tokens=1, completion_tokens=1, latency_ms=1,
                         created_at=repo.utcnow())
    for _ in range(2):
        w.record(ev)
    with pytest.raises(Exception):  # noqa: B017 - the driver's OperationalError
        await w.write_batch()
    assert len(w._pending) == 2 and w.dropped == 0  # kept for the next try
    for _ in range(3):
        w.record(ev)
    assert len(w._pending) == 3 and w.dropped == 2
    migrate(e)
    assert await w.write_batch() == 3
