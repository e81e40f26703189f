"""The admin HTTP API, ``/admin/v1/...``: users, groups, keys, the audit log, and ``me``.

Thin: each handler reads a bounded JSON body, asks :mod:`fleetgate.services.authz` whether the
caller may do the action with the fields it sent, then calls the same service the CLI calls, in a
worker thread (the services block on the store). JSON in and out; errors in OpenAI's shape.

Who may call what is declared twice, on purpose: the route's ``auth`` (``admin`` routes are
refused by the dispatcher before the handler runs, and the refusal is audited), and the action
check in the handler, which also polices each field a ``user`` sends on their own routes (a
hidden ``role`` or ``user`` in a body is a 403 ``forbidden``, audited too).

``/admin/v1/openapi.json`` describes every route here; it is public, as OpenAI's own spec is.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import parse_qsl

from fleetgate.api.asgi import Scope, send_json
from fleetgate.api.fleet import json_body
from fleetgate.api.openapi import openapi_route
from fleetgate.api.routing import Request, Route
from fleetgate.auth import keys as keyfmt
from fleetgate.auth.principals import Principal
from fleetgate.config import Settings
from fleetgate.errors import InvalidRequest
from fleetgate.services import Actor, Context, audit, authz, usage_report
from fleetgate.services import groups as group_svc
from fleetgate.services import keys as key_svc
from fleetgate.services import users as user_svc
from fleetgate.services.validation import KEEP, LIMIT_FIELDS
from fleetgate.store.repo import utcnow

PREFIX = "/admin/v1"
_BODY_LIMIT = 64 * 1024
T = TypeVar("T")


def _object(body: Any, allowed: frozenset[str]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise InvalidRequest(
            f"Unknown field(s): {', '.join(unknown)[:200]}.", param=str(unknown[0])[:100]
        )
    return body


_MAX_DURATION = dt.timedelta(days=100 * 365)  # text or seconds, the same bound


def _duration(value: Any, param: str) -> dt.timedelta | None:
    """``"30d"``-style text, or a number of seconds; null for none."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise InvalidRequest(f"{param} must be a duration such as '30d' or seconds.", param=param)
    if isinstance(value, int | float):
        if not 0 <= value <= _MAX_DURATION.total_seconds():
            raise InvalidRequest(f"{param} is out of range.", param=param)
        return dt.timedelta(seconds=value)
    if isinstance(value, str):
        try:
            d = keyfmt.parse_duration(value)
        except ValueError as e:
            raise InvalidRequest(f"{param}: {e}", param=param) from None
        except OverflowError:  # "999999999w": more days than a timedelta holds
            raise InvalidRequest(f"{param} is out of range.", param=param) from None
        if d > _MAX_DURATION:
            raise InvalidRequest(f"{param} is out of range.", param=param)
        return d
    raise InvalidRequest(f"{param} must be a duration such as '30d' or seconds.", param=param)


def _whole(raw: str) -> bool:
    """ASCII digits only: ``str.isdigit`` also takes "²", which ``int`` refuses."""
    return raw.isascii() and raw.isdigit()


def _id(req: Request) -> int:
    raw = req.params["id"]
    if not _whole(raw) or len(raw) > 18:
        raise InvalidRequest("A key id is a whole number.", param="id")
    return int(raw)


