"""Queries. Every function blocks: call them from a thread on the server.

This is the only module that writes SQL for keys, users, groups, the audit log and usage; the
CLI, the services and the server share it. Functions that take ``bind`` accept an Engine (they
run in a transaction of their own) or a Connection (they join the caller's transaction, so a
service can change a user, bump its keys' ``updated_at`` and write the audit row atomically).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple, cast

from sqlalchemy import (
    Connection,
    Engine,
    bindparam,
    case,
    delete,
    func,
    insert,
    null,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

from fleetgate.store import usage_rows
from fleetgate.store.tables import api_keys, audit_log, groups, usage_events, user_groups, users

Bind = Engine | Connection
log = logging.getLogger("fleetgate.usage")


@contextlib.contextmanager
def _tx(bind: Bind) -> Iterator[Connection]:
    if isinstance(bind, Connection):
        yield bind
    else:
        with bind.begin() as conn:
            yield conn


_JSON_ADMISSION = ("limits", "allow_ips")


def _sql_nulls(values: dict[str, Any]) -> dict[str, Any]:
    """An unset limit or allow-list is SQL NULL, not JSON ``null``, so ``IS NULL`` finds it."""
    out = dict(values)
    for k in _JSON_ADMISSION:
        if k in out:
            v = out[k]
            out[k] = null() if v is None or (k == "limits" and not v) else (
                list(v) if k == "allow_ips" else v)
    return out


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
    user_id: int | None = None
    previous_digest: str | None = None
    previous_valid_until: dt.datetime | None = None
    rotated_at: dt.datetime | None = None
    updated_at: dt.datetime | None = None  # its version: the change feed's stamp
    limits: dict[str, int] | None = None
    allow_ips: tuple[str, ...] | None = None

    def rotating(self, now: dt.datetime) -> bool:
        """Whether the previous value still works (a rotation's overlap hasn't ended)."""
        until = self.previous_valid_until
        return self.previous_digest is not None and until is not None and now < until


def _tuple(v: Any) -> tuple[str, ...] | None:
    return tuple(v) if v is not None else None


def _record(row: object) -> KeyRecord:
    m = row._mapping  # type: ignore[attr-defined]
    return KeyRecord(
        id=m["id"],
        name=m["name"],
        prefix=m["prefix"],
        digest=m["digest"],
        models=_tuple(m["models"]),
        admin=bool(m["admin"]),
        created_at=m["created_at"],
        expires_at=m["expires_at"],
        revoked_at=m["revoked_at"],
        last_used_at=m["last_used_at"],
        user_id=m["user_id"],
        previous_digest=m["previous_digest"],
        previous_valid_until=m["previous_valid_until"],
        rotated_at=m["rotated_at"],
        updated_at=m.get("updated_at"),
        limits=m["limits"] or None,
        allow_ips=_tuple(m["allow_ips"]),
    )


def builtin_user_id(bind: Bind, name: str) -> int:
    with _tx(bind) as conn:
        return int(conn.execute(select(users.c.id).where(users.c.name == name)).scalar_one())


def insert_key(
    bind: Bind,
    *,
    name: str,
    prefix: str,
    digest: str,
    models: Sequence[str] | None,
    expires_at: dt.datetime | None,
    admin: bool = False,
    user_id: int | None = None,
    limits: dict[str, int] | None = None,
    allow_ips: Sequence[str] | None = None,
) -> KeyRecord:
    """Insert a key. Without ``user_id`` it belongs to the built-in ``admin`` or ``default``."""
    now = utcnow()
    with _tx(bind) as conn:
        if user_id is None:
            user_id = builtin_user_id(conn, "admin" if admin else "default")
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
                user_id=user_id,
                **_sql_nulls({"limits": limits, "allow_ips": allow_ips}),
            )
        )
        key_id = res.inserted_primary_key[0]  # type: ignore[index]
        row = conn.execute(select(api_keys).where(api_keys.c.id == key_id)).one()
    return _record(row)


def list_keys(bind: Bind, user_id: int | None = None) -> list[KeyRecord]:
    q = select(api_keys).order_by(api_keys.c.id)
    if user_id is not None:
        q = q.where(api_keys.c.user_id == user_id)
    with _tx(bind) as conn:
        return [_record(r) for r in conn.execute(q)]


def get_key(bind: Bind, key_id: int) -> KeyRecord | None:
    with _tx(bind) as conn:
        row = conn.execute(select(api_keys).where(api_keys.c.id == key_id)).first()
    return _record(row) if row is not None else None


def get_key_by_digest(engine: Engine, digest: str) -> KeyRecord | None:
    with engine.connect() as conn:
        row = conn.execute(select(api_keys).where(api_keys.c.digest == digest)).first()
    return _record(row) if row is not None else None


def revoke_key(bind: Bind, key_id: int) -> bool:
    """Revoke; returns False when no such key exists. Revoking twice is harmless.

    A rotation's old value stops with it.
    """
    now = utcnow()
    with _tx(bind) as conn:
        exists = conn.execute(select(api_keys.c.id).where(api_keys.c.id == key_id)).first()
        if exists is None:
            return False
        conn.execute(
            update(api_keys)
            .where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
            .values(revoked_at=now, updated_at=now)
        )
    return True


def rotate_key(
    bind: Bind, key_id: int, *, prefix: str, digest: str, previous_valid_until: dt.datetime | None
) -> KeyRecord:
    """Give key ``key_id`` a new value; the old one works until ``previous_valid_until``.

    ``None`` stops the old value at once. A value from an earlier rotation still in its overlap
    is dropped: only the newest previous value is kept.
    """
    now = utcnow()
    with _tx(bind) as conn:
        old = conn.execute(select(api_keys.c.digest).where(api_keys.c.id == key_id)).scalar_one()
        keep = previous_valid_until is not None and previous_valid_until > now
        conn.execute(
            update(api_keys)
            .where(api_keys.c.id == key_id)
            .values(
                digest=digest,
                prefix=prefix,
                previous_digest=old if keep else None,
                previous_valid_until=previous_valid_until if keep else None,
                rotated_at=now,
                updated_at=now,
            )
        )
        return _record(conn.execute(select(api_keys).where(api_keys.c.id == key_id)).one())


def touch_keys_of(bind: Bind, user_ids: Iterable[int]) -> int:
    """Bump ``updated_at`` on every key of these users, so gateways reload them. Returns how many."""
    ids = sorted(set(user_ids))
    if not ids:
        return 0
    with _tx(bind) as conn:
        res = conn.execute(
            update(api_keys).where(api_keys.c.user_id.in_(ids)).values(updated_at=utcnow())
        )
        return int(res.rowcount or 0)


def any_limits(engine: Engine) -> bool:
    """Whether any user, group or key has a limit or a quota set (allow-lists don't count:
    they keep no counter, so several workers apply them alike)."""
    checks = (
        select(users.c.id).where(users.c.limits.is_not(None) | users.c.quota_tokens.is_not(None)),
        select(groups.c.id).where(
            groups.c.limits.is_not(None) | groups.c.quota_tokens.is_not(None)),
        select(api_keys.c.id).where(api_keys.c.limits.is_not(None)
                                    & api_keys.c.revoked_at.is_(None)),
    )
    with engine.connect() as conn:
        return any(conn.execute(q.limit(1)).first() is not None for q in checks)


Change = tuple[int, str, str | None, dt.datetime]


def changed_since(engine: Engine, since: dt.datetime) -> list[Change]:
    """``(id, digest, previous digest, updated_at)`` of every key changed since ``since``: the
    change feed."""
    q = select(
        api_keys.c.id, api_keys.c.digest, api_keys.c.previous_digest, api_keys.c.updated_at
    ).where(api_keys.c.updated_at >= since)
    with engine.connect() as conn:
        return [(r[0], r[1], r[2], r[3]) for r in conn.execute(q)]


def digests_changed_since(engine: Engine, since: dt.datetime) -> list[str]:
    out: list[str] = []
    for _, d, prev, _ in changed_since(engine, since):
        out.append(d)
        if prev is not None:
            out.append(prev)
    return out


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


# -- what the authenticator loads: a key with its user and the user's groups ----------------


@dataclass(frozen=True, slots=True)
class KeyGrant:
    """One key as the gateway caches it, with everything its principal is computed from."""

    key: KeyRecord
    user_id: int
    user: str
    role: str
    user_enabled: bool
    user_models: tuple[str, ...] | None
    groups: tuple[tuple[str, tuple[str, ...]], ...]  # (group name, its patterns)
    user_limits: dict[str, int] | None = None
    user_quota: tuple[int, str] | None = None  # (tokens, period)
    user_allow_ips: tuple[str, ...] | None = None
    group_admission: tuple[GroupAdmission, ...] = ()


@dataclass(frozen=True, slots=True)
class GroupAdmission:
    """What one of a key's groups sets for admission: limits, a quota, a fair-share weight."""

    name: str
    limits: dict[str, int] | None
    quota: tuple[int, str] | None  # (tokens, period)
    weight: float


