"""Groups: a name, a model allow-list (empty: no model) and a fair-share weight.

Changing or deleting a group bumps every member's keys, so gateways reload them within a poll.
Deleting a group that still has members needs ``force``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.exc import IntegrityError

from fleetgate.errors import Conflict, NotFound
from fleetgate.services import Context, audit, validation
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
    ctx: Context, name: str, *, models: Sequence[str] = (), weight: float = 1.0
) -> repo.GroupRecord:
    name = validation.name(name)
    pats = validation.patterns(models)
    w = validation.weight(weight)
    try:
        with ctx.engine.begin() as conn:
            if repo.get_group(conn, name) is not None:
                raise Conflict(f"a group named {name!r} already exists", param="name")
            repo.insert_group(conn, name=name, models=pats, weight=w)
            audit.record(conn, ctx, "group.create", "group", name,
                         {"models": list(pats), "weight": w})
            return need(conn, name)
    except IntegrityError:
        raise Conflict(f"a group named {name!r} already exists", param="name") from None


def update_group(
    ctx: Context, name: str, *, models: Sequence[str] | Keep = KEEP,
    weight: float | Keep = KEEP,
) -> repo.GroupRecord:
    """Replace what is given: the model list, the weight, or both."""
    values: dict[str, Any] = {}
    if not isinstance(models, Keep):
        values["models"] = validation.patterns(models)
    if not isinstance(weight, Keep):
        values["weight"] = validation.weight(weight)
    with ctx.engine.begin() as conn:
        g = need(conn, name)
        if values:
            repo.update_group(conn, g.id, **values)
        audit.record(conn, ctx, "group.update", "group", name,
                     {k: list(v) if k == "models" else v for k, v in values.items()})
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
        "created_at": g.created_at.isoformat() + "Z", "updated_at": g.updated_at.isoformat() + "Z",
    }
