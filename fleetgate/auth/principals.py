"""Who is calling. Computed once per key when it is loaded into the cache, then passed downstream
instead of the key.

A :class:`Principal` carries the key (display name, stable id, display prefix), its user (name,
id, role, groups) and the key's *effective* model access, already compiled: the intersection of
the user's access and the key's own list (see :mod:`fleetgate.auth.access`). Nothing here reads
the store; :meth:`Principal.allows` is one memoised dict lookup per model name.

``Principal(name=..., models=..., admin=...)`` is still accepted, for callers written before
users existed: ``models`` narrows ``access`` and ``admin=True`` means role ``admin``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from fleetgate.auth.access import DEFAULT_USER, EVERYTHING, ModelAccess
from fleetgate.auth.networks import UNRESTRICTED, NetworkPolicy
from fleetgate.limits.spec import Limits, Quota, Subject

SubjectLimits = tuple[tuple[Subject, Limits], ...]
SubjectQuotas = tuple[tuple[Subject, Quota], ...]

ROLES = ("admin", "user")


@dataclass(frozen=True, slots=True, init=False)
class Principal:
    name: str
    key_id: int | None
    key_prefix: str | None
    user: str
    user_id: int | None
    role: str
    groups: tuple[str, ...]
    access: ModelAccess
    # Admission: what is set on the user, each group and the key (the model's own limits are
    # added per request), the fair-share weight (the highest of the groups'), and the network
    # allow-lists of the user and the key.
    limits: SubjectLimits
    quotas: SubjectQuotas
    weight: float
    networks: NetworkPolicy

    def __init__(
        self,
        name: str,
        key_id: int | None = None,
        key_prefix: str | None = None,
        user: str = DEFAULT_USER,
        user_id: int | None = None,
        role: str = "user",
        groups: tuple[str, ...] = (),
        access: ModelAccess = EVERYTHING,
        *,
        models: Iterable[str] | None = None,
        admin: bool = False,
        limits: SubjectLimits = (),
        quotas: SubjectQuotas = (),
        weight: float = 1.0,
        networks: NetworkPolicy = UNRESTRICTED,
    ) -> None:
        if admin:
            role = "admin"
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}")
        if models is not None:
            access = access.narrowed(tuple(models))
        for field, value in (
            ("name", name), ("key_id", key_id), ("key_prefix", key_prefix), ("user", user),
            ("user_id", user_id), ("role", role), ("groups", tuple(groups)), ("access", access),
            ("limits", tuple(limits)), ("quotas", tuple(quotas)), ("weight", float(weight)),
            ("networks", networks),
        ):
            object.__setattr__(self, field, value)

    @property
    def admin(self) -> bool:
        return self.role == "admin"

    def allows(self, model: str) -> bool:
        # On the request path: answer a memo hit here, without a second call.
        hit = self.access._memo.get(model)
        return self.access.allows(model) if hit is None else hit


ANONYMOUS = Principal(name="anonymous", user="anonymous")