def _quota(tokens: int | None, period: str | None) -> tuple[int, str] | None:
    return (int(tokens), period or "month") if tokens is not None else None


def _grants(conn: Connection, where: Any) -> list[KeyGrant]:
    # A key inserted without an owner (by a pre-0002 gateway, or in bulk) belongs to the built-in
    # user its admin flag names, as the migration assigns it.
    builtin = {n: i for n, i in conn.execute(select(users.c.name, users.c.id).where(
        users.c.name.in_(("default", "admin"))))}
    owner = func.coalesce(
        api_keys.c.user_id,
        case((api_keys.c.admin.is_(True), builtin.get("admin")), else_=builtin.get("default")),
    )
    q = (
        select(api_keys, users.c.id.label("u_id"), users.c.name.label("u_name"),
               users.c.role.label("u_role"), users.c.enabled.label("u_enabled"),
               users.c.models.label("u_models"), users.c.limits.label("u_limits"),
               users.c.quota_tokens.label("u_quota_tokens"),
               users.c.quota_period.label("u_quota_period"),
               users.c.allow_ips.label("u_allow_ips"))
        .join(users, users.c.id == owner)
        .where(where)
    )
    rows = list(conn.execute(q))
    uids = {r._mapping["u_id"] for r in rows}
    member: dict[int, list[tuple[str, tuple[str, ...]]]] = {}
    admission: dict[int, list[GroupAdmission]] = {}
    if uids:
        gq = (
            select(user_groups.c.user_id, groups.c.name, groups.c.models, groups.c.limits,
                   groups.c.quota_tokens, groups.c.quota_period, groups.c.weight)
            .join(groups, groups.c.id == user_groups.c.group_id)
            .where(user_groups.c.user_id.in_(sorted(uids)))
            .order_by(groups.c.name)
        )
        for uid, gname, gmodels, glimits, qt, qp, w in conn.execute(gq):
            member.setdefault(uid, []).append((gname, tuple(gmodels or ())))
            admission.setdefault(uid, []).append(
                GroupAdmission(gname, glimits or None, _quota(qt, qp), float(w)))
    out = []
    for r in rows:
        m = r._mapping
        out.append(KeyGrant(
            key=_record(r), user_id=m["u_id"], user=m["u_name"], role=m["u_role"], user_enabled=bool(m["u_enabled"]),
            user_models=_tuple(m["u_models"]), groups=tuple(member.get(m["u_id"], ())),
            user_limits=m["u_limits"] or None,
            user_quota=_quota(m["u_quota_tokens"], m["u_quota_period"]),
            user_allow_ips=_tuple(m["u_allow_ips"]),
            group_admission=tuple(admission.get(m["u_id"], ())),
        ))
    return out


