"""Queries. Every function takes an Engine and blocks: call them from a thread on the server.

This is the only module that writes SQL for keys and usage; the CLI and the server share it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, bindparam, func, insert, select, update

from fleetgate.store.tables import api_keys, usage_events


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


@dataclass(frozen=True, slots=True)
class KeyRecord:
    id: int
    name: str
    prefix: str
    digest: str
    models: tuple[str, ...] | None
    admin: bool
    created_at: dt.datetime
    expires_at: dt.datetime | None
    revoked_at: dt.datetime | None
    last_used_at: dt.datetime | None


def _record(row: object) -> KeyRecord:
    m = row._mapping  # type: ignore[attr-defined]
    models = m["models"]
    return KeyRecord(
        id=m["id"],
        name=m["name"],
        prefix=m["prefix"],
        digest=m["digest"],
        models=tuple(models) if models is not None else None,
        admin=bool(m["admin"]),
        created_at=m["created_at"],
        expires_at=m["expires_at"],
        revoked_at=m["revoked_at"],
        last_used_at=m["last_used_at"],
    )


def insert_key(
    engine: Engine,
    *,
    name: str,
    prefix: str,
    digest: str,
    models: Sequence[str] | None,
    expires_at: dt.datetime | None,
    admin: bool = False,
) -> KeyRecord:
    now = utcnow()
    with engine.begin() as conn:
        res = conn.execute(
            insert(api_keys).values(
                name=name,
                prefix=prefix,
                digest=digest,
                models=list(models) if models is not None else None,
                admin=admin,
                created_at=now,
                expires_at=expires_at,
                updated_at=now,
            )
        )
        key_id = res.inserted_primary_key[0]  # type: ignore[index]
        row = conn.execute(select(api_keys).where(api_keys.c.id == key_id)).one()
    return _record(row)


def list_keys(engine: Engine) -> list[KeyRecord]:
    with engine.connect() as conn:
        return [_record(r) for r in conn.execute(select(api_keys).order_by(api_keys.c.id))]


def get_key_by_digest(engine: Engine, digest: str) -> KeyRecord | None:
    with engine.connect() as conn:
        row = conn.execute(select(api_keys).where(api_keys.c.digest == digest)).first()
    return _record(row) if row is not None else None


def revoke_key(engine: Engine, key_id: int) -> bool:
    """Revoke; returns False when no such key exists. Revoking twice is harmless."""
    now = utcnow()
    with engine.begin() as conn:
        exists = conn.execute(select(api_keys.c.id).where(api_keys.c.id == key_id)).first()
        if exists is None:
            return False
        conn.execute(
            update(api_keys)
            .where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
            .values(revoked_at=now, updated_at=now)
        )
    return True


def digests_changed_since(engine: Engine, since: dt.datetime) -> list[str]:
    with engine.connect() as conn:
        return list(
            conn.execute(select(api_keys.c.digest).where(api_keys.c.updated_at >= since)).scalars()
        )


def touch_last_used(engine: Engine, last_used: dict[int, dt.datetime]) -> None:
    """One batched UPDATE for every key used since the last call."""
    if not last_used:
        return
    # last_used_at deliberately doesn't bump updated_at: it isn't a change to the key.
    stmt = (
        update(api_keys)
        .where(api_keys.c.id == bindparam("kid"))
        .values(last_used_at=bindparam("when"))
    )
    with engine.begin() as conn:
        conn.execute(stmt, [{"kid": k, "when": w} for k, w in last_used.items()])


def active_keys(engine: Engine) -> list[KeyRecord]:
    """Every key not revoked (expired ones included: expiry is checked per request)."""
    with engine.connect() as conn:
        rows = conn.execute(select(api_keys).where(api_keys.c.revoked_at.is_(None)))
        return [_record(r) for r in rows]


@dataclass(frozen=True, slots=True)
class UsageEvent:
    key_id: int | None
    model: str
    endpoint: str
    status: int
    stream: bool
    prompt_tokens: int
    completion_tokens: int
    latency_ms: int
    created_at: dt.datetime


_USAGE_COLUMNS = (
    "key_id", "model", "endpoint", "status", "stream",
    "prompt_tokens", "completion_tokens", "latency_ms", "created_at",
)


def _usage_insert(engine: Engine) -> tuple[str, list[Any]]:
    """The driver-level INSERT and each column's bind processor, for this engine's dialect."""
    d = engine.dialect
    mark = {"qmark": "?", "numeric": ":1", "named": ":x"}.get(d.paramstyle, "%s")
    if mark not in ("?", "%s"):  # pragma: no cover - neither SQLite nor psycopg
        raise RuntimeError(f"unsupported paramstyle {d.paramstyle}")
    cols = ", ".join(_USAGE_COLUMNS)
    sql = f"INSERT INTO usage_events ({cols}) VALUES ({', '.join([mark] * len(_USAGE_COLUMNS))})"
    procs = [usage_events.c[c].type.bind_processor(d) for c in _USAGE_COLUMNS]
    return sql, procs


def insert_usage(engine: Engine, events: Iterable[UsageEvent]) -> int:
    """Write a batch of usage events in one transaction.

    This runs under load, beside the request path, in a worker thread that competes for the GIL;
    it uses the driver's own ``executemany`` over plain tuples (SQLAlchemy's type processing
    kept) because building SQLAlchemy's multi-row statements cost several times more CPU.
    """
    sql, procs = _usage_insert(engine)
    rows = []
    for e in events:
        values = (
            e.key_id, e.model, e.endpoint, e.status, e.stream,
            e.prompt_tokens, e.completion_tokens, e.latency_ms, e.created_at,
        )
        rows.append(tuple(p(v) if p else v for p, v in zip(procs, values, strict=True)))
    if not rows:
        return 0
    with engine.begin() as conn:
        conn.exec_driver_sql(sql, rows)
    return len(rows)


def usage_totals(engine: Engine, since: dt.datetime | None = None) -> list[dict[str, object]]:
    """Per key and model: requests and tokens (since ``since``, if given)."""
    q = (
        select(
            usage_events.c.key_id,
            usage_events.c.model,
            func.count().label("requests"),
            func.coalesce(func.sum(usage_events.c.prompt_tokens), 0).label("prompt_tokens"),
            func.coalesce(func.sum(usage_events.c.completion_tokens), 0).label("completion_tokens"),
        )
        .group_by(usage_events.c.key_id, usage_events.c.model)
        .order_by(usage_events.c.key_id, usage_events.c.model)
    )
    if since is not None:
        q = q.where(usage_events.c.created_at >= since)
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(q)]