def _flag(value: Any, param: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidRequest(f"{param} must be true or false.", param=param)
    return value


def _names(value: Any, param: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidRequest(f"{param} must be a list of names.", param=param)
    return list(value)


_USER_CREATE = frozenset({"name", "role", "groups", "models", "enabled", "limits", "quota",
                          "allow_ips"})
_USER_PATCH = frozenset({"role", "models", "add_groups", "remove_groups", "enabled", "limits",
                         "quota", "allow_ips"})
_GROUP_CREATE = frozenset({"name", "models", "weight", "limits", "quota"})
_GROUP_PATCH = frozenset({"models", "weight", "limits", "quota"})
_KEY_CREATE = frozenset({"name", "user", "models", "expires", "admin", "limits", "allow_ips"})
_ROTATE = frozenset({"overlap"})

_PATTERNS = {"type": "array", "items": {"type": "string"}}
_DURATION = {"anyOf": [
    {"type": "string", "pattern": r"^\s*\d+\s*[smhdw]\s*$", "examples": ["30d"]},
    {"type": "number"}, {"type": "null"},
]}
_FIELDS: dict[str, dict[str, Any]] = {
    "name": {"type": "string"}, "role": {"enum": ["user", "admin"]},
    "groups": {"type": "array", "items": {"type": "string"}},
    "add_groups": {"type": "array", "items": {"type": "string"}},
    "remove_groups": {"type": "array", "items": {"type": "string"}},
    "models": {"anyOf": [_PATTERNS, {"type": "null"}]}, "enabled": {"type": "boolean"},
    "weight": {"type": "number", "exclusiveMinimum": 0}, "user": {"type": "string"},
    "expires": _DURATION, "overlap": _DURATION, "admin": {"type": "boolean"},
    # Each limit a whole number; 0 or null removes it (on a PATCH, only the limits named change).
    # ``"limits": null`` is the same as leaving the member out.
    "limits": {"anyOf": [
        {"type": "object", "additionalProperties": False, "properties": {
            f: {"anyOf": [{"type": "integer", "minimum": 0}, {"type": "null"}]}
            for f in LIMIT_FIELDS}},
        {"type": "null"}]},
    "quota": {"anyOf": [{"type": "object", "additionalProperties": False, "required": ["tokens"],
                         "properties": {"tokens": {"type": "integer", "minimum": 0},
                                        "period": {"enum": ["day", "month"]}}},
                        {"type": "null"}]},
    "allow_ips": {"anyOf": [{"type": "array", "items": {"type": "string"}}, {"type": "null"}]},
}


def _quota(b: dict[str, Any]) -> dict[str, Any]:
    """``quota`` from a body as the services' ``quota_tokens``/``quota_period``; {} if absent."""
    if "quota" not in b:
        return {}
    q = b["quota"]
    if q is None:
        return {"quota_tokens": None}
    q = _object(q, frozenset({"tokens", "period"}))
    return {"quota_tokens": q.get("tokens"), "quota_period": q.get("period", "month")}


def _limits(b: dict[str, Any]) -> Any:
    return b.get("limits") if b.get("limits") is not None else None


def _schema(fields: frozenset[str], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"type": "object", "additionalProperties": False, "required": list(required),
            "properties": {f: _FIELDS[f] for f in sorted(fields)}}


# Query parameters, for the OpenAPI document.
_NAME_Q = {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._@+-]{0,199}$"}
QUERIES: dict[tuple[str, str], dict[str, dict[str, Any]]] = {
    ("GET", PREFIX + "/keys"): {"user": _NAME_Q},
    ("DELETE", PREFIX + "/groups/{name}"): {"force": {"type": "string", "enum": ["true", "false"]}},
    ("GET", PREFIX + "/audit"): {
        "limit": {"type": "string", "pattern": "^[0-9]{1,4}$"},
        "since": {"type": "string", "pattern": "^[0-9]+[smhdw]$"},
        "actor": _NAME_Q,
    },
    ("GET", PREFIX + "/usage"): {
        "by": {"type": "string", "enum": list(usage_report.BY)},
        "since": {"type": "string", "pattern": "^[0-9]+[smhdw]$"},
    },
}

# Request bodies, for the OpenAPI document.
BODIES: dict[tuple[str, str], dict[str, Any]] = {
    ("POST", PREFIX + "/users"): _schema(_USER_CREATE, ("name",)),
    ("PATCH", PREFIX + "/users/{name}"): _schema(_USER_PATCH),
    ("POST", PREFIX + "/groups"): _schema(_GROUP_CREATE, ("name",)),
    ("PATCH", PREFIX + "/groups/{name}"): _schema(_GROUP_PATCH),
    ("POST", PREFIX + "/keys"): _schema(_KEY_CREATE, ("name",)),
    ("POST", PREFIX + "/keys/{id}/rotate"): _schema(_ROTATE),
    ("POST", PREFIX + "/me/keys"): _schema(authz.USER_FIELDS["key.create"], ("name",)),
    ("POST", PREFIX + "/me/keys/{id}/rotate"): _schema(_ROTATE),
}


class AdminRoutes:
    def __init__(self, engine: Any, settings: Settings) -> None:
        self.engine = engine
        self.settings = settings
        self._actions: dict[tuple[str, str], str] = {}

    # -- plumbing -------------------------------------------------------------------------------

    def _ctx(self, p: Principal | None) -> Context:
        return Context(self.engine, self.settings, Actor.of(p) if p is not None else Actor("-"))

    async def _run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.to_thread(fn, *args, **kwargs)

    async def _may(
        self, req: Request, action: str, target: str | None = None, fields: Any = (),
        object_id: str | int | None = None,
    ) -> Context:
        ctx = self._ctx(req.caller)
        await self._run(authz.authorize, ctx, req.caller, action, target, tuple(fields), object_id)
        return ctx

    async def on_denied(self, p: Principal, route: Route, scope: Scope) -> None:
        """The dispatcher refused an admin route to a valid key: audit it."""
        action = self._actions.get((route.method, route.path))
        if action is None:  # not one of ours (e.g. /metrics)
            return
        ctx = self._ctx(p)
        await self._run(audit.denied, ctx, action, action.split(".", 1)[0], scope["path"][:200],
                        {"code": "admin_required", "route": f"{route.method} {route.path}"})

    # -- users ----------------------------------------------------------------------------------

    async def list_users(self, req: Request) -> None:
        ctx = await self._may(req, "user.read")
        users = await self._run(user_svc.list_users, ctx)
        await send_json(req.send, 200, {"data": [user_svc.as_json(u) for u in users]})

    async def create_user(self, req: Request) -> None:
        body = await json_body(req, _BODY_LIMIT)
        ctx = await self._may(req, "user.create", fields=body if isinstance(body, dict) else ())
        b = _object(body, _USER_CREATE)
        if "name" not in b:
            raise InvalidRequest("'name' is required.", param="name")
        u = await self._run(
            user_svc.create_user, ctx, b["name"], role=b.get("role", "user"),
            groups=_names(b.get("groups", []), "groups"), models=b.get("models"),
            limits=_limits(b), allow_ips=b.get("allow_ips"), **_quota(b),
        )
        if b.get("enabled") is False:
            u = await self._run(user_svc.set_enabled, ctx, u.name, False)
        await send_json(req.send, 201, user_svc.as_json(u))

    async def get_user(self, req: Request) -> None:
        name = req.params["name"]
        ctx = await self._may(req, "user.read", target=name, object_id=name)
        u = await self._run(user_svc.get_user, ctx, name)
        quotas = await self._run(usage_report.quotas_of, ctx, u.id)
        await send_json(req.send, 200, {**user_svc.as_json(u), "quotas": _quota_json(quotas)})

    async def patch_user(self, req: Request) -> None:
        name = req.params["name"]
        body = await json_body(req, _BODY_LIMIT)
        ctx = await self._may(req, "user.update", name, body if isinstance(body, dict) else (),
                              name)
        b = _object(body, _USER_PATCH)
        enabled = _flag(b["enabled"], "enabled") if "enabled" in b else None
        u = await self._run(
            user_svc.update_user, ctx, name, role=b.get("role", KEEP),
            models=b.get("models", KEEP) if b.get("models") != [] else None,
            add_groups=_names(b.get("add_groups", []), "add_groups"),
            remove_groups=_names(b.get("remove_groups", []), "remove_groups"),
            limits=_limits(b), allow_ips=b.get("allow_ips", KEEP), **_quota(b),
        )
        if enabled is not None and enabled != u.enabled:
            u = await self._run(user_svc.set_enabled, ctx, name, enabled)
        await send_json(req.send, 200, user_svc.as_json(u))

    async def delete_user(self, req: Request) -> None:
        name = req.params["name"]
        ctx = await self._may(req, "user.delete", name, object_id=name)
        await self._run(user_svc.delete_user, ctx, name)
        await send_json(req.send, 200, {"deleted": name})

    # -- groups ---------------------------------------------------------------------------------

    async def list_groups(self, req: Request) -> None:
        ctx = await self._may(req, "group.read")
        groups = await self._run(group_svc.list_groups, ctx)
        await send_json(req.send, 200, {"data": [group_svc.as_json(g) for g in groups]})

    async def create_group(self, req: Request) -> None:
        body = await json_body(req, _BODY_LIMIT)
        ctx = await self._may(req, "group.create", fields=body if isinstance(body, dict) else ())
        b = _object(body, _GROUP_CREATE)
        if "name" not in b:
            raise InvalidRequest("'name' is required.", param="name")
        g = await self._run(group_svc.create_group, ctx, b["name"],
                            models=b.get("models", []), weight=b.get("weight", 1.0),
                            limits=_limits(b), **_quota(b))
        await send_json(req.send, 201, group_svc.as_json(g))

    async def get_group(self, req: Request) -> None:
        name = req.params["name"]
        ctx = await self._may(req, "group.read", object_id=name)
        g = await self._run(group_svc.get_group, ctx, name)
        await send_json(req.send, 200, group_svc.as_json(g))

    async def patch_group(self, req: Request) -> None:
        name = req.params["name"]
        body = await json_body(req, _BODY_LIMIT)
        ctx = await self._may(req, "group.update", None, body if isinstance(body, dict) else (),
                              name)
        b = _object(body, _GROUP_PATCH)
        g = await self._run(group_svc.update_group, ctx, name, models=b.get("models", KEEP),
                            weight=b.get("weight", KEEP), limits=_limits(b), **_quota(b))
        await send_json(req.send, 200, group_svc.as_json(g))

    async def delete_group(self, req: Request) -> None:
        name = req.params["name"]
        ctx = await self._may(req, "group.delete", object_id=name)
        force = req.query().get("force", ["false"])[0] == "true"
        await self._run(group_svc.delete_group, ctx, name, force=force)
        await send_json(req.send, 200, {"deleted": name})

    # -- keys -----------------------------------------------------------------------------------

    async def _create_key(self, req: Request, owner: str | None) -> None:
        body = await json_body(req, _BODY_LIMIT)
        fields = body if isinstance(body, dict) else ()
        target = owner if owner is not None else (
            body.get("user") if isinstance(body, dict) else None
        )
        ctx = await self._may(req, "key.create", target, fields)
        b = _object(body, _KEY_CREATE)
        if not isinstance(b.get("name"), str):
            raise InvalidRequest("'name' is required.", param="name")
        models = b.get("models")
        if isinstance(models, str):
            models = [m.strip() for m in models.split(",") if m.strip()]
        key, rec = await self._run(
            key_svc.create_key, ctx, name=b["name"],
            user=owner if owner is not None else b.get("user"), models=models,
            expires=_duration(b.get("expires"), "expires"),
            admin=_flag(b.get("admin", False), "admin"),
            limits=_limits(b), allow_ips=b.get("allow_ips"),
        )
        view = await self._run(key_svc.get_key, ctx, rec.id)
        # The whole key is in this answer only; it is never shown again.
        await send_json(req.send, 201, {**key_svc.as_json(view), "key": key})

    async def _rotate(self, req: Request, owner: str | None) -> None:
        key_id = _id(req)
        raw = await json_body(req, _BODY_LIMIT) if _has_body(req) else {}
        target = owner if owner is not None else None
        ctx = await self._may(req, "key.rotate", target if owner is not None else None,
                              raw if isinstance(raw, dict) else (), key_id)
        b = _object(raw, _ROTATE)
        overlap = _duration(b.get("overlap"), "overlap") if "overlap" in b else None
        kwargs: dict[str, Any] = {"owner": owner}
        if overlap is not None:
            kwargs["overlap"] = overlap
        key, rec = await self._run(key_svc.rotate_key, ctx, key_id, **kwargs)
        view = await self._run(key_svc.get_key, ctx, rec.id)
        await send_json(req.send, 200, {**key_svc.as_json(view), "key": key})

    async def list_keys(self, req: Request) -> None:
        ctx = await self._may(req, "key.read")
        user = req.query().get("user", [None])[0]
        views = await self._run(key_svc.list_keys, ctx, user=user)
        await send_json(req.send, 200, {"data": [key_svc.as_json(v) for v in views]})

    async def create_key(self, req: Request) -> None:
        await self._create_key(req, None)

    async def get_key(self, req: Request) -> None:
        key_id = _id(req)
        ctx = await self._may(req, "key.read", object_id=key_id)
        view = await self._run(key_svc.get_key, ctx, key_id)
        await send_json(req.send, 200, key_svc.as_json(view))

    async def revoke_key(self, req: Request) -> None:
        key_id = _id(req)
        ctx = await self._may(req, "key.revoke", object_id=key_id)
        await self._run(key_svc.revoke_key, ctx, key_id)
        view = await self._run(key_svc.get_key, ctx, key_id)
        await send_json(req.send, 200, key_svc.as_json(view))

    async def rotate_key(self, req: Request) -> None:
        await self._rotate(req, None)

    # -- audit ----------------------------------------------------------------------------------

    async def list_audit(self, req: Request) -> None:
        ctx = await self._may(req, "audit.read")
        q = req.query()
        since = _since(q.get("since", [None])[0])
        limit_s = q.get("limit", ["100"])[0]
        if not _whole(limit_s):
            raise InvalidRequest("limit must be a whole number.", param="limit")
        entries = await self._run(audit.list_entries, ctx, limit=int(limit_s[:6]), since=since,
                                  actor=q.get("actor", [None])[0])
        await send_json(req.send, 200, {"data": [audit.as_json(e) for e in entries]})

    # -- usage ----------------------------------------------------------------------------------

    async def usage(self, req: Request) -> None:
        """Admins: everyone's usage. A user: their own, whatever they ask for."""
        p = req.caller
        ctx = await self._may(req, "usage.read", p.user)
        q = req.query()
        since = _since(q.get("since", [None])[0])
        by = q.get("by", ["key"])[0]
        rows = await self._run(usage_report.totals, ctx, by=by, since=since,
                               user_id=None if p.admin else _own_id(p))
        await send_json(req.send, 200, {"by": by, "data": rows})

    # -- me -------------------------------------------------------------------------------------

    async def me(self, req: Request) -> None:
        p = req.caller
        ctx = await self._may(req, "user.read", p.user)
        u = await self._run(user_svc.get_user, ctx, p.user)
        quotas = await self._run(usage_report.quotas_of, ctx, u.id)
        await send_json(req.send, 200, {
            **user_svc.as_json(u),
            "key": {"id": p.key_id, "name": p.name, "prefix": p.key_prefix},
            # What admission applies to this key (a model's own limits come on top).
            "applied_limits": [
                {"subject": s.kind, "name": s.id, **{k: getattr(lim, k) for k in LIMIT_FIELDS}}
                for s, lim in p.limits
            ],
            "quotas": _quota_json(quotas),
        })

    async def my_keys(self, req: Request) -> None:
        p = req.caller
        ctx = await self._may(req, "key.read", p.user)
        views = await self._run(key_svc.list_keys, ctx, user=p.user)
        await send_json(req.send, 200, {"data": [key_svc.as_json(v) for v in views]})

    async def create_my_key(self, req: Request) -> None:
        await self._create_key(req, req.caller.user)

    async def revoke_my_key(self, req: Request) -> None:
        p = req.caller
        key_id = _id(req)
        ctx = await self._may(req, "key.revoke", p.user, object_id=key_id)
        await self._run(key_svc.revoke_key, ctx, key_id, owner=p.user)
        view = await self._run(key_svc.get_key, ctx, key_id)
        await send_json(req.send, 200, key_svc.as_json(view))

    async def rotate_my_key(self, req: Request) -> None:
        await self._rotate(req, req.caller.user)

    # -- the route table ------------------------------------------------------------------------

    def routes(self) -> list[Route]:
        table = [
            ("GET", "/users", self.list_users, "admin", "user.read", "List users."),
            ("POST", "/users", self.create_user, "admin", "user.create", "Create a user."),
            ("GET", "/users/{name}", self.get_user, "key", "user.read",
             "Read a user (a user may read themselves)."),
            ("PATCH", "/users/{name}", self.patch_user, "admin", "user.update",
             "Change a user's role, groups, models, enabled, limits, quota or allow_ips."),
            ("DELETE", "/users/{name}", self.delete_user, "admin", "user.delete",
             "Delete a user who owns no key."),
            ("GET", "/groups", self.list_groups, "admin", "group.read", "List groups."),
            ("POST", "/groups", self.create_group, "admin", "group.create", "Create a group."),
            ("GET", "/groups/{name}", self.get_group, "admin", "group.read", "Read a group."),
            ("PATCH", "/groups/{name}", self.patch_group, "admin", "group.update",
             "Replace a group's models, weight, limits or quota."),
            ("DELETE", "/groups/{name}", self.delete_group, "admin", "group.delete",
             "Delete a group (?force=true if it has members)."),
            ("GET", "/keys", self.list_keys, "admin", "key.read", "List keys (?user=NAME)."),
            ("POST", "/keys", self.create_key, "admin", "key.create",
             "Create a key for any user; the key is in this answer only."),
            ("GET", "/keys/{id}", self.get_key, "admin", "key.read", "Read a key (no secret)."),
            ("DELETE", "/keys/{id}", self.revoke_key, "admin", "key.revoke", "Revoke a key."),
            ("POST", "/keys/{id}/rotate", self.rotate_key, "admin", "key.rotate",
             "Give a key a new value; the old one works for the overlap (default 1h)."),
            ("GET", "/audit", self.list_audit, "admin", "audit.read",
             "The audit log, newest first (?limit, ?since=7d, ?actor)."),
            ("GET", "/usage", self.usage, "key", "usage.read",
             "Requests and tokens (?by=user|key|model|day, ?since=7d); a user sees only their "
             "own."),
            ("GET", "/me", self.me, "key", "user.read",
             "The caller's user and key, the limits that apply, and each quota with what is "
             "left."),
            ("GET", "/me/keys", self.my_keys, "key", "key.read", "The caller's keys."),
            ("POST", "/me/keys", self.create_my_key, "key", "key.create",
             "Create a key for yourself (name, models, expires, allow_ips)."),
            ("DELETE", "/me/keys/{id}", self.revoke_my_key, "key", "key.revoke",
             "Revoke one of your keys."),
            ("POST", "/me/keys/{id}/rotate", self.rotate_my_key, "key", "key.rotate",
             "Rotate one of your keys."),
        ]
        out = []
        for method, path, handler, auth, action, summary in table:
            self._actions[(method, PREFIX + path)] = action
            checked = _query_checked(handler, QUERIES.get((method, PREFIX + path), {}))
            out.append(Route(method, PREFIX + path, checked, auth, summary))  # type: ignore[arg-type]
        out.append(openapi_route(PREFIX + "/openapi.json", out, BODIES, QUERIES))
        return out


def _since(text: str | None) -> dt.datetime | None:
    """``?since=7d`` as the time that long ago; None without one."""
    if text is None:
        return None
    try:
        return utcnow() - keyfmt.parse_duration(text)
    except ValueError as e:
        raise InvalidRequest(f"since: {e}", param="since") from None
    except OverflowError:  # before year 1, or more days than a timedelta holds
        raise InvalidRequest("since is out of range.", param="since") from None


def _own_id(p: Principal) -> int:
    if p.user_id is None:  # a static token has no user in the store: nothing of theirs to show
        return -1
    return p.user_id


def _has_body(req: Request) -> bool:
    cl = req.header(b"content-length")
    return (cl is not None and cl not in (b"0", b"")) or req.header(b"transfer-encoding") is not None


def _query_checked(
    handler: Callable[[Request], Awaitable[None]], allowed: dict[str, dict[str, Any]]
) -> Callable[[Request], Awaitable[None]]:
    """The handler, after the query string is checked against what the route declares: an
    unknown or repeated parameter, or a value outside its schema, is a 400 (a typo such as
    ``?users=`` must not silently list everything)."""
    patterns = {k: re.compile(v["pattern"]) for k, v in allowed.items() if "pattern" in v}
    enums = {k: v["enum"] for k, v in allowed.items() if "enum" in v}

    async def checked(req: Request) -> None:
        raw = req.scope.get("query_string", b"")
        if raw:
            try:
                pairs = parse_qsl(raw.decode("latin-1"), keep_blank_values=True,
                                  strict_parsing=True, max_num_fields=20)
            except ValueError:
                raise InvalidRequest("The query string is malformed.") from None
            seen: set[str] = set()
            for name, value in pairs:
                if name not in allowed:
                    raise InvalidRequest(f"Unknown query parameter {name[:60]!r}.",
                                         param=name[:60])
                if name in seen:
                    raise InvalidRequest(f"Query parameter {name!r} is given twice.", param=name)
                seen.add(name)
                if name in patterns and not patterns[name].fullmatch(value):
                    raise InvalidRequest(f"Query parameter {name!r} has a bad value.", param=name)
                if name in enums and value not in enums[name]:
                    raise InvalidRequest(
                        f"Query parameter {name!r} must be one of {', '.join(enums[name])}.",
                        param=name,
                    )
        await handler(req)

    return checked


def _quota_json(quotas: list[usage_report.QuotaView]) -> list[dict[str, object]]:
    """Each quota that applies to a user (their own, their groups'), with what is used and left."""
    return [{"subject": v.subject, "tokens": v.tokens, "period": v.period, "used": v.used,
             "left": v.left, "resets_at": v.resets_at.replace(tzinfo=None).isoformat() + "Z"}
            for v in quotas]
