"""Routes that declare the auth they need, and the one dispatcher that enforces it.

A :class:`Route` is a method, a path and a handler, plus what the caller must present:

* ``public``: nothing (health, readiness, the admin API's OpenAPI document, job callbacks that
  check their own one-time token);
* ``optional``: a key if one is sent (``/v1/models`` when ``server.public_models_list``);
* ``key``: a valid key;
* ``admin``: a valid key whose user has the ``admin`` role.

:class:`Router` matches on the decoded path the server hands over (``scope["path"]``) and the
method: exact paths first, then templates with ``{name}`` segments, never a prefix. It then
authenticates once, refuses what the route doesn't allow (401/403; a key or user with a network
allow-list used from elsewhere is 403 ``ip_not_allowed``), and calls the handler with
a :class:`Request` that carries the :class:`~fleetgate.auth.principals.Principal`. Handlers never
authenticate themselves. Unknown paths are 404 and wrong methods 405 with ``Allow``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import parse_qs

from fleetgate.api.asgi import Receive, Scope, Send, header
from fleetgate.auth.networks import Network, client_address
from fleetgate.auth.principals import Principal
from fleetgate.errors import MethodNotAllowed, NotFound, PermissionDenied

Auth = Literal["public", "optional", "key", "admin"]


@dataclass(slots=True)
class Request:
    scope: Scope
    receive: Receive
    send: Send
    principal: Principal | None
    params: dict[str, str] = field(default_factory=dict)

    def header(self, name: bytes) -> bytes | None:
        return header(self.scope, name)

    def query(self) -> dict[str, list[str]]:
        return parse_qs(self.scope.get("query_string", b"").decode("latin-1"))

    @property
    def caller(self) -> Principal:
        """The principal of a route that requires one (``key`` or ``admin``)."""
        assert self.principal is not None, "route declared public"
        return self.principal


Handler = Callable[[Request], Awaitable[None]]
Authenticate = Callable[[bytes | None], Awaitable[Principal]]
# Called when a valid key is refused an admin route (the audit log records it).
OnDenied = Callable[[Principal, "Route", Scope], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str
    handler: Handler
    auth: Auth
    summary: str = ""

    @property
    def template(self) -> bool:
        return "{" in self.path


class Router:
    def __init__(
        self,
        routes: list[Route],
        authenticate: Authenticate,
        *,
        on_denied: OnDenied | None = None,
        trusted_proxies: tuple[Network, ...] = (),
    ) -> None:
        self.trusted_proxies = trusted_proxies
        self.routes = tuple(routes)
        self.authenticate = authenticate
        self.on_denied = on_denied
        self._exact: dict[str, dict[str, Route]] = {}
        self._templates: list[tuple[tuple[str, ...], dict[str, Route]]] = []
        by_template: dict[tuple[str, ...], dict[str, Route]] = {}
        for r in routes:
            if r.template:
                parts = tuple(r.path.strip("/").split("/"))
                methods = by_template.setdefault(parts, {})
            else:
                methods = self._exact.setdefault(r.path, {})
            if r.method in methods:
                raise ValueError(f"two routes for {r.method} {r.path}")
            methods[r.method] = r
        self._templates = sorted(by_template.items(), key=lambda t: -len(t[0]))

    def match(self, method: str, path: str) -> tuple[Route, dict[str, str]]:
        methods = self._exact.get(path)
        params: dict[str, str] = {}
        if methods is None:
            methods, params = self._match_template(path)
        if methods is None:
            raise NotFound(f"Invalid URL ({method} {path[:200]}).", code="unknown_url")
        route = methods.get(method)
        if route is None:
            raise MethodNotAllowed(
                f"Method {method[:20]} is not allowed on {path[:200]}.",
                headers={"allow": ", ".join(sorted(methods))},
            )
        return route, params

    def _match_template(self, path: str) -> tuple[dict[str, Route] | None, dict[str, str]]:
        parts = path.split("/")[1:] if path.startswith("/") else []  # no slash trimmed: 404
        for tmpl, methods in self._templates:
            if len(tmpl) != len(parts):
                continue
            params: dict[str, str] = {}
            for t, p in zip(tmpl, parts, strict=True):
                if t.startswith("{"):
                    if not p:
                        break
                    params[t[1:-1]] = p
                elif t != p:
                    break
            else:
                return methods, params
        return None, {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route, params = self.match(scope["method"], scope["path"])
        principal: Principal | None = None
        auth = route.auth
        if auth != "public":
            authorization = header(scope, b"authorization")
            if auth != "optional" or authorization is not None:
                principal = await self.authenticate(authorization)
            if auth == "admin" and not principal.admin:  # type: ignore[union-attr]
                assert principal is not None
                if self.on_denied is not None:
                    await self.on_denied(principal, route, scope)
                raise PermissionDenied(
                    "This route needs an admin key.", code="admin_required"
                )
            if principal is not None and principal.networks.restricted:
                self._check_network(principal, scope)
        await route.handler(Request(scope, receive, send, principal, params))

    def _check_network(self, principal: Principal, scope: Scope) -> None:
        """The key's (and its user's) allow-lists, against the client's address."""
        client = scope.get("client")
        ip = client_address(
            client[0] if client else None,
            header(scope, b"x-forwarded-for"),
            self.trusted_proxies,
        )
        if not principal.networks.allows(ip):
            raise PermissionDenied(
                "This API key may not be used from this network address.", code="ip_not_allowed"
            )
