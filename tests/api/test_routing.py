"""The dispatcher: exact and templated matching, 404/405 with Allow, and declared auth."""

from __future__ import annotations

import pytest

from fleetgate.api.routing import Request, Route, Router
from fleetgate.auth.principals import Principal
from fleetgate.errors import AuthError, MethodNotAllowed, NotFound, PermissionDenied

USER = Principal(name="u")
ADMIN = Principal(name="a", admin=True)


async def authenticate(h: bytes | None) -> Principal:
    if h == b"Bearer user":
        return USER
    if h == b"Bearer admin":
        return ADMIN
    raise AuthError("no", code="invalid_api_key")


def make(seen: list[tuple[str, Principal | None, dict[str, str]]], denied: list[str]) -> Router:
    def h(name: str):  # type: ignore[no-untyped-def]
        async def handler(req: Request) -> None:
            seen.append((name, req.principal, req.params))
        return handler

    async def on_denied(p: Principal, r: Route, scope: object) -> None:
        denied.append(f"{p.name} {r.method} {r.path}")

    return Router(
        [
            Route("GET", "/health", h("health"), "public"),
            Route("GET", "/v1/models", h("models"), "optional"),
            Route("POST", "/v1/chat/completions", h("chat"), "key"),
            Route("GET", "/admin/v1/users", h("users"), "admin"),
            Route("POST", "/admin/v1/users", h("users-post"), "admin"),
            Route("GET", "/admin/v1/users/{name}", h("user"), "admin"),
            Route("DELETE", "/admin/v1/me/keys/{id}", h("my-key"), "key"),
        ],
        authenticate,
        on_denied=on_denied,
    )


def scope(method: str, path: str, auth: bytes | None = None) -> dict[str, object]:
    headers = [(b"authorization", auth)] if auth is not None else []
    return {"type": "http", "method": method, "path": path, "headers": headers}


async def call(r: Router, method: str, path: str, auth: bytes | None = None) -> None:
    async def receive() -> dict[str, object]:
        return {"type": "http.request"}

    async def send(msg: object) -> None:
        return None

    await r(scope(method, path, auth), receive, send)


async def test_declared_auth_is_enforced_once() -> None:
    seen: list[tuple[str, Principal | None, dict[str, str]]] = []
    denied: list[str] = []
    r = make(seen, denied)
    await call(r, "GET", "/health")
    await call(r, "GET", "/v1/models")
    await call(r, "GET", "/v1/models", b"Bearer user")
    await call(r, "POST", "/v1/chat/completions", b"Bearer user")
    await call(r, "GET", "/admin/v1/users/alice", b"Bearer admin")
    await call(r, "DELETE", "/admin/v1/me/keys/7", b"Bearer user")
    assert seen == [
        ("health", None, {}),
        ("models", None, {}),
        ("models", USER, {}),
        ("chat", USER, {}),
        ("user", ADMIN, {"name": "alice"}),
        ("my-key", USER, {"id": "7"}),
    ]
    with pytest.raises(AuthError):
        await call(r, "POST", "/v1/chat/completions")
    with pytest.raises(AuthError):
        await call(r, "GET", "/v1/models", b"Bearer wrong")  # a key sent is checked
    with pytest.raises(PermissionDenied) as e:
        await call(r, "GET", "/admin/v1/users/alice", b"Bearer user")
    assert e.value.error_code == "admin_required"
    assert denied == ["u GET /admin/v1/users/{name}"]
    assert len(seen) == 6


@pytest.mark.parametrize(
    "path",
    ["/v1/chat/completions/", "//v1/chat/completions", "/v1/chat", "/admin/v1/users/a/b",
     "/admin/v1/users/", "/V1/models", "/health/x", "/admin/v1/me/keys/"],
)
async def test_nothing_matches_by_prefix(path: str) -> None:
    r = make([], [])
    with pytest.raises(NotFound):
        await call(r, "GET", path, b"Bearer admin")


async def test_405_names_the_allowed_methods() -> None:
    r = make([], [])
    with pytest.raises(MethodNotAllowed) as e:
        await call(r, "DELETE", "/admin/v1/users", b"Bearer admin")
    assert e.value.headers["allow"] == "GET, POST"
    with pytest.raises(MethodNotAllowed) as e:
        await call(r, "GET", "/v1/chat/completions")
    assert e.value.headers["allow"] == "POST"


def test_two_routes_for_one_method_and_path_are_refused() -> None:
    async def h(req: Request) -> None:
        return None

    with pytest.raises(ValueError):
        Router([Route("GET", "/a", h, "public"), Route("GET", "/a", h, "key")], authenticate)


async def test_a_network_allow_list_refuses_other_addresses() -> None:
    from fleetgate.auth.networks import NetworkPolicy, parse_networks

    fenced = Principal(name="f", networks=NetworkPolicy.of(["10.0.0.0/8"]))

    async def auth(h: bytes | None) -> Principal:
        return fenced

    seen: list[str] = []

    async def handler(req: Request) -> None:
        seen.append(req.scope["client"][0])

    r = Router([Route("POST", "/v1/chat/completions", handler, "key")], auth,
               trusted_proxies=parse_networks(["127.0.0.1"]))

    async def call_from(peer: str, xff: bytes | None = None) -> None:
        headers = [(b"authorization", b"Bearer x")]
        if xff is not None:
            headers.append((b"x-forwarded-for", xff))
        scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions",
                 "headers": headers, "client": (peer, 5555)}

        async def receive() -> dict[str, object]:
            return {"type": "http.request"}

        async def send(msg: object) -> None:
            return None

        await r(scope, receive, send)

    await call_from("10.1.2.3")
    with pytest.raises(PermissionDenied) as e:
        await call_from("192.168.1.1")
    assert e.value.error_code == "ip_not_allowed"
    with pytest.raises(PermissionDenied):
        await call_from("192.168.1.1", b"10.1.2.3")  # an untrusted peer can't claim an address
    await call_from("127.0.0.1", b"10.1.2.3")  # a trusted proxy can
    with pytest.raises(PermissionDenied):
        await call_from("127.0.0.1", b"10.1.2.3, 192.168.1.1")
    assert seen == ["10.1.2.3", "127.0.0.1"]
