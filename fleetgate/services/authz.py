"""Who may do what, for every surface (admin API, portal): one table, checked before a service.

Role ``admin`` may do everything. Role ``user`` may only:

* read their own user (``user.read`` with themselves as the target) and their own usage
  (``usage.read``);
* list, read, create, rotate and revoke their own keys (``key.*`` with themselves as owner),
  sending no field but ``name``, ``models`` (a key's list can only narrow, see
  :mod:`fleetgate.services.keys`), ``expires`` and ``allow_ips`` (a key's network list: the
  user's own list still applies too, so it can only narrow). Limits, quotas and a user's own
  allow-list are for admins only.

Everything else is refused: an admin-only action with code ``admin_required``, another user's
object or a field a user may not send (``role``, ``groups``, ``admin``, ``user``, a limit...)
with code ``forbidden``. Both are :class:`~fleetgate.errors.PermissionDenied` (403).
:func:`authorize` also writes each refusal to the audit log.
"""

from __future__ import annotations

from collections.abc import Iterable

from fleetgate.auth.principals import Principal
from fleetgate.errors import PermissionDenied
from fleetgate.services import Actor, Context, audit

# Every action a route may ask about; a route names exactly one.
ACTIONS = (
    "user.read", "user.create", "user.update", "user.delete", "user.enable", "user.disable",
    "group.read", "group.create", "group.update", "group.delete",
    "key.read", "key.create", "key.rotate", "key.revoke",
    "audit.read", "usage.read",
)
# What a plain user may do, on their own objects only.
SELF_SERVICE = frozenset({"user.read", "key.read", "key.create", "key.rotate", "key.revoke",
                          "usage.read"})
# The only body fields a plain user may send, per action.
USER_FIELDS: dict[str, frozenset[str]] = {
    "key.create": frozenset({"name", "models", "expires", "allow_ips"}),
    "key.rotate": frozenset({"overlap"}),
}


def check_user_may(
    principal: Principal, action: str, target: str | None = None, fields: Iterable[str] = ()
) -> None:
    """Raise ``PermissionDenied`` unless ``principal`` may do ``action``.

    ``target`` is the user the action is about (a user's name, or a key's owner); ``fields``
    the body fields sent.
    """
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}")  # a programming error, not a refusal
    if principal.admin:
        return
    if action not in SELF_SERVICE:
        raise PermissionDenied(f"Only an admin may do {action}.", code="admin_required")
    if target is None or target != principal.user:
        raise PermissionDenied(f"You may do {action} only on your own account.",
                               code="forbidden")
    allowed = USER_FIELDS.get(action, frozenset())
    extra = sorted(set(fields) - allowed)
    if extra:
        raise PermissionDenied(f"You may not set {', '.join(extra)}.", param=extra[0],
                               code="forbidden")


def authorize(
    ctx: Context, principal: Principal, action: str, target: str | None = None,
    fields: Iterable[str] = (), object_id: str | int | None = None,
) -> None:
    """:func:`check_user_may`, with each refusal written to the audit log (outcome denied)."""
    fields = tuple(fields)
    try:
        check_user_may(principal, action, target, fields)
    except PermissionDenied as e:
        who = Context(ctx.engine, ctx.settings, Actor.of(principal))
        kind = action.split(".", 1)[0]
        audit.denied(who, action, kind, object_id if object_id is not None else target,
                     {"code": e.error_code, "fields": sorted(fields)})
        raise
