"""Groups: a name, a model allow-list (empty: no model), a fair-share weight, limits shared by
the members together and a token quota (changed as in :mod:`fleetgate.services.users`).

Changing or deleting a group bumps every member's keys, so gateways reload them within a poll.
Deleting a group that still has members needs ``force``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.exc import IntegrityError

from fleetgate.errors import Conflict, NotFound
from fleetgate.services import Context, audit, validation
from fleetgate.services.users import (
    admission_json,
    admission_values,
    audit_admission,
    quota_change,
)
from fleetgate.services.validation import KEEP, Keep
from fleetgate.store import repo


def need(conn: Connection, name: str) -> repo.GroupRecord:
    g = repo.get_group(conn, name)
    if g is None:
        raise NotFound(f"no group named {name!r}", param="group")
    return g


def get_group(ctx: Context, name: str) -> repo.GroupRecord:
    with ctx.engine.connect() as conn:
        return need(conn, name)


def list_groups(ctx: Context) -> list[repo.GroupRecord]:
    return repo.list_groups(ctx.engine)


def create_group(
    ctx: Context, name: str, *, models: Sequence[str] = (), weight: float = 1.0,
    limits: Mapping[str, int | None] | None = None, quota_tokens: int | None = None,
    quota_period: str = "month",
) -> repo.GroupRecord:
    name = validation.name(name)
    pats = validation.patterns(models)
    w = validation.weight(weight)
    lim = validation.merged_limits(None, validation.limits(limits or {}))
    adm = admission_values(lim, validation.quota(quota_tokens, quota_period))
    try:
        with ctx.engine.begin() as conn:
            if repo.get_group(conn, name) is not None:
                raise Conflict(f"a group named {name!r} already exists", param="name")
            repo.insert_group(conn, name=name, models=pats, weight=w, **adm)
            audit.record(conn, ctx, "group.create", "group", name,
                         {"models": list(pats), "weight": w,
                          **{k: v for k, v in audit_admission(adm).items() if v is not None}})
            return need(conn, name)
    except IntegrityError:
        raise Conflict(f"a group named {name!r} already exists", param="name") from None


def update_group(
    ctx: Context, name: str, *, models: Sequence[str] | Keep = KEEP,
    weight: float | Keep = KEEP, limits: Mapping[str, int | None] | None = None,
    quota_tokens: int | None | Keep = KEEP, quota_period: str | Keep = KEEP,
) -> repo.GroupRecord:
    """Replace what is given: the model list, the weight, the named limits, the quota."""
    values: dict[str, Any] = {}
    if not isinstance(models, Keep):
        values["models"] = validation.patterns(models)
    if not isinstance(weight, Keep):
        values["weight"] = validation.weight(weight)
    changes = validation.limits(limits) if limits is not None else None
    with ctx.engine.begin() as conn:
        g = need(conn, name)
        lim = validation.merged_limits(g.limits, changes) if changes is not None else None
        values.update(admission_values(lim, quota_change(g.quota, quota_tokens, quota_period)))
        if values:
            repo.update_group(conn, g.id, **values)
        audit.record(conn, ctx, "group.update", "group", name,
                     audit_admission({k: list(v) if k == "models" else v
                                      for k, v in values.items()}))
        return need(conn, name)


def delete_group(ctx: Context, name: str, *, force: bool = False) -> None:
    with ctx.engine.begin() as conn:
        g = need(conn, name)
        if g.members and not force:
            raise Conflict(
                f"group {name!r} still has {len(g.members)} member(s); use force to delete it",
                param="group",
            )
        repo.delete_group(conn, g.id)
        audit.record(conn, ctx, "group.delete", "group", name, {"members": list(g.members)})


def as_json(g: repo.GroupRecord) -> dict[str, Any]:
    return {
        "name": g.name, "models": list(g.models), "weight": g.weight, "members": list(g.members),
        **admission_json(g.limits, g.quota),
        "created_at": g.created_at.isoformat() + "Z", "updated_at": g.updated_at.isoformat() + "Z",
    }
