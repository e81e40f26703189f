"""The OpenAI-compatible routes: parse only what we route and police on, relay the rest.

The body is parsed with orjson once to read ``model``, ``stream``, ``stream_options``,
``max_tokens`` and ``n``; it is forwarded byte for byte unless the model has a different upstream
name or the gateway must ask for streamed usage, and only then re-serialised.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import orjson

from fleetgate.api.asgi import Receive, Scope, Send, header, read_body, send_json
from fleetgate.auth.principals import Principal
from fleetgate.config import ModelSettings
from fleetgate.errors import (
    GatewayError,
    InvalidRequest,
    ModelNotFound,
    PermissionDenied,
)
from fleetgate.proxy.relay import ClientGone, relay_stream, relay_whole
from fleetgate.proxy.usage_tap import UsageTap
from fleetgate.store.repo import UsageEvent, utcnow

TYPE_CHECKING = False
if TYPE_CHECKING:
    from fleetgate.app import Gateway

ENDPOINTS: dict[str, str] = {
    "/v1/chat/completions": "chat.completions",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
}


@dataclass(slots=True)
class Routed:
    model: str
    stream: bool
    include_usage: bool
    doc: dict[str, Any]


def _int_field(doc: dict[str, Any], name: str, minimum: int) -> None:
    v = doc.get(name)
    if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < minimum):
        raise InvalidRequest(f"'{name}' must be an integer >= {minimum}.", param=name)


def parse(raw: bytes, endpoint: str) -> Routed:
    if not raw:
        raise InvalidRequest("The request body is empty; send a JSON object.")
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequest("The request body is not valid JSON.", code="invalid_json") from None
    if not isinstance(doc, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    model = doc.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest(
            "You must provide a model parameter.", param="model", code="missing_model"
        )
    stream = doc.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise InvalidRequest("'stream' must be a boolean.", param="stream")
    if stream and endpoint == "embeddings":
        raise InvalidRequest("Embeddings can't be streamed.", param="stream")
    opts = doc.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise InvalidRequest("'stream_options' must be an object.", param="stream_options")
    include_usage = bool(opts.get("include_usage")) if opts else False
    _int_field(doc, "max_tokens", 0)
    _int_field(doc, "max_completion_tokens", 0)
    _int_field(doc, "n", 1)
    return Routed(model, stream, include_usage, doc)


def upstream_body(raw: bytes, req: Routed, m: ModelSettings) -> tuple[bytes, bool]:
    """The bytes to send upstream, and whether the gateway added ``include_usage``."""
    changed = False
    added_usage = False
    if m.served_name and m.served_name != m.name:
        req.doc["model"] = m.served_name
        changed = True
    if req.stream and not req.include_usage:
        opts = dict(req.doc.get("stream_options") or {})
        opts["include_usage"] = True
        req.doc["stream_options"] = opts
        changed = added_usage = True
    return (orjson.dumps(req.doc) if changed else raw), added_usage


async def _watch(receive: Receive, gone: ClientGone, finished: asyncio.Event) -> None:
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            if not finished.is_set():
                gone.fire()
            return


async def proxy(gw: Gateway, scope: Scope, receive: Receive, send: Send) -> None:
    endpoint = ENDPOINTS[scope["path"]]
    started = time.monotonic()
    principal = await gw.authn.authenticate(header(scope, b"authorization"))
    raw = await read_body(scope, receive, gw.settings.server.max_body_bytes)
    req = parse(raw, endpoint)
    m = gw.settings.model(req.model)
    if m is None:
        raise ModelNotFound(
            f"The model '{req.model[:200]}' does not exist.", param="model", code="model_not_found"
        )
    if not principal.allows(m.name):
        raise PermissionDenied(f"This API key may not use the model '{m.name}'.", param="model")
    body, added_usage = upstream_body(raw, req, m)
    lease = gw.pool.acquire(m.name)
    gone = ClientGone()
    finished = asyncio.Event()
    watcher = asyncio.create_task(_watch(receive, gone, finished))
    tap = UsageTap(hide_usage_event=added_usage, rewrite=gw.rewrites.get(m.name))
    status = 0
    try:
        resp = await gw.upstream.open(
            lease.url + scope["path"], body, gw.upstream_headers[m.name], gone
        )
        status = resp.status
        if req.stream and resp.status == 200 and resp.content_type == "text/event-stream":
            await relay_stream(resp, send, tap, gone)
        else:
            await relay_whole(resp, send, tap)
    except GatewayError as e:
        status = e.status
        raise
    finally:
        finished.set()
        watcher.cancel()
        lease.release()
        _account(gw, principal, m.name, endpoint, status, req.stream, tap, started)


def _account(
    gw: Gateway,
    p: Principal,
    model: str,
    endpoint: str,
    status: int,
    stream: bool,
    tap: UsageTap,
    started: float,
) -> None:
    gw.usage.record(
        UsageEvent(
            key_id=p.key_id,
            model=model,
            endpoint=endpoint,
            status=status,
            stream=stream,
            prompt_tokens=tap.prompt_tokens,
            completion_tokens=tap.completion_tokens,
            latency_ms=int((time.monotonic() - started) * 1000),
            created_at=utcnow(),
        )
    )


async def list_models(gw: Gateway, scope: Scope, receive: Receive, send: Send) -> None:
    auth = header(scope, b"authorization")
    principal: Principal | None = None
    if auth is not None or not gw.settings.server.public_models_list:
        principal = await gw.authn.authenticate(auth)
    data = [entry for m, entry in gw.model_entries if principal is None or principal.allows(m)]
    await send_json(send, 200, {"object": "list", "data": data})
