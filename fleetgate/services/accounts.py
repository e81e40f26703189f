"""Sign-in accounts: local passwords, LDAP users made on first sign-in, and the portal's view of
who a signed-in user is.

* :func:`set_password`: a local account's argon2 hash (``fleetgate users set-password``).
* :func:`link_ldap`: let directory sign-ins reach an existing local account (admin decision).
* :func:`local_signin`: the user whose local password matches, or ``None``.
* :func:`ldap_signin`: the user for a directory identity: created on first sign-in (source
  ``ldap``), their mapped groups (``ldap.group_map``) replaced by what the directory says now
  while groups an admin gave them by hand stay. A local account of the same name that no admin
  linked is refused (:class:`AccountConflict`): a directory entry must never take over, say, a
  local admin.
* :func:`principal_for`: the :class:`~fleetgate.auth.principals.Principal` of a user without a
  key, for :mod:`fleetgate.services.authz` and the fleet handlers.

Like every service these block on the store, and every change writes one audit row.
"""

from __future__ import annotations

from sqlalchemy import Connection, delete, select, update
from sqlalchemy.exc import IntegrityError

from fleetgate.auth import passwords
from fleetgate.auth.ldap import LdapIdentity, norm_dn
from fleetgate.auth.principals import Principal
from fleetgate.errors import InvalidRequest, PermissionDenied
from fleetgate.services import Context, audit, validation
from fleetgate.services import users as user_svc
from fleetgate.store import repo
from fleetgate.store.tables import portal_sessions, user_groups, users


class AccountConflict(PermissionDenied):
    """A directory sign-in for a name that belongs to a local account nobody linked."""


def set_password(ctx: Context, name: str, password: str) -> None:
    try:
        hashed = passwords.hash_password(password)
    except ValueError as e:
        raise InvalidRequest(str(e), param="password") from None
    with ctx.engine.begin() as conn:
        u = user_svc.need(conn, name)
        conn.execute(update(users).where(users.c.id == u.id).values(
            password_hash=hashed, updated_at=repo.utcnow()))
        # A new password signs the user out of every portal session.
        conn.execute(delete(portal_sessions).where(portal_sessions.c.user_id == u.id))
        audit.record(conn, ctx, "user.set_password", "user", name)


def link_ldap(ctx: Context, name: str) -> repo.UserRecord:
    """Mark a local account as the one directory sign-ins of the same name reach."""
    with ctx.engine.begin() as conn:
        u = user_svc.need(conn, name)
        conn.execute(update(users).where(users.c.id == u.id).values(
            source="ldap", updated_at=repo.utcnow()))
        audit.record(conn, ctx, "user.link_ldap", "user", name)
        return user_svc.need(conn, name)


def _password_of(conn: Connection, user_id: int) -> str | None:
    return conn.execute(select(users.c.password_hash).where(users.c.id == user_id)).scalar()


def local_signin(ctx: Context, name: str, password: str) -> repo.UserRecord | None:
    """The enabled user ``name`` if ``password`` is theirs; the same work when it isn't."""
    with ctx.engine.connect() as conn:
        u = repo.get_user(conn, name) if name else None
        stored = _password_of(conn, u.id) if u is not None else None
    ok = passwords.verify(stored, password)
    return u if ok and u is not None and u.enabled else None


def ldap_signin(ctx: Context, ident: LdapIdentity) -> repo.UserRecord:
    """The user for a directory identity, made or refreshed; raises if they may not sign in."""
    s = ctx.settings.ldap
    assert s is not None
    if s.required_group is not None and norm_dn(s.required_group) not in ident.groups:
        raise PermissionDenied("Your directory account is not in the group this portal needs.",
                               code="ldap_group_required")
    mapped = {norm_dn(dn): g for dn, g in s.group_map.items()}
    wanted = sorted({mapped[dn] for dn in ident.groups if dn in mapped})
    name = validation.name(ident.username)
    try:
        return _provision(ctx, ident, name, wanted)
    except IntegrityError:  # two first sign-ins at once: the other made the user; use it
        return _provision(ctx, ident, name, wanted)


def _provision(
    ctx: Context, ident: LdapIdentity, name: str, wanted: list[str]
) -> repo.UserRecord:
    with ctx.engine.begin() as conn:
        u = repo.get_user(conn, name)
        if u is None:
            uid = repo.insert_user(conn, name=name, role="user", models=None, source="ldap")
            audit.record(conn, ctx, "user.create", "user", name, {"source": "ldap"})
        elif u.source != "ldap":
            raise AccountConflict(
                f"A local account named {name!r} exists; an admin must link it to your "
                "directory account (fleetgate users update NAME --link-ldap) first.",
                code="account_not_linked")
        elif not u.enabled:
            raise PermissionDenied("This account is disabled.", code="user_disabled")
        else:
            uid = u.id
        conn.execute(update(users).where(users.c.id == uid).values(ldap_dn=ident.dn))
        _sync_groups(conn, ctx, uid, name, wanted)
        return user_svc.need(conn, name)


def _sync_groups(conn: Connection, ctx: Context, uid: int, name: str, wanted: list[str]) -> None:
    """Replace the user's ``ldap`` memberships by ``wanted``; ``manual`` ones stay."""
    have: dict[int, str] = {gid: src for gid, src in conn.execute(
        select(user_groups.c.group_id, user_groups.c.source).where(user_groups.c.user_id == uid))}
    want_ids = {}
    for g in wanted:
        rec = repo.get_group(conn, g)
        if rec is not None:  # a mapped group an admin hasn't made yet grants nothing
            want_ids[rec.id] = g
    add = [i for i in want_ids if i not in have]
    remove = [i for i, src in have.items() if src == "ldap" and i not in want_ids]
    if add or remove:
        repo.set_groups(conn, uid, add=add, remove=remove, source="ldap")
        audit.record(conn, ctx, "user.ldap_groups", "user", name, {"groups": sorted(wanted)})


def principal_for(ctx: Context, user_id: int) -> Principal | None:
    """Who a signed-in user is (no key): role, groups and model access, as a key would have."""
    with ctx.engine.connect() as conn:
        name = conn.execute(select(users.c.name).where(users.c.id == user_id)).scalar()
        u = repo.get_user(conn, name) if name is not None else None
        if u is None or not u.enabled:
            return None
        acc = user_svc.owner_access(conn, u)
    return Principal(name=f"portal:{u.name}", user=u.name, user_id=u.id, role=u.role,
                     groups=u.groups, access=acc)
