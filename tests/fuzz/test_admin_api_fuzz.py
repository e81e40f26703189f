"""schemathesis against the admin API's own OpenAPI document, in process, bounded.

The document is fetched from ``GET /admin/v1/openapi.json`` of a started in-process gateway
(keys mode, SQLite). For every operation in it, schemathesis generates valid and invalid
requests (path parameters, bodies, content types), sent once with an admin key and once with a
user key. What must hold for every answer:

- never a 5xx;
- every error is OpenAI's envelope, ``{"error": {"message", "type", "param", "code"}}``, and the
  response conforms to the document (schemathesis's own checks: status, content type, schema,
  and invalid data refused);
- with a user key, an operation declared admin-only is refused (403 ``admin_required``), never
  a 2xx.

The gateway runs on an event loop in a thread of its own, so hypothesis's synchronous tests can
drive it; the fuzzer may revoke or demote the keys it uses, so each example checks them first
and makes fresh ones when needed. Bounded by ``max_examples`` per operation and key: the whole
module takes about 20-40 s on 2 busy cores.
"""

from __future__ import annotations

import asyncio
import itertools
import tempfile
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import schemathesis
from helpers import free_port, settings_for
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from fleetgate.api.routing import Route
from fleetgate.app import Gateway, create_app
from fleetgate.config import parse
from fleetgate.services import Context
from fleetgate.services import groups as group_svc
from fleetgate.services import users as user_svc
from fleetgate.services.keys import create_key

T = TypeVar("T")
FUZZ = settings(deadline=None, database=None, suppress_health_check=list(HealthCheck),
                phases=[Phase.explicit, Phase.generate, Phase.shrink])
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance, negative_data_rejection]
OPENAPI = "/admin/v1/openapi.json"


def _admin_routes() -> list[Route]:
    """The admin API's routes as the gateway declares them (collected without starting it)."""
    with tempfile.TemporaryDirectory() as tmp:
        app = create_app(parse({"store": {"url": f"sqlite:///{Path(tmp) / 'fg.db'}"}}))
        # The document describes every admin route but itself.
        routes = [r for r in app.router.routes
                  if r.path.startswith("/admin/v1/") and r.path != OPENAPI]
        if app.engine is not None:
            app.engine.dispose()
    return routes


ROUTES = _admin_routes()


class ThreadedGateway:
    """A started in-process gateway on its own event loop thread, with sync calls into it."""

    def __init__(self, tmp: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-gw", daemon=True)
        self.thread.start()
        self.app: Gateway = self.run(self._start(tmp))
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app),
                                        base_url="http://gw", timeout=30)
        self._serial = itertools.count()
        self.keys: dict[str, str] = {}

    async def _start(self, tmp: Path) -> Gateway:
        app = create_app(settings_for(tmp, f"http://127.0.0.1:{free_port()}"))
        await app.startup()
        return app

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def request(self, method: str, url: str, **kw: Any) -> httpx.Response:
        return self.run(self.client.request(method, url, **kw))

    def close(self) -> None:
        try:
            self.run(self.client.aclose())
            self.run(self.app.shutdown())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()

    # -- keys the fuzzer can't take away -----------------------------------------------------

    def _ctx(self) -> Context:
        assert self.app.engine is not None
        return Context(self.app.engine, self.app.settings)

    def _fresh(self, who: str) -> str:
        """A new user of that role (names the fuzzer won't guess) with a new key."""
        ctx = self._ctx()
        name = f"fuzz-{who}-{next(self._serial)}"
        if who == "admin":
            user_svc.create_user(ctx, name, role="admin")
        else:
            if not any(g.name == "fuzzers" for g in group_svc.list_groups(ctx)):
                group_svc.create_group(ctx, "fuzzers", models=["sim"])
            user_svc.create_user(ctx, name, groups=["fuzzers"])
        key, _ = create_key(ctx, name=f"{name}-key", user=name)
        return key

    def key(self, who: str) -> str:
        """A working key whose user still has the role ``who``."""
        key = self.keys.get(who)
        if key is not None:
            me = self.request("GET", "/admin/v1/me", headers=bearer(key))
            if me.status_code == 200 and me.json().get("role") == who:
                return key
        self.keys[who] = self._fresh(who)
        return self.keys[who]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def fuzz_gw() -> Iterator[ThreadedGateway]:
    with tempfile.TemporaryDirectory() as tmp:
        gw = ThreadedGateway(Path(tmp))
        try:
            yield gw
        finally:
            gw.close()


@pytest.fixture(scope="module")
def schema(fuzz_gw: ThreadedGateway) -> Any:
    resp = fuzz_gw.request("GET", OPENAPI)
    assert resp.status_code == 200
    return schemathesis.openapi.from_dict(resp.json())