def active_grants(engine: Engine) -> list[KeyGrant]:
    """Every key not revoked whose user is enabled, with its user and groups."""
    with engine.connect() as conn:
        return _grants(conn, (api_keys.c.revoked_at.is_(None)) & (users.c.enabled.is_(True)))


def grant_by_digest(engine: Engine, digest: str) -> KeyGrant | None:
    """The key whose current or previous (rotating) value has this digest."""
    with engine.connect() as conn:
        found = _grants(
            conn, or_(api_keys.c.digest == digest, api_keys.c.previous_digest == digest)
        )
    return found[0] if found else None


# -- users and groups -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UserRecord:
    id: int
    name: str
    role: str
    source: str
    models: tuple[str, ...] | None
    enabled: bool
    created_at: dt.datetime
    updated_at: dt.datetime
    groups: tuple[str, ...]
    limits: dict[str, int] | None = None
    quota: tuple[int, str] | None = None  # (tokens, period)
    allow_ips: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class GroupRecord:
    id: int
    name: str
    models: tuple[str, ...]
    weight: float
    created_at: dt.datetime
    updated_at: dt.datetime
    members: tuple[str, ...]
    limits: dict[str, int] | None = None
    quota: tuple[int, str] | None = None  # (tokens, period)


def _memberships(conn: Connection) -> list[tuple[int, int, str, str]]:
    """(user id, group id, user name, group name) for every membership, by names."""
    q = (
        select(user_groups.c.user_id, user_groups.c.group_id, users.c.name, groups.c.name)
        .join(users, users.c.id == user_groups.c.user_id)
        .join(groups, groups.c.id == user_groups.c.group_id)
        .order_by(users.c.name, groups.c.name)
    )
    return [(a, b, c, d) for a, b, c, d in conn.execute(q)]


