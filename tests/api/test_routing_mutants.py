"""The dispatcher, pinned down where the mutation run found the routing tests silent: what a
handler is given, what the refusal hook is told, how templates match, and 404's code."""

from __future__ import annotations

from typing import Any

import pytest

from fleetgate.api.routing import Request, Route, Router
from fleetgate.auth.networks import NetworkPolicy
from fleetgate.auth.principals import Principal
from fleetgate.errors import NotFound, PermissionDenied

USER = Principal(name="u")
ADMIN = Principal(name="a", admin=True)


async def authenticate(h: bytes | None) -> Principal:
    return ADMIN if h == b"Bearer admin" else USER


def scope(method: str, path: str, **kw: Any) -> dict[str, Any]:
    return {"type": "http", "method": method, "path": path, "headers": [], **kw}


async def test_a_handler_gets_the_request_to_read_and_the_channel_to_answer() -> None:
    got: dict[str, Any] = {}

    async def handler(req: Request) -> None:
        got["header"] = req.header(b"x-trace")
        got["missing"] = req.header(b"x-none")
        got["query"] = req.query()
        got["body"] = (await req.receive())["body"]
        got["params"] = req.params
        await req.send({"type": "http.response.start", "status": 204})

    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"payload"}

    async def send(msg: dict[str, Any]) -> None:
        sent.append(msg)

    r = Router([Route("POST", "/admin/v1/keys/{id}/rotate", handler, "key")], authenticate)
    s = scope("POST", "/admin/v1/keys/42/rotate", query_string=b"overlap=1h&x=%2F&x=2",
              headers=[(b"x-trace", b"abc")])
    await r(s, receive, send)
    assert got == {"header": b"abc", "missing": None, "query": {"overlap": ["1h"], "x": ["/", "2"]},
                   "body": b"payload", "params": {"id": "42"}}
    assert sent == [{"type": "http.response.start", "status": 204}]
    assert r.routes[0].path == "/admin/v1/keys/{id}/rotate"  # the table OpenAPI is built from


async def test_a_request_without_a_query_string_has_an_empty_query() -> None:
    got: list[dict[str, list[str]]] = []

    async def handler(req: Request) -> None:
        got.append(req.query())

    r = Router([Route("GET", "/x", handler, "public")], authenticate)
    await r(scope("GET", "/x"), None, None)  # type: ignore[arg-type]
    assert got == [{}]


async def test_the_refusal_hook_is_told_the_request_that_was_refused() -> None:
    told: list[tuple[str, str, str]] = []

    async def handler(req: Request) -> None:
        pytest.fail("a user reached an admin handler")

    async def on_denied(p: Principal, route: Route, s: dict[str, Any]) -> None:
        told.append((p.name, route.path, s["path"]))

    r = Router([Route("DELETE", "/admin/v1/users/{name}", handler, "admin")], authenticate,
               on_denied=on_denied)
    with pytest.raises(PermissionDenied) as e:
        await r(scope("DELETE", "/admin/v1/users/bob"), None, None)  # type: ignore[arg-type]
    assert e.value.error_code == "admin_required"
    assert told == [("u", "/admin/v1/users/{name}", "/admin/v1/users/bob")]


@pytest.mark.parametrize(("path", "params"), [
    ("/admin/v1/users/ALEX", {"name": "ALEX"}),
    ("/admin/v1/users/X", {"name": "X"}),
    ("/admin/v1/users/Xavier", {"name": "Xavier"}),
    ("/admin/v1/users/al%2Fex", {"name": "al%2Fex"}),
])
def test_path_parameters_are_passed_verbatim(path: str, params: dict[str, str]) -> None:
    async def h(req: Request) -> None:
        return None

    r = Router([Route("GET", "/admin/v1/users/{name}", h, "admin")], authenticate)
    assert r.match("GET", path)[1] == params


@pytest.mark.parametrize("path", [
    "/admin/v1/keys//rotate", "/admin/v1/keys/7/rotate/x", "/nowhere",
    # a slash more or less is another path, for templates as for exact paths
    "/admin/v1/keys/7/", "//admin/v1/keys/7", "admin/v1/keys/7", "/admin/v1/keys/7/rotate/",
    "x/admin/v1/keys/7",
])
def test_an_empty_segment_or_an_unknown_path_is_404_unknown_url(path: str) -> None:
    async def h(req: Request) -> None:
        return None

    r = Router([Route("POST", "/admin/v1/keys/{id}/rotate", h, "admin"),
                Route("POST", "/admin/v1/keys/{id}", h, "admin")], authenticate)
    with pytest.raises(NotFound) as e:
        r.match("POST", path)
    assert e.value.error_code == "unknown_url" and e.value.status == 404


def test_of_two_templates_that_both_match_the_first_declared_wins() -> None:
    async def first(req: Request) -> None:
        return None

    async def second(req: Request) -> None:
        return None

    r = Router([Route("GET", "/v1/{a}/files", first, "key"),
                Route("GET", "/v1/batches/{b}", second, "key")], authenticate)
    route, params = r.match("GET", "/v1/batches/files")
    assert route.handler is first and params == {"a": "batches"}
    r = Router([Route("GET", "/v1/batches/{b}", second, "key"),
                Route("GET", "/v1/{a}/files", first, "key")], authenticate)
    route, params = r.match("GET", "/v1/batches/files")
    assert route.handler is second and params == {"b": "files"}


@pytest.mark.parametrize(("client", "allowed"), [
    (("10.1.2.3", 5000), True), (("192.0.2.9", 5000), False), (None, False),
])
async def test_a_key_with_a_network_list_is_refused_when_the_address_is_unknown(
    client: tuple[str, int] | None, allowed: bool
) -> None:
    fenced = Principal(name="f", networks=NetworkPolicy.of(["10.0.0.0/8"]))

    async def auth(h: bytes | None) -> Principal:
        return fenced

    seen: list[str] = []

    async def handler(req: Request) -> None:
        seen.append(req.caller.name)

    r = Router([Route("POST", "/v1/chat/completions", handler, "key")], auth)
    s = scope("POST", "/v1/chat/completions", client=client)  # None: a unix socket, say
    if allowed:
        await r(s, None, None)  # type: ignore[arg-type]
        assert seen == ["f"]
    else:
        with pytest.raises(PermissionDenied) as e:
            await r(s, None, None)  # type: ignore[arg-type]
        assert e.value.error_code == "ip_not_allowed" and seen == []
