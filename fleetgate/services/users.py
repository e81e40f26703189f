"""Users: create, update (role, groups, own model list), enable/disable, delete, list.

The built-in ``default`` and ``admin`` users can't be deleted and keep their roles. Disabling a
user stops every key they own within a gateway's ``auth.revocation_poll_s``; so does any change
to their role, groups or model list (their keys' ``updated_at`` is bumped with the change).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.exc import IntegrityError

from fleetgate.auth import access
from fleetgate.errors import Conflict, InvalidRequest, NotFound
from fleetgate.services import Context, audit, validation
from fleetgate.services.validation import KEEP, Keep
from fleetgate.store import repo


def need(conn: Connection, name: str) -> repo.UserRecord:
    u = repo.get_user(conn, name)
    if u is None:
        raise NotFound(f"no user named {name!r}", param="user")
    return u


def _group_ids(conn: Connection, names: Iterable[str]) -> list[int]:
    ids = []
    for n in names:
        g = repo.get_group(conn, n)
        if g is None:
            raise NotFound(f"no group named {n!r}", param="groups")
        ids.append(g.id)
    return ids


def owner_access(conn: Connection, u: repo.UserRecord) -> access.ModelAccess:
    """What user ``u`` may use, from their groups and their own list."""
    lists = [g.models for g in repo.list_groups(conn) if g.name in u.groups]
    return access.user_access(u.name, u.role, lists, u.models)


def get_user(ctx: Context, name: str) -> repo.UserRecord:
    with ctx.engine.connect() as conn:
        return need(conn, name)


def list_users(ctx: Context) -> list[repo.UserRecord]:
    return repo.list_users(ctx.engine)


def create_user(
    ctx: Context, name: str, *, role: str = "user", groups: Sequence[str] = (),
    models: Sequence[str] | None = None,
) -> repo.UserRecord:
    name = validation.name(name)
    role = validation.role(role)
    own = validation.patterns(models) if models is not None else None
    try:
        with ctx.engine.begin() as conn:
            if repo.get_user(conn, name) is not None:
                raise Conflict(f"a user named {name!r} already exists", param="name")
            gids = _group_ids(conn, groups)
            uid = repo.insert_user(conn, name=name, role=role, models=own)
            repo.set_groups(conn, uid, add=gids)
            audit.record(conn, ctx, "user.create", "user", name,
                         {"role": role, "groups": sorted(set(groups)),
                          "models": list(own) if own is not None else None})
            return need(conn, name)
    except IntegrityError:  # a concurrent create won the race
        raise Conflict(f"a user named {name!r} already exists", param="name") from None


def update_user(
    ctx: Context, name: str, *, role: str | Keep = KEEP,
    models: Sequence[str] | None | Keep = KEEP, add_groups: Sequence[str] = (),
    remove_groups: Sequence[str] = (),
) -> repo.UserRecord:
    """Change what is given. ``models=None`` (or an empty list) removes the user's own list."""
    values: dict[str, Any] = {}
    detail: dict[str, Any] = {}
    if not isinstance(role, Keep):
        values["role"] = detail["role"] = validation.role(role)
    if not isinstance(models, Keep):
        own = validation.patterns(models) if models is not None else ()
        values["models"] = list(own) if own else None
        detail["models"] = values["models"]
    with ctx.engine.begin() as conn:
        u = need(conn, name)
        if "role" in values and values["role"] != u.role and u.name in access.BUILTIN_USERS:
            raise InvalidRequest(f"the built-in user {name!r} keeps its role", param="role")
        add, remove = _group_ids(conn, add_groups), _group_ids(conn, remove_groups)
        if values:
            repo.update_user(conn, u.id, **values)
        if add or remove:
            repo.set_groups(conn, u.id, add=add, remove=remove)
            detail["add_groups"] = sorted(set(add_groups))
            detail["remove_groups"] = sorted(set(remove_groups))
        audit.record(conn, ctx, "user.update", "user", name, detail)
        return need(conn, name)


def set_enabled(ctx: Context, name: str, enabled: bool) -> repo.UserRecord:
    """Enable or disable a user; a disabled user's keys are refused within the poll."""
    with ctx.engine.begin() as conn:
        u = need(conn, name)
        repo.update_user(conn, u.id, enabled=enabled)
        audit.record(conn, ctx, "user.enable" if enabled else "user.disable", "user", name)
        return need(conn, name)


def delete_user(ctx: Context, name: str) -> None:
    """Delete a user who owns no key (a key's history keeps its owner: disable such a user)."""
    with ctx.engine.begin() as conn:
        u = need(conn, name)
        if u.name in access.BUILTIN_USERS:
            raise Conflict(f"the built-in user {name!r} can't be deleted", param="user")
        owned = repo.list_keys(conn, user_id=u.id)
        if owned:
            raise Conflict(
                f"user {name!r} owns {len(owned)} key(s); disable the user instead", param="user"
            )
        repo.delete_user(conn, u.id)
        audit.record(conn, ctx, "user.delete", "user", name)


def as_json(u: repo.UserRecord) -> dict[str, Any]:
    return {
        "name": u.name, "role": u.role, "source": u.source, "groups": list(u.groups),
        "models": list(u.models) if u.models is not None else None, "enabled": u.enabled,
        "created_at": u.created_at.isoformat() + "Z", "updated_at": u.updated_at.isoformat() + "Z",
    }