def list_users(bind: Bind, name: str | None = None) -> list[UserRecord]:
    with _tx(bind) as conn:
        q = select(users).order_by(users.c.name)
        if name is not None:
            q = q.where(users.c.name == name)
        rows = list(conn.execute(q))
        by_user: dict[int, list[str]] = {}
        for uid, _, _, gname in _memberships(conn):
            by_user.setdefault(uid, []).append(gname)
    return [
        UserRecord(
            id=m["id"], name=m["name"], role=m["role"], source=m["source"],
            models=_tuple(m["models"]), enabled=bool(m["enabled"]), created_at=m["created_at"],
            updated_at=m["updated_at"], groups=tuple(by_user.get(m["id"], ())),
            limits=m["limits"] or None, quota=_quota(m["quota_tokens"], m["quota_period"]),
            allow_ips=_tuple(m["allow_ips"]),
        )
        for m in (r._mapping for r in rows)
    ]


def get_user(bind: Bind, name: str) -> UserRecord | None:
    found = list_users(bind, name)
    return found[0] if found else None


def user_names(bind: Bind) -> dict[int, str]:
    with _tx(bind) as conn:
        return {i: n for i, n in conn.execute(select(users.c.id, users.c.name))}


def insert_user(
    bind: Bind, *, name: str, role: str, models: Sequence[str] | None, source: str = "local",
    **admission: Any,
) -> int:
    """Insert a user; ``admission`` sets ``limits``, ``quota_tokens``, ``quota_period``,
    ``allow_ips``."""
    now = utcnow()
    with _tx(bind) as conn:
        res = conn.execute(insert(users).values(
            name=name, role=role, source=source, enabled=True, created_at=now, updated_at=now,
            models=list(models) if models is not None else None, **_sql_nulls(admission),
        ))
        return int(res.inserted_primary_key[0])  # type: ignore[index]


def update_user(bind: Bind, user_id: int, **values: Any) -> None:
    """Set columns of one user (``role``, ``models``, ``enabled``, ``limits``, ``quota_*``,
    ``allow_ips``) and bump its keys."""
    if "models" in values and values["models"] is not None:
        values["models"] = list(values["models"])
    with _tx(bind) as conn:
        conn.execute(update(users).where(users.c.id == user_id).values(
            **_sql_nulls(values), updated_at=utcnow()))
        touch_keys_of(conn, [user_id])


