"""The fleet's HTTP surface, thin: authenticate, parse, call :mod:`fleetgate.fleet.api_handlers`.

``/metrics`` is admin-only: it names replicas, states and failure counts.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs

import orjson

from fleetgate import metrics as prom
from fleetgate.api.asgi import Receive, Scope, Send, header, read_body, send_json
from fleetgate.auth.principals import Principal
from fleetgate.errors import InvalidRequest, PermissionDenied
from fleetgate.fleet import api_handlers

TYPE_CHECKING = False
if TYPE_CHECKING:
    from fleetgate.app import Gateway

_FLEET_BODY_LIMIT = 64 * 1024


async def _principal(gw: Gateway, scope: Scope) -> Principal:
    return await gw.authn.authenticate(header(scope, b"authorization"))


async def _json_body(scope: Scope, receive: Receive) -> Any:
    raw = await read_body(scope, receive, _FLEET_BODY_LIMIT)
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequest("The request body is not valid JSON.", code="invalid_json") from None


async def up(gw: Gateway, scope: Scope, receive: Receive, send: Send) -> None:
    p = await _principal(gw, scope)
    status, doc = await api_handlers.fleet_up(gw.pool, p, await _json_body(scope, receive))
    await send_json(send, status, doc)


async def down(gw: Gateway, scope: Scope, receive: Receive, send: Send) -> None:
    p = await _principal(gw, scope)
    status, doc = await api_handlers.fleet_down(gw.pool, p, await _json_body(scope, receive))
    await send_json(send, status, doc)


async def status(gw: Gateway, scope: Scope, receive: Receive, send: Send) -> None:
    p = await _principal(gw, scope)
    qs = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    model = qs.get("model", [None])[0]
    code, doc = await api_handlers.fleet_status(gw.pool, p, model)
    await send_json(send, code, doc)


async def metrics(gw: Gateway, scope: Scope, receive: Receive, send: Send) -> None:
    p = await _principal(gw, scope)
    if not p.admin:
        raise PermissionDenied("Only an admin key may read /metrics.", code="admin_required")
    body = prom.render(gw.pool).encode()
    await send({
        "type": "http.response.start",
        "status": 200,
        "headers": [
            (b"content-type", prom.CONTENT_TYPE.encode()),
            (b"content-length", str(len(body)).encode()),
            (b"x-fleetgate-source", b"gateway"),
        ],
    })
    await send({"type": "http.response.body", "body": body})

