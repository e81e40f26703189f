"""Identity services: users, groups, keys and the audit log, as one library.

The CLI (actor ``cli``), the admin HTTP API and, later, the portal all call these functions;
none of them holds policy of its own. Every function blocks on the store (call it from a worker
thread on the server), raises only :class:`~fleetgate.errors.GatewayError` subclasses for what a
caller can get wrong (``InvalidRequest``, ``NotFound``, ``Conflict``, ``PermissionDenied``), and
every call that changes something writes exactly one audit row in the same transaction as the
change, without secrets. Anything that changes what a key may do bumps that key's ``updated_at``
in the same transaction too, so running gateways pick it up with their next poll.

Who may call what is :mod:`fleetgate.services.authz`: the services trust their caller to have
asked it first (the CLI is the operator, who may do everything).
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine

from fleetgate.auth.principals import Principal
from fleetgate.config import Settings


@dataclass(frozen=True, slots=True)
class Actor:
    """Who makes a change, as the audit log records it: a user name and key id, or ``cli``."""

    name: str
    key_id: int | None = None

    @classmethod
    def of(cls, principal: Principal) -> Actor:
        return cls(principal.user, principal.key_id)


CLI = Actor("cli")


@dataclass(frozen=True, slots=True)
class Context:
    """What every service call needs: the store, the settings (configured models), the actor."""

    engine: Engine
    settings: Settings
    actor: Actor = CLI

    @property
    def model_names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.settings.models)
