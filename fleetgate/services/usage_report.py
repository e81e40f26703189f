"""Usage as people read it: tokens per day per model, for one user or everyone, and quotas.

A usage row belongs to a user through its own ``user_id`` when the writer set one, else through
its key's owner. Days are UTC. Reads only; blocks on the store (call from a worker thread).
What is left of a quota is counted from the recorded usage of the current period, so it trails
the gateway's live counters by the usage writer's batch interval.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import String, case, func, or_, select

from fleetgate.limits import quotas
from fleetgate.services import Context
from fleetgate.store import repo
from fleetgate.store.tables import api_keys, groups, usage_events, user_groups, users

MAX_DAYS = 366


@dataclass(frozen=True, slots=True)
class DayUsage:
    day: dt.date
    user: str
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class QuotaView:
    subject: str  # "user alice" or "group research"
    tokens: int
    period: str
    used: int
    left: int
    resets_at: dt.datetime


def _owner():  # type: ignore[no-untyped-def]  # a SQL expression
    return func.coalesce(usage_events.c.user_id, api_keys.c.user_id)


def per_day(ctx: Context, *, user_id: int | None = None, days: int = 30) -> list[DayUsage]:
    """Rows per (day, user, model) of the last ``days`` days, oldest first."""
    days = max(1, min(days, MAX_DAYS))
    since = repo.utcnow().replace(hour=0, minute=0, second=0, microsecond=0) - dt.timedelta(
        days=days - 1)
    # date() exists in SQLite (text) and PostgreSQL (a date); CAST AS DATE is a number in SQLite.
    day = func.date(usage_events.c.created_at, type_=String).label("day")
    owner = _owner()
    q = (
        select(day, users.c.name, usage_events.c.model, func.count(),
               func.coalesce(func.sum(usage_events.c.prompt_tokens), 0),
               func.coalesce(func.sum(usage_events.c.completion_tokens), 0))
        .select_from(usage_events.outerjoin(api_keys, api_keys.c.id == usage_events.c.key_id)
                     .outerjoin(users, users.c.id == owner))
        .where(usage_events.c.created_at >= since)
        .group_by(day, users.c.name, usage_events.c.model)
        .order_by(day, users.c.name, usage_events.c.model)
    )
    if user_id is not None:
        q = q.where(or_(usage_events.c.user_id == user_id,
                        (usage_events.c.user_id.is_(None)) & (api_keys.c.user_id == user_id)))
    with ctx.engine.connect() as conn:
        rows = conn.execute(q).all()
    out = []
    for d, name, model, n, p, c in rows:
        d = dt.date.fromisoformat(str(d)[:10])
        out.append(DayUsage(d, name or "-", model, int(n), int(p), int(c)))
    return out


def _used_since(ctx: Context, user_ids: list[int], since: dt.datetime) -> int:
    owner = _owner()
    q = (
        select(func.coalesce(func.sum(usage_events.c.prompt_tokens
                                      + usage_events.c.completion_tokens), 0))
        .select_from(usage_events.outerjoin(api_keys, api_keys.c.id == usage_events.c.key_id))
        .where(usage_events.c.created_at >= since, owner.in_(user_ids))
    )
    with ctx.engine.connect() as conn:
        return int(conn.execute(q).scalar() or 0)


def quotas_of(ctx: Context, user_id: int) -> list[QuotaView]:
    """The user's own token quota and each of their groups', with what is left of each."""
    now = time.time()
    with ctx.engine.connect() as conn:
        mine = conn.execute(select(users.c.name, users.c.quota_tokens, users.c.quota_period)
                            .where(users.c.id == user_id)).first()
        gs = conn.execute(
            select(groups.c.id, groups.c.name, groups.c.quota_tokens, groups.c.quota_period)
            .join(user_groups, user_groups.c.group_id == groups.c.id)
            .where(user_groups.c.user_id == user_id, groups.c.quota_tokens.is_not(None))
        ).all()
        members = {
            gid: [r[0] for r in conn.execute(
                select(user_groups.c.user_id).where(user_groups.c.group_id == gid))]
            for gid, *_ in gs
        }
    subjects: list[tuple[str, int, str, list[int]]] = []
    if mine is not None and mine[1] is not None:
        subjects.append((f"user {mine[0]}", int(mine[1]), mine[2] or "month", [user_id]))
    for gid, gname, tokens, period in gs:
        subjects.append((f"group {gname}", int(tokens), period or "month", members[gid]))
    out = []
    for subject, tokens, period, uids in subjects:
        start = quotas.period_start(now, period)  # type: ignore[arg-type]
        used = _used_since(ctx, uids, start.replace(tzinfo=None))
        out.append(QuotaView(subject, tokens, period, used, max(0, tokens - used),
                             quotas.period_end(now, period)))  # type: ignore[arg-type]
    return out


BY = ("user", "key", "model", "day")


def totals(
    ctx: Context, *, by: str = "key", since: dt.datetime | None = None,
    user_id: int | None = None,
) -> list[dict[str, object]]:
    """Requests and tokens grouped by ``user``, ``key``, ``model`` or ``day`` (UTC), since
    ``since`` (everything if None), for everyone or one user. Each row has the dimension's key
    (``user``: a name; ``key``: its id, with ``key_name`` and ``user``; ``model``; ``day``:
    ``YYYY-MM-DD``) plus ``requests``, ``prompt_tokens``, ``completion_tokens``,
    ``total_tokens`` and ``disconnected`` (requests whose client left early)."""
    if by not in BY:
        raise ValueError(f"by must be one of {', '.join(BY)}")
    owner = _owner()
    choices: dict[str, list[Any]] = {
        "user": [users.c.name],
        "key": [usage_events.c.key_id, api_keys.c.name, users.c.name],
        "model": [usage_events.c.model],
        "day": [func.date(usage_events.c.created_at, type_=String)],
    }
    dims = choices[by]
    q = (
        select(*dims, func.count(),
               func.coalesce(func.sum(usage_events.c.prompt_tokens), 0),
               func.coalesce(func.sum(usage_events.c.completion_tokens), 0),
               func.coalesce(func.sum(case((usage_events.c.disconnected.is_(True), 1),
                                           else_=0)), 0))
        .select_from(usage_events.outerjoin(api_keys, api_keys.c.id == usage_events.c.key_id)
                     .outerjoin(users, users.c.id == owner))
        .group_by(*dims)
        .order_by(*dims)
    )
    if since is not None:
        q = q.where(usage_events.c.created_at >= since)
    if user_id is not None:
        q = q.where(owner == user_id)
    with ctx.engine.connect() as conn:
        rows = conn.execute(q).all()
    out: list[dict[str, object]] = []
    for r in rows:
        n = len(dims)
        head: dict[str, object]
        if by == "key":
            head = {"key": r[0], "key_name": r[1], "user": r[2]}
        elif by == "day":
            head = {"day": str(r[0])[:10]}
        else:
            head = {by: r[0]}
        p, c = int(r[n + 1]), int(r[n + 2])
        out.append({**head, "requests": int(r[n]), "prompt_tokens": p, "completion_tokens": c,
                    "total_tokens": p + c, "disconnected": int(r[n + 3])})
    return out