def delete_user(bind: Bind, user_id: int) -> None:
    with _tx(bind) as conn:
        conn.execute(delete(user_groups).where(user_groups.c.user_id == user_id))
        conn.execute(delete(users).where(users.c.id == user_id))


def set_groups(
    bind: Bind, user_id: int, add: Iterable[int] = (), remove: Iterable[int] = (),
    source: str = "manual",
) -> None:
    """Add and remove memberships of one user (adding one twice is harmless); bumps its keys."""
    with _tx(bind) as conn:
        have = set(conn.execute(
            select(user_groups.c.group_id).where(user_groups.c.user_id == user_id)).scalars())
        rm = set(remove) & have
        if rm:
            conn.execute(delete(user_groups).where(
                user_groups.c.user_id == user_id, user_groups.c.group_id.in_(sorted(rm))))
        new = sorted(set(add) - have)
        if new:
            conn.execute(insert(user_groups), [
                {"user_id": user_id, "group_id": g, "source": source} for g in new])
        touch_keys_of(conn, [user_id])


def list_groups(bind: Bind, name: str | None = None) -> list[GroupRecord]:
    with _tx(bind) as conn:
        q = select(groups).order_by(groups.c.name)
        if name is not None:
            q = q.where(groups.c.name == name)
        rows = list(conn.execute(q))
        by_group: dict[int, list[str]] = {}
        for _, gid, uname, _ in _memberships(conn):
            by_group.setdefault(gid, []).append(uname)
    return [
        GroupRecord(
            id=m["id"], name=m["name"], models=tuple(m["models"] or ()), weight=float(m["weight"]),
            created_at=m["created_at"], updated_at=m["updated_at"],
            members=tuple(by_group.get(m["id"], ())),
            limits=m["limits"] or None, quota=_quota(m["quota_tokens"], m["quota_period"]),
        )
        for m in (r._mapping for r in rows)
    ]


def get_group(bind: Bind, name: str) -> GroupRecord | None:
    found = list_groups(bind, name)
    return found[0] if found else None


def insert_group(
    bind: Bind, *, name: str, models: Sequence[str], weight: float, **admission: Any
) -> int:
    """Insert a group; ``admission`` sets ``limits``, ``quota_tokens``, ``quota_period``."""
    now = utcnow()
    with _tx(bind) as conn:
        res = conn.execute(insert(groups).values(
            name=name, models=list(models), weight=weight, created_at=now, updated_at=now,
            **_sql_nulls(admission)))
        return int(res.inserted_primary_key[0])  # type: ignore[index]


def _member_ids(conn: Connection, group_id: int) -> list[int]:
    q = select(user_groups.c.user_id).where(user_groups.c.group_id == group_id)
    return list(conn.execute(q).scalars())


def update_group(bind: Bind, group_id: int, **values: Any) -> None:
    """Set ``models``, ``weight``, ``limits``, ``quota_*`` of one group; bump members' keys."""
    if "models" in values:
        values["models"] = list(values["models"])
    with _tx(bind) as conn:
        conn.execute(update(groups).where(groups.c.id == group_id).values(
            **_sql_nulls(values), updated_at=utcnow()))
        touch_keys_of(conn, _member_ids(conn, group_id))


def delete_group(bind: Bind, group_id: int) -> None:
    with _tx(bind) as conn:
        touch_keys_of(conn, _member_ids(conn, group_id))
        conn.execute(delete(user_groups).where(user_groups.c.group_id == group_id))
        conn.execute(delete(groups).where(groups.c.id == group_id))


# -- audit ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AuditRecord:
    id: int
    at: dt.datetime
    actor: str
    actor_key_id: int | None
    action: str
    object_type: str
    object_id: str | None
    detail: dict[str, Any] | None
    outcome: str


def insert_audit(
    bind: Bind, *, actor: str, actor_key_id: int | None, action: str, object_type: str,
    object_id: str | None, detail: dict[str, Any] | None, outcome: str,
) -> None:
    with _tx(bind) as conn:
        conn.execute(insert(audit_log).values(
            at=utcnow(), actor=actor, actor_key_id=actor_key_id, action=action,
            object_type=object_type, object_id=object_id, detail=detail, outcome=outcome))


