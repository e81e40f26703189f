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
    Unavailable,
    UpstreamUnreachable,
)
from fleetgate.fleet.balancer import affinity_key
from fleetgate.fleet.pool import Lease
from fleetgate.proxy.client import ClientGone
from fleetgate.proxy.relay import relay_stream, relay_whole
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


class _DisconnectWatch:
    """Watches ASGI ``receive`` for the client going away, and then fires ``gone``.

    Started lazily: most requests finish within ``delay_s``, and for them no task is ever
    created (a task per request cost about a tenth of the gateway's CPU in bench/run). A longer
    request (a generation) is watched from ``delay_s`` on, so a client that leaves stops the
    engine's work within about that long.
    """

    __slots__ = ("receive", "gone", "finished", "timer", "task")

    def __init__(self, receive: Receive, gone: ClientGone, delay_s: float = 0.25) -> None:
        self.receive = receive
        self.gone = gone
        self.finished = False
        self.task: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(
            delay_s, self._start
        )

    def _start(self) -> None:
        self.timer = None
        if not self.finished:
            self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            msg = await self.receive()
            if msg["type"] == "http.disconnect":
                if not self.finished:
                    self.gone.fire()
                return

    def stop(self) -> None:
        self.finished = True
        if self.timer is not None:
            self.timer.cancel()
        if self.task is not None:
            self.task.cancel()


async def proxy(gw: Gateway, scope: Scope, receive: Receive, send: Send) -> None:
    endpoint = ENDPOINTS[scope["path"]]
    started = time.monotonic()
    principal = await gw.authn.authenticate(header(scope, b"authorization"))
    raw = await read_body(scope, receive, gw.settings.server.max_body_bytes)
    req = parse(raw, endpoint)
    m = gw.models.get(req.model)
    if m is None:
        raise ModelNotFound(f"The model '{req.model[:200]}' does not exist.", param="model")
    if not principal.allows(m.name):
        raise PermissionDenied(f"This API key may not use the model '{m.name}'.", param="model")
    affinity = affinity_key(req.doc) if m.name in gw.affinity_models else None
    body, added_usage = upstream_body(raw, req, m)
    gone = ClientGone()
    watch = _DisconnectWatch(receive, gone)
    tap = UsageTap(hide_usage_event=added_usage, rewrite=gw.rewrites.get(m.name))
    status = 0
    lease: Lease | None = None
    sse_started = False
    try:
        try:
            lease = gw.pool.acquire(m.name, affinity_key=affinity)
        except Unavailable:
            if gw.pool.cold_start_mode(m.name) != "wait":
                raise
            sse_started = req.stream
            await _wait_for_replica(gw, m.name, send, gone, keepalive=req.stream)
            if gone.gone:
                return
            lease = gw.pool.acquire(m.name, affinity_key=affinity)
        url = lease.url + scope["path"]
        headers = gw.upstream_headers[m.name]
        try:
            resp = await gw.upstream.open(url, body, headers, gone)
        except UpstreamUnreachable as first:
            # Nothing reached the client yet: take the replica out and try once more elsewhere.
            gw.pool.report_connect_failure(lease)
            lease.release()
            lease = None
            try:
                lease = gw.pool.acquire(m.name, affinity_key=affinity)
            except Unavailable:
                raise first from None  # no other replica: say what happened, a 502
            resp = await gw.upstream.open(lease.url + scope["path"], body, headers, gone)
        status = resp.status
        if req.stream and resp.status == 200 and resp.content_type == "text/event-stream":
            await relay_stream(resp, _AfterHead(send, False) if sse_started else send, tap, gone)
        else:
            await relay_whole(resp, _AfterHead(send, True) if sse_started else send, tap)
    except GatewayError as e:
        status = e.status
        if not sse_started:
            raise
        # The SSE response already started while waiting: end it with the error event.
        await send({"type": "http.response.body", "body": e.sse_event(), "more_body": False})
    finally:
        watch.stop()
        if lease is not None:
            lease.release()
        _account(gw, principal, m.name, endpoint, status, req.stream, tap, started)


class _AfterHead:
    """``send`` for a response whose SSE head already went out during a cold-start wait.

    The relay's own response head is dropped. With ``as_event`` (the upstream answered with
    something other than a stream, i.e. an error) the body becomes the stream's final ``data:``
    event, since the status line can no longer change.
    """

    __slots__ = ("send", "as_event")

    def __init__(self, send: Send, as_event: bool) -> None:
        self.send = send
        self.as_event = as_event

    async def __call__(self, msg: dict[str, Any]) -> None:
        if msg["type"] == "http.response.start":
            return
        if self.as_event:
            data = msg.get("body", b"").strip()
            if data:
                msg = {**msg, "body": b"data: " + data + b"\n\n"}
        await self.send(msg)


# The head of a stream the gateway opens itself, before any replica answered (cold-start wait).
_WAIT_HEAD = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
    (b"x-fleetgate-source", b"gateway"),
]
_KEEPALIVE = b": waiting for the model to start\n\n"


async def _wait_for_replica(
    gw: Gateway, model: str, send: Send, gone: ClientGone, *, keepalive: bool
) -> None:
    """Cold start in ``wait`` mode. A streaming client gets SSE comments every few seconds."""
    if keepalive:
        await send({"type": "http.response.start", "status": 200, "headers": _WAIT_HEAD})
    wait = asyncio.ensure_future(gw.pool.wait_ready(model, gw.pool.wait_timeout(model)))
    try:
        while not gone.gone:
            done, _ = await asyncio.wait({wait}, timeout=gw.pool.keepalive_s(model))
            if done:
                wait.result()  # raises Unavailable on timeout or failure
                return
            if keepalive:
                await send({"type": "http.response.body", "body": _KEEPALIVE, "more_body": True})
    finally:
        if not wait.done():
            wait.cancel()


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
