"""The fleet API's logic, for the HTTP layer to mount thinly.

Each handler takes the pool, the authenticated :class:`~fleetgate.auth.principals.Principal`
and the parsed JSON body, and returns ``(status, json_dict)``. Errors are raised as
:class:`~fleetgate.errors.GatewayError` subclasses, so the one envelope handler renders them.
None of them waits: ``up`` asks the controller and answers at once.

* ``POST /v1/fleet/up``   ``{"model": NAME}`` -> ``{"model", "status": pending|starting|healthy}``;
  ``{"model_path": PATH}`` (or a ``model`` that isn't configured) starts a model from a template
  (:mod:`fleetgate.fleet.templates`) -> ``{"status", "model", "detail"}``. ``POST /up`` is the
  same (vLLM Autoserve's route).
* ``POST /v1/fleet/down`` ``{"model": NAME}`` -> ``{"model", "status"}``
* ``GET /v1/fleet/status`` (optional ``model``) -> :func:`fleetgate.fleet.status.snapshot`,
  limited to the models the caller's key may use (an admin key's model list narrows it too);
  internals (pids, URLs, log lines) only for admins.

Who may call ``up``/``down`` on a configured model is ``fleet.up_access`` /
``fleet.down_access``; who may start a template's model is the template's ``launch`` groups
(and admins).
"""

from __future__ import annotations

from typing import Any

from fleetgate.auth.principals import Principal
from fleetgate.errors import InvalidRequest, ModelNotFound, PermissionDenied
from fleetgate.fleet.pool import Pool
from fleetgate.fleet.status import snapshot
from fleetgate.fleet.templates import Templates, check_path


def _model(pool: Pool, principal: Principal, body: Any, access: str, verb: str) -> str:
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object with 'model'.")
    name = body.get("model")
    if not isinstance(name, str) or not name:
        raise InvalidRequest("'model' is required and must be a string.", param="model")
    if name not in pool.groups:
        raise ModelNotFound(f"The model '{name[:200]}' does not exist.", param="model")
    # A key's model list narrows everything that key does, an admin's included.
    if not principal.allows(name):
        raise PermissionDenied(f"This API key may not use the model '{name}'.", param="model")
    if principal.admin:
        return name
    if access != "model_users":
        raise PermissionDenied(f"Only an admin key may {verb} a model.", param="model")
    return name


async def fleet_up(
    pool: Pool, principal: Principal, body: Any, templates: Templates | None = None
) -> tuple[int, dict[str, Any]]:
    if isinstance(body, dict) and templates:
        name = body.get("model_path", body.get("model"))
        dynamic = name in templates.dynamic or name in templates.leaving
        if "model_path" in body or dynamic or (isinstance(name, str) and name not in pool.groups):
            if "model_path" in body and "model" in body and body["model"] != name:
                raise InvalidRequest("Give 'model_path' or 'model', not both.", param="model")
            return 200, templates.up(principal, check_path(name, templates.absolute_ok))
    if isinstance(body, dict) and "model_path" in body:
        raise ModelNotFound("This gateway has no templates: no model path can be started.",
                            param="model_path")
    name = _model(pool, principal, body, pool.fleet.up_access, "start")
    return 200, {"model": name, "status": pool.up(name)}


async def fleet_down(pool: Pool, principal: Principal, body: Any) -> tuple[int, dict[str, Any]]:
    name = _model(pool, principal, body, pool.fleet.down_access, "stop")
    return 200, {"model": name, "status": pool.down(name)}


async def fleet_status(
    pool: Pool, principal: Principal, model: str | None = None, templates: Templates | None = None
) -> tuple[int, dict[str, Any]]:
    names = [n for n in pool.groups if principal.allows(n)]
    if model is not None:
        if model not in pool.groups or model not in names:
            raise ModelNotFound(f"The model '{model[:200]}' does not exist.", param="model")
        names = [model]
    snap = snapshot(pool, names)
    dynamic = templates.dynamic if templates else {}
    for m in snap["models"]:
        m["dynamic"] = m["model"] in dynamic
    if not principal.admin:
        snap = redact(snap)
    if templates:
        snap["templates"] = templates.describe(principal)
    return 200, snap


_PUBLIC_MODEL = (
    "model", "status", "backend", "ready", "inflight", "queued", "idle_s", "dynamic",
    "context_length",
)
_PUBLIC_REPLICA = (
    "id", "state", "routable", "inflight", "age_s", "in_state_s", "idle_s", "note", "eta_s"
)


def _public_replica(r: dict[str, Any]) -> dict[str, Any]:
    # Launcher fields the launcher itself marked public (a job's queue state, its reason).
    keep = (*_PUBLIC_REPLICA, *r.get("public_fields", ()))
    return {k: r[k] for k in keep if k in r}


def redact(snap: dict[str, Any]) -> dict[str, Any]:
    """What a non-admin caller sees: states and counts, no pids, paths, URLs or log lines."""
    return {
        "models": [
            {k: m[k] for k in _PUBLIC_MODEL}
            | {"replicas": [_public_replica(r) for r in m["replicas"]]}
            for m in snap["models"]
        ]
    }