def list_audit(
    bind: Bind, *, limit: int = 100, since: dt.datetime | None = None,
    actor: str | None = None, before_id: int | None = None,
) -> list[AuditRecord]:
    """Newest first, at most ``limit`` rows; ``before_id`` pages back."""
    q = select(audit_log).order_by(audit_log.c.id.desc()).limit(limit)
    if since is not None:
        q = q.where(audit_log.c.at >= since)
    if actor is not None:
        q = q.where(audit_log.c.actor == actor)
    if before_id is not None:
        q = q.where(audit_log.c.id < before_id)
    with _tx(bind) as conn:
        return [AuditRecord(**dict(r._mapping)) for r in conn.execute(q)]


class UsageEvent(NamedTuple):
    """One request's usage record. A tuple in the table's column order, so a batch goes to the
    driver as it is: the request path builds one per request and must not pay for more."""

    key_id: int | None
    model: str
    endpoint: str
    status: int
    stream: bool
    prompt_tokens: int
    completion_tokens: int
    latency_ms: int
    # A naive UTC datetime, or (the request path's cheap clock) seconds since the epoch, which
    # insert_usage converts.
    created_at: dt.datetime | float
    user_id: int | None = None
    ttft_ms: int | None = None  # to the first byte relayed to the client; None: none was
    disconnected: bool = False  # the client left before the end

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


# A UsageEvent from one tuple of all its fields in column order: the request path builds one per
# request, and this skips the Python ``__new__`` that NamedTuple generates (a C call instead).
usage_event = cast(Callable[[tuple[Any, ...]], UsageEvent], partial(tuple.__new__, UsageEvent))


_USAGE_COLUMNS = UsageEvent._fields
_CREATED = _USAGE_COLUMNS.index("created_at")


def _bind_processors(engine: Engine) -> dict[int, Any]:
    """The bind processor of each usage column whose type has one, for this dialect.

    The dialect's own type (SQLite's DATETIME formats microseconds always, as every other query's
    parameters do; the generic type would leave it to the driver, which drops ".000000" and so
    sorts a whole second before the same time written by SQLAlchemy).
    """
    d = engine.dialect
    return {i: p for i, c in enumerate(_USAGE_COLUMNS)
            if (p := usage_events.c[c].type.dialect_impl(d).bind_processor(d)) is not None}


_USAGE_INSERT = f"INSERT INTO usage_events ({', '.join(_USAGE_COLUMNS)}) VALUES "
_NCOLS = len(_USAGE_COLUMNS)

# SQLite: rows per statement at most. Measured (docs/benchmarks.md, "Usage accounting"): 512-row
# statements cost less a row than 50-row ones and than 2,520-row ones (near what this build's
# bound-variable limit allows: 32,766 over 12 columns). The connection's limit (999 before SQLite
# 3.32, 32766 since, lower where a build or ``setlimit`` says so) may cap it further, see
# ``_sqlite_chunk``.
_SQLITE_MAX_ROWS = 512
_SQLITE_VALUES: dict[int, str] = {}  # rows -> statement text (powers of two: a few at most)
_ROW_MARKS = "(" + ", ".join(["?"] * _NCOLS) + ")"


def _sqlite_values(rows: int) -> str:
    """``INSERT ... VALUES (?, ...), (?, ...)`` for ``rows`` rows, built once per size."""
    sql = _SQLITE_VALUES.get(rows)
    if sql is None:
        sql = _SQLITE_VALUES[rows] = _USAGE_INSERT + ", ".join([_ROW_MARKS] * rows)
    return sql


