"""Users: create, update (role, groups, own model list), enable/disable, delete, list.

The built-in ``default`` and ``admin`` users can't be deleted and keep their roles. Disabling a
user stops every key they own within a gateway's ``auth.revocation_poll_s``; so does any change
to their role, groups, model list, limits, quota or allow-list (their keys' ``updated_at`` is
bumped with the change).

Limits (``rpm``, ``tpm``, ``max_concurrent``, ``max_tokens``, ``max_n``) are changed one by one:
an update names the ones it changes, ``0`` removing one. A quota is tokens per ``day`` or
``month`` (tokens ``0`` removes it). ``allow_ips`` is a CIDR list (empty removes it).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
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
    models: Sequence[str] | None = None, limits: Mapping[str, int | None] | None = None,
    quota_tokens: int | None = None, quota_period: str = "month",
    allow_ips: Sequence[str] | None = None,
) -> repo.UserRecord:
    name = validation.name(name)
    role = validation.role(role)
    own = validation.patterns(models) if models is not None else None
    lim = validation.merged_limits(None, validation.limits(limits or {}))
    quota = validation.quota(quota_tokens, quota_period)
    ips = validation.allow_ips(allow_ips)
    adm = admission_values(lim, quota, ips)
    try:
        with ctx.engine.begin() as conn:
            if repo.get_user(conn, name) is not None:
                raise Conflict(f"a user named {name!r} already exists", param="name")
            gids = _group_ids(conn, groups)
            uid = repo.insert_user(conn, name=name, role=role, models=own, **adm)
            repo.set_groups(conn, uid, add=gids)
            audit.record(conn, ctx, "user.create", "user", name,
                         {"role": role, "groups": sorted(set(groups)),
                          "models": list(own) if own is not None else None,
                          **{k: v for k, v in audit_admission(adm).items() if v is not None}})
            return need(conn, name)
    except IntegrityError:  # a concurrent create won the race
        raise Conflict(f"a user named {name!r} already exists", param="name") from None


def admission_values(
    lim: Mapping[str, int] | None, quota: tuple[int, str] | None | Keep = KEEP,
    ips: Sequence[str] | None | Keep = KEEP,
) -> dict[str, Any]:
    """Column values for limits, a quota and an allow-list (``KEEP``: that column untouched)."""
    out: dict[str, Any] = {}
    if lim is not None:
        out["limits"] = dict(lim) or None
    if not isinstance(quota, Keep):
        out["quota_tokens"] = quota[0] if quota else None
        out["quota_period"] = quota[1] if quota else None
    if not isinstance(ips, Keep):
        out["allow_ips"] = list(ips) if ips else None
    return out


def audit_admission(adm: dict[str, Any]) -> dict[str, Any]:
    """:func:`admission_values` as the audit log shows them: the quota as one ``quota`` field
    (the log drops any field named like ``*token*``, in case it holds a secret)."""
    out = {k: v for k, v in adm.items() if not k.startswith("quota_")}
    if "quota_tokens" in adm:
        t = adm["quota_tokens"]
        out["quota"] = {"tokens": t, "period": adm["quota_period"]} if t is not None else None
    return out


def quota_change(
    current: tuple[int, str] | None, tokens: int | None | Keep, period: str | Keep
) -> tuple[int, str] | None | Keep:
    """The quota after an update naming ``tokens`` and/or ``period`` (``KEEP``: not named)."""
    if isinstance(tokens, Keep) and isinstance(period, Keep):
        return KEEP
    t = (current[0] if current else None) if isinstance(tokens, Keep) else tokens
    p = (current[1] if current else "month") if isinstance(period, Keep) else period
    if t is None and isinstance(tokens, Keep):
        raise InvalidRequest("give the quota's tokens too: there is no quota to change the "
                             "period of", param="quota_tokens")
    return validation.quota(t, p)


def update_user(
    ctx: Context, name: str, *, role: str | Keep = KEEP,
    models: Sequence[str] | None | Keep = KEEP, add_groups: Sequence[str] = (),
    remove_groups: Sequence[str] = (), limits: Mapping[str, int | None] | None = None,
    quota_tokens: int | None | Keep = KEEP, quota_period: str | Keep = KEEP,
    allow_ips: Sequence[str] | None | Keep = KEEP,
) -> repo.UserRecord:
    """Change what is given. ``models=None`` (or an empty list) removes the user's own list;
    ``limits`` names the limits to change; ``allow_ips=None`` (or empty) removes the list."""
    values: dict[str, Any] = {}
    detail: dict[str, Any] = {}
    if not isinstance(role, Keep):
        values["role"] = detail["role"] = validation.role(role)
    if not isinstance(models, Keep):
        own = validation.patterns(models) if models is not None else ()
        values["models"] = list(own) if own else None
        detail["models"] = values["models"]
    changes = validation.limits(limits) if limits is not None else None
    ips = validation.allow_ips(allow_ips) if not isinstance(allow_ips, Keep) else KEEP
    with ctx.engine.begin() as conn:
        u = need(conn, name)
        lim = validation.merged_limits(u.limits, changes) if changes is not None else None
        adm = admission_values(lim, quota_change(u.quota, quota_tokens, quota_period), ips)
        values.update(adm)
        detail.update(audit_admission(adm))
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
        **admission_json(u.limits, u.quota), "allow_ips": list_or_none(u.allow_ips),
        "created_at": u.created_at.isoformat() + "Z", "updated_at": u.updated_at.isoformat() + "Z",
    }


def list_or_none(v: Sequence[str] | None) -> list[str] | None:
    return list(v) if v is not None else None


def admission_json(lim: Mapping[str, int] | None, quota: tuple[int, str] | None) -> dict[str, Any]:
    """``limits`` (every field, ``null`` when unset) and ``quota`` (``{tokens, period}`` or
    ``null``), as the admin API shows them."""
    return {
        "limits": {k: (lim or {}).get(k) for k in validation.LIMIT_FIELDS},
        "quota": {"tokens": quota[0], "period": quota[1]} if quota else None,
    }
