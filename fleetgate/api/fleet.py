"""The fleet's HTTP surface, thin: parse, call :mod:`fleetgate.fleet.api_handlers`.

``/v1/fleet/*`` and ``/up`` (vLLM Autoserve's name for ``/v1/fleet/up``) need a key (what each caller may do is decided by ``api_handlers``);
``/metrics`` needs an admin key: it names replicas, states and failure counts.
"""

from __future__ import annotations

from typing import Any

import orjson

from fleetgate import metrics as prom
from fleetgate.api.asgi import read_body, send_json
from fleetgate.api.routing import Request, Route
from fleetgate.errors import InvalidRequest
from fleetgate.fleet import api_handlers
from fleetgate.fleet.pool import Pool
from fleetgate.fleet.templates import Templates

_FLEET_BODY_LIMIT = 64 * 1024


async def json_body(req: Request, limit: int = _FLEET_BODY_LIMIT) -> Any:
    raw = await read_body(req.scope, req.receive, limit)
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequest("The request body is not valid JSON.", code="invalid_json") from None


class FleetRoutes:
    def __init__(self, pool: Pool, templates: Templates | None = None) -> None:
        self.pool = pool
        self.templates = templates

    async def up(self, req: Request) -> None:
        status, doc = await api_handlers.fleet_up(
            self.pool, req.caller, await json_body(req), self.templates
        )
        await send_json(req.send, status, doc)

    async def down(self, req: Request) -> None:
        status, doc = await api_handlers.fleet_down(self.pool, req.caller, await json_body(req))
        await send_json(req.send, status, doc)

    async def status(self, req: Request) -> None:
        model = req.query().get("model", [None])[0]
        code, doc = await api_handlers.fleet_status(self.pool, req.caller, model, self.templates)
        await send_json(req.send, code, doc)

    async def metrics(self, req: Request) -> None:
        body = prom.render(self.pool).encode()
        await req.send({
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", prom.CONTENT_TYPE.encode()),
                (b"content-length", str(len(body)).encode()),
                (b"x-fleetgate-source", b"gateway"),
            ],
        })
        await req.send({"type": "http.response.body", "body": body})

    def routes(self) -> list[Route]:
        return [
            Route("POST", "/v1/fleet/up", self.up, "key", "Start a model (or keep it running)."),
            Route("POST", "/up", self.up, "key", "Start a model: /v1/fleet/up by Autoserve's name."),
            Route("POST", "/v1/fleet/down", self.down, "key", "Drain and stop a model."),
            Route("GET", "/v1/fleet/status", self.status, "key", "Models and replicas."),
            Route("GET", "/metrics", self.metrics, "admin", "Prometheus metrics."),
        ]
