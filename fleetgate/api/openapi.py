"""An OpenAPI 3.1 document built from a list of declared routes, served as a public route.

The document is built once, from the same :class:`~fleetgate.api.routing.Route` objects the
dispatcher uses, so it can't drift from what is served: every route appears with its method,
path parameters, summary, whether it needs a bearer key, and its request body's schema.
"""

from __future__ import annotations

from typing import Any

import orjson

from fleetgate import __version__
from fleetgate.api.asgi import send_json
from fleetgate.api.routing import Request, Route

_ERROR = {
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "message": {"type": "string"}, "type": {"type": "string"},
                "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]},
                "source": {"type": "string"},
            },
            "required": ["message", "type", "param", "code"],
        }
    },
    "required": ["error"],
}


# Path parameters that are ids are whole numbers; the rest are names.
_PATH_SCHEMAS = {"id": {"type": "string", "pattern": "^[0-9]{1,18}$"}}


def document(
    routes: list[Route],
    bodies: dict[tuple[str, str], dict[str, Any]],
    queries: dict[tuple[str, str], dict[str, dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for r in routes:
        params = [
            {"name": seg[1:-1], "in": "path", "required": True,
             "schema": _PATH_SCHEMAS.get(seg[1:-1], {"type": "string"})}
            for seg in r.path.split("/") if seg.startswith("{")
        ]
        params += [
            {"name": name, "in": "query", "required": False, "schema": schema}
            for name, schema in (queries or {}).get((r.method, r.path), {}).items()
        ]
        op: dict[str, Any] = {
            "summary": r.summary,
            "operationId": f"{r.method.lower()}_{r.path.strip('/').replace('/', '_')}"
            .replace("{", "").replace("}", ""),
            "responses": {
                "200": {"description": "OK", "content": {"application/json": {}}},
                "default": {"description": "An error in OpenAI's shape.",
                            "content": {"application/json": {"schema": _ERROR}}},
            },
        }
        if r.method == "POST" and (r.method, r.path) in bodies and not r.path.endswith("rotate"):
            op["responses"]["201"] = {"description": "Created",
                                      "content": {"application/json": {}}}
        if params:
            op["parameters"] = params
        if r.auth != "public":
            op["security"] = [{"bearer": []}]
        body = bodies.get((r.method, r.path))
        if body is not None:
            op["requestBody"] = {
                "required": not r.path.endswith("rotate"),
                "content": {"application/json": {"schema": body}},
            }
        paths.setdefault(r.path, {})[r.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "FleetGate admin API", "version": __version__},
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "paths": paths,
    }


def openapi_route(
    path: str,
    routes: list[Route],
    bodies: dict[tuple[str, str], dict[str, Any]],
    queries: dict[tuple[str, str], dict[str, dict[str, Any]]] | None = None,
) -> Route:
    doc = orjson.dumps(document(routes, bodies, queries))

    async def handler(req: Request) -> None:
        await send_json(req.send, 200, doc)

    return Route("GET", path, handler, "public", "This OpenAPI document.")