def assert_openai_error(resp: httpx.Response) -> None:
    body = resp.json()
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), resp.text
    err = body["error"]
    assert {"message", "type", "param", "code"} <= set(err), err
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    assert err["param"] is None or isinstance(err["param"], str)
    assert err["code"] is None or isinstance(err["code"], str)


def test_the_document_lists_every_admin_route(schema: Any) -> None:
    listed = {(op.method.upper(), op.path) for op in
              (r.ok() for r in schema.get_all_operations())}
    assert listed == {(r.method, r.path) for r in ROUTES}


@pytest.mark.parametrize("who", ["admin", "user"])
@pytest.mark.parametrize("route", ROUTES, ids=lambda r: f"{r.method} {r.path}")
def test_fuzz_operation(fuzz_gw: ThreadedGateway, schema: Any, route: Route, who: str) -> None:
    op = schema[route.path][route.method]
    cases = st.one_of(op.as_strategy(generation_mode=GenerationMode.POSITIVE),
                      op.as_strategy(generation_mode=GenerationMode.NEGATIVE))
    sent: list[int] = []

    # A user key on an admin-only route is refused before its input is read: a few will do.
    @settings(FUZZ, max_examples=5 if (who, route.auth) == ("user", "admin") else 25)
    @given(case=cases)
    def one(case: Any) -> None:
        headers = bearer(fuzz_gw.key(who))
        kw = case.as_transport_kwargs(base_url="http://gw", headers=headers)
        body: dict[str, Any] = {}
        if "json" in kw:
            body["json"] = kw["json"]
        elif kw.get("data") is not None:
            body["content"] = kw["data"]
        resp = fuzz_gw.request(kw["method"], kw["url"], headers=kw["headers"],
                               params=kw.get("params") or None, **body)
        sent.append(resp.status_code)
        assert resp.status_code < 500, (kw["method"], kw["url"], body, resp.text)
        if resp.status_code >= 400:
            assert_openai_error(resp)
        # Negative cases may drop or mangle the Authorization header (a 401 then is right).
        if who == "user" and route.auth == "admin" and kw["headers"].get(
                "Authorization") == headers["Authorization"]:
            assert resp.status_code == 403, (kw["url"], resp.status_code, resp.text)
            assert resp.json()["error"]["code"] == "admin_required"
        case.validate_response(resp, checks=CHECKS, headers=kw["headers"])

    one()
    assert sent, "no request was sent"


# Found while fuzzing the admin API (probing the durations its document allows; random
# generation rarely makes numbers this long): a text duration with more days than a timedelta
# holds ("999999999w") was a 500 (OverflowError) on every route that takes one, and text
# durations weren't held to the 100-year bound numbers were.
@pytest.mark.parametrize("where", ["keys", "me/keys", "rotate"])
@pytest.mark.parametrize("value", ["999999999w", " 99999999999999d ", "36501d"])
def test_a_huge_text_duration_is_a_400(fuzz_gw: ThreadedGateway, where: str, value: str) -> None:
    admin = fuzz_gw.key("admin")
    if where == "rotate":
        made = fuzz_gw.request("POST", "/admin/v1/me/keys", headers=bearer(admin),
                               json={"name": "to-rotate"})
        assert made.status_code == 201, made.text
        url, body = f"/admin/v1/me/keys/{made.json()['id']}/rotate", {"overlap": value}
        param = "overlap"
    else:
        url, body, param = f"/admin/v1/{where}", {"name": "k", "expires": value}, "expires"
    resp = fuzz_gw.request("POST", url, headers=bearer(admin), json=body)
    assert resp.status_code == 400, resp.text
    assert_openai_error(resp)
    assert resp.json()["error"]["param"] == param


# Found by this fuzzer: GET /admin/v1/keys/%C2%B2 was a 500, because "²".isdigit() is true and
# int("²") raises. The audit log's ?limit had the same check, and its ?since the overflow above.
@pytest.mark.parametrize(("method", "path", "param"), [
    ("GET", "/admin/v1/keys/²", "id"),
    ("DELETE", "/admin/v1/keys/³", "id"),
    ("POST", "/admin/v1/keys/²/rotate", "id"),
    ("DELETE", "/admin/v1/me/keys/²", "id"),
    ("POST", "/admin/v1/me/keys/١/rotate", "id"),  # an Arabic-Indic one: int() takes it
    ("GET", "/admin/v1/audit?limit=²", "limit"),
    ("GET", "/admin/v1/audit?since=999999999w", "since"),
    ("GET", "/admin/v1/audit?since=5000000d", "since"),  # before year 1
])
def test_non_ascii_digits_and_huge_durations_in_the_url_are_400(
    fuzz_gw: ThreadedGateway, method: str, path: str, param: str
) -> None:
    resp = fuzz_gw.request(method, path, headers=bearer(fuzz_gw.key("admin")))
    assert resp.status_code == 400, resp.text
    assert_openai_error(resp)
    assert resp.json()["error"]["param"] == param
