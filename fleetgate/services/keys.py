"""Keys: create, rotate, revoke, list. The whole key is returned once and never stored.

A key belongs to a user (``default`` when none is named, ``admin`` for ``admin=True`` without a
user). Its own model list may only narrow its owner's access: creation refuses a literal name
the owner may not use and any pattern that matches no configured model the owner may use (the
gateway also intersects the two on every request, so a later narrowing of the owner wins).

A key may carry limits of its own (admins only) and a network allow-list (``allow_ips``, which
its owner may set too): both the user's list and the key's apply, so a key's list only narrows.

Rotation keeps the key's id, name, models and expiry and gives it a new value; the old value
keeps working for ``overlap`` (default one hour; zero stops it at once).

Calls that take ``owner`` act only on that user's keys: a key of someone else is "not found",
so ``/me`` routes can't probe other users' key ids.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection

from fleetgate.auth import access
from fleetgate.auth import keys as keyfmt
from fleetgate.errors import Conflict, InvalidRequest, NotFound
from fleetgate.services import Context, audit, validation
from fleetgate.services import users as user_svc
from fleetgate.store import repo

DEFAULT_OVERLAP = dt.timedelta(hours=1)
MAX_NAME = 200


@dataclass(frozen=True, slots=True)
class KeyView:
    """A key as listings show it: never its value, at most its display prefix."""

    key: repo.KeyRecord
    user: str
    status: str  # active | rotating | expired | revoked | disabled (its user is)


def status(rec: repo.KeyRecord, now: dt.datetime, user_enabled: bool = True) -> str:
    if rec.revoked_at is not None:
        return "revoked"
    if rec.expires_at is not None and rec.expires_at <= now:
        return "expired"
    if not user_enabled:
        return "disabled"
    return "rotating" if rec.rotating(now) else "active"


def _owned(conn: Connection, key_id: int, owner: str | None) -> repo.KeyRecord:
    rec = repo.get_key(conn, key_id)
    if rec is not None and owner is not None:
        u = repo.get_user(conn, owner)
        if u is None or rec.user_id != u.id:
            rec = None
    if rec is None:
        raise NotFound(f"no key with id {key_id}", param="id")
    return rec


def create_key(
    ctx: Context, *, name: str, user: str | None = None, models: Sequence[str] | None = None,
    expires: dt.timedelta | None = None, admin: bool = False,
    limits: Mapping[str, int | None] | None = None, allow_ips: Sequence[str] | None = None,
) -> tuple[str, repo.KeyRecord]:
    """Create a key; returns ``(the whole key, its record)``."""
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME:
        raise InvalidRequest(f"name must be 1 to {MAX_NAME} characters", param="name")
    pats = validation.patterns(models) if models is not None else None
    if pats is not None and not pats:
        raise InvalidRequest("give at least one model, or leave models out", param="models")
    if expires is not None and expires <= dt.timedelta(0):
        raise InvalidRequest("expires must be a positive duration", param="expires")
    lim = validation.merged_limits(None, validation.limits(limits or {}))
    ips = validation.allow_ips(allow_ips)
    owner_name = user or (access.ADMIN_USER if admin else access.DEFAULT_USER)
    with ctx.engine.begin() as conn:
        owner = user_svc.need(conn, owner_name)
        if admin and owner.role != "admin":
            raise InvalidRequest(
                f"an admin key needs a user with role admin; {owner_name!r} has role "
                f"{owner.role!r}", param="admin",
            )
        if not owner.enabled:
            raise InvalidRequest(f"user {owner_name!r} is disabled", param="user")
        if pats is not None:
            problems = access.key_pattern_problems(
                pats, user_svc.owner_access(conn, owner), ctx.model_names
            )
            if problems:
                raise InvalidRequest(
                    f"the key's models must stay within what user {owner_name!r} may use: "
                    + "; ".join(problems)
                    + f" (configured: {', '.join(ctx.model_names) or 'none'})",
                    param="models",
                )
        key = keyfmt.generate()
        rec = repo.insert_key(
            conn, name=name, prefix=keyfmt.display_prefix(key), digest=keyfmt.digest(key),
            models=pats, expires_at=(repo.utcnow() + expires) if expires else None,
            admin=owner.role == "admin", user_id=owner.id, limits=lim or None, allow_ips=ips,
        )
        audit.record(conn, ctx, "key.create", "key", rec.id, {
            "name": name, "user": owner_name, "prefix": rec.prefix,
            "models": list(pats) if pats is not None else None,
            "expires_at": rec.expires_at.isoformat() + "Z" if rec.expires_at else None,
            **({"limits": lim} if lim else {}),
            **({"allow_ips": list(ips)} if ips else {}),
        })
    return key, rec


def rotate_key(
    ctx: Context, key_id: int, *, overlap: dt.timedelta = DEFAULT_OVERLAP,
    owner: str | None = None,
) -> tuple[str, repo.KeyRecord]:
    """Give a key a new value; returns ``(the whole new key, its record)``. Same id."""
    overlap = validation.overlap(overlap)
    now = repo.utcnow()
    with ctx.engine.begin() as conn:
        old = _owned(conn, key_id, owner)
        st = status(old, now)
        if st in ("revoked", "expired"):
            raise Conflict(f"key {key_id} is {st}; create a new one instead", param="id")
        key = keyfmt.generate()
        rec = repo.rotate_key(
            conn, key_id, prefix=keyfmt.display_prefix(key), digest=keyfmt.digest(key),
            previous_valid_until=now + overlap if overlap else None,
        )
        audit.record(conn, ctx, "key.rotate", "key", key_id, {
            "old_prefix": old.prefix, "prefix": rec.prefix, "overlap_s": overlap.total_seconds(),
        })
    return key, rec


def revoke_key(ctx: Context, key_id: int, *, owner: str | None = None) -> repo.KeyRecord:
    with ctx.engine.begin() as conn:
        rec = _owned(conn, key_id, owner)
        repo.revoke_key(conn, key_id)
        audit.record(conn, ctx, "key.revoke", "key", key_id, {"prefix": rec.prefix})
        return _owned(conn, key_id, None)


def _views(conn: Connection, recs: list[repo.KeyRecord]) -> list[KeyView]:
    people = {u.id: u for u in repo.list_users(conn)}
    by_name = {u.name: u for u in people.values()}
    now = repo.utcnow()
    out = []
    for r in recs:
        # A key written without an owner belongs to a built-in user, as the gateway reads it.
        u = people.get(r.user_id) if r.user_id is not None else by_name.get(
            access.ADMIN_USER if r.admin else access.DEFAULT_USER)
        out.append(KeyView(r, u.name if u else "-", status(r, now, u.enabled if u else True)))
    return out


def list_keys(ctx: Context, *, user: str | None = None) -> list[KeyView]:
    """Every key, or one user's."""
    with ctx.engine.connect() as conn:
        uid = user_svc.need(conn, user).id if user is not None else None
        return _views(conn, repo.list_keys(conn, user_id=uid))


def get_key(ctx: Context, key_id: int, *, owner: str | None = None) -> KeyView:
    with ctx.engine.connect() as conn:
        return _views(conn, [_owned(conn, key_id, owner)])[0]


def as_json(v: KeyView) -> dict[str, Any]:
    r = v.key

    def t(x: dt.datetime | None) -> str | None:
        return x.isoformat() + "Z" if x else None

    return {
        "id": r.id, "user": v.user, "name": r.name, "prefix": r.prefix,
        "models": list(r.models) if r.models is not None else None, "status": v.status,
        "created_at": t(r.created_at), "expires_at": t(r.expires_at),
        "last_used_at": t(r.last_used_at), "revoked_at": t(r.revoked_at),
        "rotated_at": t(r.rotated_at), "previous_valid_until": t(r.previous_valid_until),
        "limits": user_svc.admission_json(r.limits, None)["limits"],
        "allow_ips": user_svc.list_or_none(r.allow_ips),
    }
