"""The simulator's ASGI application: routes, timing, faults and counters.

Why raw ASGI (served by uvicorn with httptools and uvloop) rather than aiohttp.web or a
framework: the simulator is the upstream in benchmarks (thousands of requests per second,
thousands of open streams in one process), so the request path must be a dict lookup and a
few ``send`` calls, with no routing layer, request objects or middleware stack. ASGI also lets
tests drive the very same app in-process through ``httpx.ASGITransport``.

Promises:

* Routing is an exact ``(method, path)`` lookup; the API-key check is a property of the matched
  route (every ``/v1/*`` route), never of a path prefix.
* A generating request that waits (time to first token, token pacing) is watched for client
  disconnect; on disconnect the work stops at once and ``disconnects_total`` counts it.
  Requests that need no waiting are answered without a watcher.
* ``fail_mid_stream_after`` cuts a stream by raising :class:`StreamCut` out of the app, which
  makes the server close the transport with the chunked body unfinished. Under uvicorn, the
  server module filters the resulting traceback out of the log.
* Simulated crashes call ``exit_fn`` (``os._exit`` by default; in-process tests pass their
  own). ``crash_after_requests`` exits shortly after the Nth inference request *finished*, so
  that request's response reaches the client first.
* Counters and the last-request record are plain attributes mutated on the event loop; there
  are no locks because nothing else touches them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import os
import random
import sys
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson

from fleetgate.sim import shapes
from fleetgate.sim.options import CRASH_EXIT_CODE, SimOptions
from fleetgate.sim.shapes import GenRequest, SimError, StreamShapes

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

MAX_BODY_BYTES = 16 * 1024 * 1024

_JSON = (b"content-type", b"application/json")
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
]


def _unauthorized() -> SimError:
    return SimError(401, "Unauthorized: missing or wrong API key")


class StreamCut(Exception):
    """Raised out of the app to cut a stream mid-way (``fail_mid_stream_after``)."""


def hard_exit(code: int) -> None:
    """Exit the process at once, like a crashed engine: no cleanup, no graceful close."""
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


class SimStats:
    """Counters served by ``GET /sim/stats``."""

    __slots__ = (
        "requests_total",
        "active_streams",
        "disconnects_total",
        "completed_total",
        "streams_cut_total",
        "errors_total",
        "tokens_total",
    )

    def __init__(self) -> None:
        self.requests_total = 0  # inference requests (POST /v1/*) received
        self.active_streams = 0  # streaming responses in progress
        self.disconnects_total = 0  # requests abandoned because the client went away
        self.completed_total = 0  # requests answered in full (streams: through [DONE])
        self.streams_cut_total = 0  # streams cut on purpose by fail_mid_stream_after
        self.errors_total = 0  # 4xx answers
        self.tokens_total = 0  # completion tokens sent

    def reset(self) -> None:
        """Zero every counter but ``active_streams``, which tracks live work."""
        for k in self.__slots__:
            if k != "active_streams":
                setattr(self, k, 0)

    def as_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in self.__slots__}


class SimApp:
    """The ASGI app. ``SimApp(options)`` is all a server or an ``httpx.ASGITransport`` needs."""

    def __init__(self, options: SimOptions, *, exit_fn: Callable[[int], None] = hard_exit) -> None:
        self.options = options
        self.stats = SimStats()
        self.last_request: dict[str, Any] | None = None
        self.created = int(time.time())
        self._exit_fn = exit_fn
        self._exit_scheduled = False
        self._finished = 0
        self._dice = random.Random(options.seed)
        self._models = frozenset(options.models)
        self._key = f"Bearer {options.api_key}".encode() if options.api_key else None
        self._ttft = options.ttft_ms / 1000.0
        self._interval = 1.0 / options.tokens_per_s if options.tokens_per_s > 0 else 0.0
        self._models_body = shapes.models_response(
            options.models, self.created, options.max_model_len
        )
        # (method, path) -> (handler, is_v1). Every /v1 route is authenticated and recorded.
        self._routes: dict[tuple[str, str], tuple[Callable[..., Awaitable[None]], bool]] = {
            ("GET", "/health"): (self._health, False),
            ("GET", "/sim/stats"): (self._stats, False),
            ("GET", "/sim/last-request"): (self._last_request, False),
            ("POST", "/sim/reset"): (self._reset, False),
            ("GET", "/v1/models"): (self._list_models, True),
            ("POST", "/v1/chat/completions"): (self._chat, True),
            ("POST", "/v1/completions"): (self._completions, True),
            ("POST", "/v1/embeddings"): (self._embeddings, True),
        }
        self._paths = {p for _, p in self._routes}

    # -- ASGI entry -------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path, method = scope["path"], scope["method"]
        route = self._routes.get((method, path))
        if route is None:
            status = 405 if path in self._paths else 404
            msg = "Method Not Allowed" if status == 405 else f"No route for {method} {path}"
            await self._error(send, SimError(status, msg))
            return
        handler, is_v1 = route
        body = await _read_body(receive) if method == "POST" else b""
        if not is_v1:
            await handler(send, body)
            return
        parsed, bad_json = _parse_json(body)
        self._record(scope, parsed)
        if method == "GET":  # /v1/models: authenticated, but not an inference request
            if self._key is not None and not self._authorized(scope):
                await self._error(send, _unauthorized())
            else:
                await handler(send, parsed)
            return
        self.stats.requests_total += 1
        try:
            if (
                self.options.crash_probability
                and self._dice.random() < self.options.crash_probability
            ):
                sys.stderr.write("fleetgate-sim: simulated crash (crash_probability)\n")
                self._exit_fn(CRASH_EXIT_CODE)  # returns only under an in-process exit_fn
            if self._key is not None and not self._authorized(scope):
                raise _unauthorized()
            if body is None:
                raise SimError(413, f"request body exceeds {MAX_BODY_BYTES} bytes")
            if bad_json:
                raise SimError(400, "request body is not valid JSON")
            if not isinstance(parsed, dict):
                raise SimError(400, "request body must be a JSON object")
            model = parsed.get("model")
            if not isinstance(model, str) or model not in self._models:
                raise SimError(404, f"The model `{model}` does not exist.", param="model")
            await handler(send, receive, parsed)
        except SimError as e:
            await self._error(send, e)
        finally:
            self._request_finished()

    # -- bookkeeping ------------------------------------------------------------------------

    def _record(self, scope: Scope, parsed: Any) -> None:
        headers: dict[str, str] = {}
        for k, v in scope["headers"]:
            name = k.decode("latin-1").lower()
            value = v.decode("latin-1")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        self.last_request = {
            "method": scope["method"],
            "path": scope["path"],
            "headers": headers,
            "body": parsed,
        }

    def _authorized(self, scope: Scope) -> bool:
        assert self._key is not None
        for k, v in scope["headers"]:
            if k == b"authorization":
                return hmac.compare_digest(v, self._key)
        return False

    def _request_finished(self) -> None:
        self._finished += 1
        limit = self.options.crash_after_requests
        if limit is not None and self._finished >= limit and not self._exit_scheduled:
            self._exit_scheduled = True
            sys.stderr.write(f"fleetgate-sim: simulated crash after {limit} requests\n")
            # A short grace lets the transport flush the response that just finished.
            asyncio.get_running_loop().call_later(0.05, self._exit_fn, CRASH_EXIT_CODE)

    async def _error(self, send: Send, err: SimError) -> None:
        self.stats.errors_total += 1
        await _send_json(send, err.status, err.to_bytes())

    # -- control endpoints ------------------------------------------------------------------

    async def _health(self, send: Send, _body: Any) -> None:
        await _send_json(send, 200, b'{"status":"ok"}')

    async def _stats(self, send: Send, _body: Any) -> None:
        data: dict[str, Any] = self.stats.as_dict()
        data["models"] = list(self.options.models)
        await _send_json(send, 200, orjson.dumps(data))

    async def _last_request(self, send: Send, _body: Any) -> None:
        await _send_json(send, 200, orjson.dumps(self.last_request))

    async def _reset(self, send: Send, _body: Any) -> None:
        self.stats.reset()
        self.last_request = None
        await _send_json(send, 200, b'{"status":"reset"}')

    async def _list_models(self, send: Send, _body: Any) -> None:
        await _send_json(send, 200, self._models_body)

    # -- inference endpoints ----------------------------------------------------------------

    async def _chat(self, send: Send, receive: Receive, body: dict[str, Any]) -> None:
        await self._generate(send, receive, shapes.parse_generation("chat", body))

    async def _completions(self, send: Send, receive: Receive, body: dict[str, Any]) -> None:
        await self._generate(send, receive, shapes.parse_generation("completion", body))

    async def _embeddings(self, send: Send, receive: Receive, body: dict[str, Any]) -> None:
        items, dim, b64 = shapes.parse_embedding(body, self.options.embedding_dim)
        out = shapes.embedding_response(body["model"], items, dim, b64, int(time.time()))
        await _send_json(send, 200, out)
        self.stats.completed_total += 1

    async def _generate(self, send: Send, receive: Receive, req: GenRequest) -> None:
        if req.stream:
            await self._watched(receive, self._stream(send, req), stream=True)
            return
        delay = self._ttft + self._interval * max(req.tokens - 1, 0)
        if delay > 0:
            done = await self._watched(receive, asyncio.sleep(delay), stream=False)
            if not done:
                return
        await _send_json(send, 200, shapes.full_response(req, int(time.time())))
        self.stats.tokens_total += req.completion_tokens
        self.stats.completed_total += 1

    async def _watched(self, receive: Receive, work: Awaitable[None], *, stream: bool) -> bool:
        """Run ``work`` until it ends or the client disconnects. True when it ended."""
        task = asyncio.current_task()
        assert task is not None
        gone = ended = False

        async def watch() -> None:
            nonlocal gone
            while True:  # bounded by the connection: ends on http.disconnect
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    if not ended:  # some servers report "disconnect" once a response is done
                        gone = True
                        task.cancel()
                    return

        watcher = asyncio.get_running_loop().create_task(watch())
        if stream:
            self.stats.active_streams += 1
        try:
            await work
            ended = True
            return True
        except asyncio.CancelledError:
            if not gone:
                raise
            task.uncancel()
            self.stats.disconnects_total += 1
            return False
        finally:
            watcher.cancel()
            if stream:
                self.stats.active_streams -= 1

    async def _stream(self, send: Send, req: GenRequest) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
        ev = StreamShapes(req, int(time.time()))
        loop = asyncio.get_running_loop()
        cut = self.options.fail_mid_stream_after
        interval, choices = self._interval, req.choices
        if self._ttft > 0:
            await asyncio.sleep(self._ttft)
        usage_each = req.continuous_usage
        if usage_each and ev.role(0):
            head = b"".join(ev.with_usage(ev.role(j), 0) for j in range(choices))
        else:
            head = b"".join(ev.role(j) for j in range(choices))
        if cut == 0:
            await _body(send, head)
            self.stats.streams_cut_total += 1
            raise StreamCut
        start = loop.time()
        for i in range(req.tokens):
            if i:
                if interval:
                    delay = start + i * interval - loop.time()
                    await asyncio.sleep(delay if delay > 0 else 0)
                else:
                    await asyncio.sleep(0)  # as fast as possible, but let others run
            if usage_each:
                chunk = b"".join(ev.with_usage(ev.token(j, i), i + 1) for j in range(choices))
            else:
                chunk = b"".join(ev.token(j, i) for j in range(choices))
            await _body(send, head + chunk if i == 0 else chunk)
            self.stats.tokens_total += choices
            if cut is not None and i + 1 >= cut:
                self.stats.streams_cut_total += 1
                raise StreamCut
        if usage_each:
            tail = b"".join(ev.with_usage(ev.final(j), req.tokens) for j in range(choices))
        else:
            tail = b"".join(ev.final(j) for j in range(choices))
        if req.include_usage:
            tail += ev.usage()
        await send({"type": "http.response.body", "body": tail + shapes.DONE, "more_body": False})
        self.stats.completed_total += 1


def _parse_json(body: bytes | None) -> tuple[Any, bool]:
    """``(value, is_bad)``; an empty or oversized body parses as ``(None, False)``."""
    if not body:
        return None, False
    try:
        return orjson.loads(body), False
    except orjson.JSONDecodeError:
        return None, True


async def _body(send: Send, data: bytes) -> None:
    await send({"type": "http.response.body", "body": data, "more_body": True})


async def _send_json(send: Send, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [_JSON, (b"content-length", b"%d" % len(body))],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _read_body(receive: Receive) -> bytes | None:
    """The whole request body, or None when it exceeds :data:`MAX_BODY_BYTES`."""
    msg = await receive()
    body = msg.get("body", b"")
    if not msg.get("more_body", False):
        return body  # the common case: one message, no copy
    parts = [body]
    size = len(body)
    while msg.get("more_body", False):
        msg = await receive()
        if msg["type"] == "http.disconnect":
            break
        parts.append(msg.get("body", b""))
        size += len(parts[-1])
        if size > MAX_BODY_BYTES:
            return None
    return b"".join(parts)