def _sqlite_chunk(conn: Connection) -> int:
    """Rows per statement: the largest power of two within this connection's bound-variable
    limit and ``_SQLITE_MAX_ROWS``."""
    dbapi = conn.connection.driver_connection
    limit = dbapi.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)  # type: ignore[union-attr]
    return _pow2_floor(max(1, min(_SQLITE_MAX_ROWS, limit // _NCOLS)))


def _pow2_floor(n: int) -> int:
    """The largest power of two at most ``n`` (``n`` >= 1)."""
    return 1 << (n.bit_length() - 1)


def _sqlite_sizes(rows: int, chunk: int) -> list[int]:
    """Rows per statement for a batch of ``rows``: whole chunks, then the rest as powers of two,
    largest first (300 rows under a chunk of 512: 256, 32, 8 and 4).

    The driver keeps each connection's prepared statements (128 of them), and a statement of a
    few hundred rows holds about 0.4 MB of SQLite's memory. Cut at every size a batch happened to
    have, the writer filled that cache with a statement per size seen: the serving process grew by
    about 70 MB over its first 400,000 requests under load. Powers of two keep it to a handful of
    statements, each prepared once."""
    sizes = [chunk] * (rows // chunk)
    rest = rows % chunk
    while rest:
        top = _pow2_floor(rest)
        sizes.append(top)
        rest -= top
    return sizes


def _write_sqlite(conn: Connection, flat: list[Any]) -> None:
    """One statement per size that ``_sqlite_sizes`` gives, each up to 512 rows, so the writer
    thread releases the GIL once per statement (one ``sqlite3_step``), not once per row."""
    at = 0
    for rows in _sqlite_sizes(len(flat) // _NCOLS, _sqlite_chunk(conn)):
        end = at + rows * _NCOLS
        conn.exec_driver_sql(_sqlite_values(rows), tuple(flat[at:end]))
        at = end


_PG_COPY = f"COPY usage_events ({', '.join(_USAGE_COLUMNS)}) FROM STDIN"


def _copy_psycopg(conn: Connection, flat: list[Any]) -> None:
    """PostgreSQL through psycopg 3: the batch as one ``COPY ... FROM STDIN`` in the open
    transaction, psycopg formatting and escaping each row in C (about a third of the client CPU
    of its pipelined ``executemany``: docs/benchmarks.md, "Usage accounting")."""
    cur = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
    try:
        with cur.copy(_PG_COPY) as copy:
            for at in range(0, len(flat), _NCOLS):
                copy.write_row(flat[at:at + _NCOLS])
    finally:
        cur.close()


def _write_usage(engine: Engine, flat: list[Any]) -> None:
    """One transaction for the whole batch."""
    with engine.begin() as conn:
        if engine.dialect.name == "sqlite":
            _write_sqlite(conn, flat)
        elif engine.dialect.driver == "psycopg":
            _copy_psycopg(conn, flat)
        else:  # another driver named in the URL: its own executemany
            marks = "(" + ", ".join(["%s"] * _NCOLS) + ")"
            conn.exec_driver_sql(_USAGE_INSERT + marks,
                                 [tuple(flat[i:i + _NCOLS]) for i in range(0, len(flat), _NCOLS)])


def _deleted_keys(engine: Engine, key_ids: set[int]) -> set[int]:
    """Those of ``key_ids`` that no longer have a row in ``api_keys``."""
    found: set[int] = set()
    ids = sorted(key_ids)
    with engine.connect() as conn:
        for i in range(0, len(ids), 500):  # within any bound-variable limit
            found.update(conn.scalars(select(api_keys.c.id).where(api_keys.c.id.in_(ids[i:i + 500]))))
    return key_ids - found


def insert_usage(engine: Engine, events: Iterable[UsageEvent]) -> int:
    """Write a batch of usage events in one transaction; returns how many.

    This runs under load, beside the request path, in a worker thread that competes for the GIL.
    The events are flattened into one list of parameters (they are tuples in column order), and
    only the columns whose type needs it are converted. SQLite gets multi-row ``INSERT ...
    VALUES`` statements of up to 512 rows (fewer where its bound-variable limit says so; the
    rest of a batch in power-of-two sizes, so that few statements are ever prepared), so the
    thread releases the GIL once per statement, not once per row as ``executemany`` does (each
    re-acquisition waits on the event loop's thread and stalls it in turn). PostgreSQL gets one
    ``COPY ... FROM STDIN`` (psycopg 3; another driver, its ``executemany``). SQLAlchemy's own
    multi-row statements, or even its bind processors on every value, cost several times more.

    A key whose row was deleted while its usage waited here would fail the whole batch on the
    foreign key, and the writer would retry it forever. So when a batch fails on an integrity
    error, the key ids it names are looked up: the records of keys that are gone are written
    with ``key_id`` NULL (their user and tokens kept, so per-user usage and quotas stay exact),
    and the batch is tried once more. Any other integrity error is raised.
    """
    procs = _bind_processors(engine)
    sqlite = engine.dialect.name == "sqlite"
    created = procs.get(_CREATED)
    # SQLite takes bools and ints as they are; only the time needs SQLite's own text.
    others = [] if sqlite else [(i, p) for i, p in procs.items() if i != _CREATED]
    flat = usage_rows.flatten(events, _CREATED, sqlite, created, others)
    if not flat:
        return 0
    # COPY runs on the driver's own cursor, so its errors reach here unwrapped.
    integrity = (IntegrityError, engine.dialect.loaded_dbapi.IntegrityError)
    try:
        _write_usage(engine, flat)
    except integrity:
        gone = _deleted_keys(engine, {k for k in flat[0::_NCOLS] if k is not None})
        if not gone:
            raise
        n = 0
        for i in range(0, len(flat), _NCOLS):
            if flat[i] in gone:
                flat[i] = None
                n += 1
        log.warning("usage: %d records name deleted keys %s; written with no key",
                    n, sorted(gone))
        _write_usage(engine, flat)
    return len(flat) // _NCOLS


@dataclass(frozen=True, slots=True)
class QuotaUse:
    """A quota set on a user or group, and the tokens its owners used in the current period."""

    kind: str  # user | group
    name: str
    tokens: int
    period: str  # day | month
    used: int


def quota_usage(engine: Engine, day_start: dt.datetime, month_start: dt.datetime) -> list[QuotaUse]:
    """Every quota in the store with its use so far, summed from the usage records: what the
    gateway seeds its counters with at start-up. A group's use is its current members' (one
    query for all users, grouped by owner)."""
    owner = func.coalesce(usage_events.c.user_id, api_keys.c.user_id)
    tokens = usage_events.c.prompt_tokens + usage_events.c.completion_tokens
    since = min(day_start, month_start)
    q = (
        select(owner,
               func.coalesce(func.sum(case((usage_events.c.created_at >= day_start, tokens),
                                           else_=0)), 0),
               func.coalesce(func.sum(case((usage_events.c.created_at >= month_start, tokens),
                                           else_=0)), 0))
        .select_from(usage_events.outerjoin(api_keys, api_keys.c.id == usage_events.c.key_id))
        .where(usage_events.c.created_at >= since)
        .group_by(owner)
    )
    with engine.connect() as conn:
        us = conn.execute(select(users.c.id, users.c.name, users.c.quota_tokens,
                                 users.c.quota_period)
                          .where(users.c.quota_tokens.is_not(None))).all()
        gs = conn.execute(select(groups.c.id, groups.c.name, groups.c.quota_tokens,
                                 groups.c.quota_period)
                          .where(groups.c.quota_tokens.is_not(None))).all()
        if not us and not gs:
            return []
        members: dict[int, list[int]] = {}
        for uid, gid in conn.execute(select(user_groups.c.user_id, user_groups.c.group_id)):
            members.setdefault(gid, []).append(uid)
        used = {uid: (int(d), int(m)) for uid, d, m in conn.execute(q) if uid is not None}

    def of(uids: Iterable[int], period: str) -> int:
        i = 0 if period == "day" else 1
        return sum(used.get(u, (0, 0))[i] for u in uids)

    out = [QuotaUse("user", n, int(t), p or "month", of([i], p or "month")) for i, n, t, p in us]
    out += [QuotaUse("group", n, int(t), p or "month", of(members.get(i, ()), p or "month"))
            for i, n, t, p in gs]
    return out


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
