"""Portal sessions: server-side rows in ``portal_sessions``, found by the digest of the cookie.

The cookie ``fleetgate_session`` holds a random id (256 bits); the store keeps only its SHA-256,
so a copy of the database can't be replayed as a session. A session has a CSRF token of its own
(checked on every form with :func:`same`, in constant time) and an absolute expiry
(``portal.session_ttl_s`` from sign-in). Sign-in always makes a new session and deletes the
one it came with (no session fixation); sign-out deletes the row.

Every function blocks on the store: call them from a worker thread.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets
from dataclasses import dataclass

from sqlalchemy import Engine, delete, insert, select

from fleetgate.store.repo import utcnow
from fleetgate.store.tables import portal_sessions, users

COOKIE = "fleetgate_session"
CSRF_COOKIE = "fleetgate_login_csrf"  # double-submit token for the sign-in form only
MAX_ID = 128


@dataclass(frozen=True, slots=True)
class Session:
    user_id: int
    csrf_token: str
    expires_at: dt.datetime


def new_token() -> str:
    return secrets.token_urlsafe(32)


def _digest(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


def same(a: str | None, b: str | None) -> bool:
    """Whether two tokens are equal, in constant time; a missing one is never equal."""
    if not a or not b:
        return False
    return hmac.compare_digest(a.encode(), b.encode())


def create(engine: Engine, user_id: int, ttl_s: float, replaces: str | None = None) -> str:
    """A new session for ``user_id``; returns its id (the cookie's value). Drops ``replaces``."""
    sid = new_token()
    now = utcnow()
    with engine.begin() as conn:
        if replaces:
            conn.execute(delete(portal_sessions).where(
                portal_sessions.c.digest == _digest(replaces[:MAX_ID])))
        # Expired rows go here, at sign-in, so the table stays bounded without a sweeper task.
        conn.execute(delete(portal_sessions).where(portal_sessions.c.expires_at <= now))
        conn.execute(insert(portal_sessions).values(
            digest=_digest(sid), user_id=user_id, csrf_token=new_token(), created_at=now,
            expires_at=now + dt.timedelta(seconds=ttl_s), last_seen_at=now,
        ))
    return sid


def lookup(engine: Engine, session_id: str | None) -> Session | None:
    """The live session with this id, for an enabled user; ``None`` otherwise."""
    if not session_id or len(session_id) > MAX_ID:
        return None
    q = (
        select(portal_sessions.c.user_id, portal_sessions.c.csrf_token,
               portal_sessions.c.expires_at)
        .join(users, users.c.id == portal_sessions.c.user_id)
        .where(portal_sessions.c.digest == _digest(session_id),
               portal_sessions.c.expires_at > utcnow(), users.c.enabled.is_(True))
    )
    with engine.connect() as conn:
        row = conn.execute(q).first()
    return None if row is None else Session(row[0], row[1], row[2])


def end(engine: Engine, session_id: str | None) -> None:
    if not session_id:
        return
    with engine.begin() as conn:
        conn.execute(delete(portal_sessions).where(
            portal_sessions.c.digest == _digest(session_id[:MAX_ID])))


def end_all(engine: Engine, user_id: int) -> None:
    """Sign a user out everywhere (their password changed, or they were disabled)."""
    with engine.begin() as conn:
        conn.execute(delete(portal_sessions).where(portal_sessions.c.user_id == user_id))


def cookie(name: str, value: str, *, secure: bool, max_age: int | None, path: str) -> bytes:
    """A ``Set-Cookie`` value: HttpOnly, SameSite=Lax, Secure on https deployments."""
    parts = [f"{name}={value}", f"Path={path}", "HttpOnly", "SameSite=Lax"]
    if max_age is not None:
        parts.append(f"Max-Age={max_age}")
    if secure:
        parts.append("Secure")
    return "; ".join(parts).encode()


def read_cookie(raw: bytes | None, name: str) -> str | None:
    """The value of cookie ``name`` in a ``Cookie`` header (the first one, as browsers send)."""
    if not raw:
        return None
    for part in raw.decode("latin-1").split(";"):
        k, _, v = part.strip().partition("=")
        if k == name:
            return v or None
    return None
