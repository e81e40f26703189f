"""The audit log: one row per change (and per refused attempt), never a secret.

:func:`record` joins the caller's transaction, so a change and its row commit together.
:func:`denied` writes a refusal in a transaction of its own (there is no change to join).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import Connection

from fleetgate.errors import InvalidRequest
from fleetgate.services import Context
from fleetgate.store import repo

MAX_LIST = 1000

# Detail keys that could hold a secret are never written, whatever a caller passes.
_SECRET_WORDS = ("key", "token", "secret", "password", "digest")


def _clean(detail: dict[str, Any] | None) -> dict[str, Any] | None:
    if not detail:
        return None
    return {
        k: v for k, v in detail.items()
        if k in ("prefix", "key_id") or not any(w in k.lower() for w in _SECRET_WORDS)
    }


def record(
    conn: Connection, ctx: Context, action: str, object_type: str, object_id: str | int | None,
    detail: dict[str, Any] | None = None, outcome: str = "ok",
) -> None:
    repo.insert_audit(
        conn, actor=ctx.actor.name, actor_key_id=ctx.actor.key_id, action=action,
        object_type=object_type, object_id=None if object_id is None else str(object_id),
        detail=_clean(detail), outcome=outcome,
    )


def denied(
    ctx: Context, action: str, object_type: str, object_id: str | int | None,
    detail: dict[str, Any] | None = None,
) -> None:
    """Record a refused attempt (outcome ``denied``)."""
    with ctx.engine.begin() as conn:
        record(conn, ctx, action, object_type, object_id, detail, outcome="denied")


def list_entries(
    ctx: Context, *, limit: int = 100, since: dt.datetime | None = None,
    actor: str | None = None, before_id: int | None = None,
) -> list[repo.AuditRecord]:
    """Newest first. ``limit`` is 1 to 1000."""
    if not 1 <= limit <= MAX_LIST:
        raise InvalidRequest(f"limit must be between 1 and {MAX_LIST}", param="limit")
    return repo.list_audit(ctx.engine, limit=limit, since=since, actor=actor, before_id=before_id)


def as_json(r: repo.AuditRecord) -> dict[str, Any]:
    return {
        "id": r.id, "at": r.at.isoformat() + "Z", "actor": r.actor, "actor_key_id": r.actor_key_id,
        "action": r.action, "object_type": r.object_type, "object_id": r.object_id,
        "detail": r.detail, "outcome": r.outcome,
    }
