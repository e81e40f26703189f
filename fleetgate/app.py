"""The ASGI application: routes, the error handler, and the lifespan that runs both planes.

Routing is an exact match on the decoded path the server hands us (``scope["path"]``) and the
method. Nothing is matched by prefix, nothing unlisted is passed upstream, and the upstream path
is always the matched route's own constant, never the client's text. Every error becomes the one
OpenAI-shaped envelope (:mod:`fleetgate.errors`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

import orjson
from sqlalchemy import Engine

from fleetgate.api import fleet as fleet_api
from fleetgate.api import openai as openai_api
from fleetgate.api.asgi import Receive, Scope, Send, send_error, send_json
from fleetgate.auth.authn import Authenticator
from fleetgate.config import Settings
from fleetgate.errors import GatewayError, MethodNotAllowed, NotFound
from fleetgate.fleet.pool import Pool
from fleetgate.proxy.client import Upstream
from fleetgate.store.db import migrate, open_engine
from fleetgate.store.usage_writer import UsageWriter

log = logging.getLogger("fleetgate")

Handler = Callable[["Gateway", Scope, Receive, Send], Awaitable[None]]


async def _health(gw: Gateway, scope: Scope, receive: Receive, send: Send) -> None:
    await send_json(send, 200, {"status": "ok"})


async def _ready(gw: Gateway, scope: Scope, receive: Receive, send: Send) -> None:
    if not gw.started:
        await send_json(send, 503, {"status": "starting"}, [(b"retry-after", b"1")])
    elif not gw.authn.store_readable():
        await send_json(send, 503, {"status": "key store unreadable"}, [(b"retry-after", b"5")])
    else:
        await send_json(send, 200, {"status": "ready"})


ROUTES: dict[str, dict[str, Handler]] = {
    "/health": {"GET": _health},
    "/ready": {"GET": _ready},
    "/v1/models": {"GET": openai_api.list_models},
    **{path: {"POST": openai_api.proxy} for path in openai_api.ENDPOINTS},
    "/v1/fleet/up": {"POST": fleet_api.up},
    "/v1/fleet/down": {"POST": fleet_api.down},
    "/v1/fleet/status": {"GET": fleet_api.status},
    "/metrics": {"GET": fleet_api.metrics},
}


class Gateway:
    """Everything one gateway process holds. Also the ASGI callable."""

    def __init__(self, settings: Settings, *, engine: Engine | None = None) -> None:
        self.settings = settings
        self.engine = engine if engine is not None else open_engine(settings.store.url)
        self.authn = Authenticator(settings.auth, self.engine)
        self.pool = Pool(settings)
        self.upstream = Upstream(settings.server)
        self.usage = UsageWriter(self.engine)
        self.started = False
        self._error_log: dict[str, tuple[float, int]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.routes = ROUTES
        # Per-model facts the request path needs, computed once.
        self.models = {m.name: m for m in settings.models}
        self.upstream_headers: dict[str, dict[str, str]] = {}
        self.rewrites: dict[str, tuple[bytes, bytes]] = {}
        self.model_entries: list[tuple[str, dict[str, object]]] = []
        self.affinity_models = {
            m.name for m in settings.models if m.balancer.strategy == "prefix_affinity"
        }
        created = int(time.time())
        for m in settings.models:
            h = {"Content-Type": "application/json"}
            if m.api_key:
                h["Authorization"] = f"Bearer {m.api_key}"
            self.upstream_headers[m.name] = h
            if m.served_name and m.served_name != m.name:
                self.rewrites[m.name] = (
                    b'"model":' + orjson.dumps(m.served_name),
                    b'"model":' + orjson.dumps(m.name),
                )
            entry: dict[str, object] = {
                "id": m.name,
                "object": "model",
                "created": created,
                "owned_by": "fleetgate",
            }
            if m.label:
                entry["label"] = m.label
            self.model_entries.append((m.name, entry))

    # -- lifecycle ------------------------------------------------------------------------------

    async def startup(self) -> None:
        await asyncio.to_thread(migrate, self.engine)
        if self.settings.auth.mode == "keys":
            try:
                n = await self.authn.reload()
                log.info("loaded %d active keys", n)
            except Exception as e:  # the refresher retries; until then requests fail closed
                log.warning("could not load keys at start-up: %s", type(e).__name__)
        await self.upstream.start()
        await self.pool.start()
        self._tasks = [
            asyncio.create_task(self.authn.run_refresher(), name="key-refresher"),
            asyncio.create_task(self.usage.run(), name="usage-writer"),
        ]
        self.started = True

    async def shutdown(self) -> None:
        self.started = False
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks = []
        await self.usage.flush()
        await self.authn.flush()
        await self.pool.stop()
        await self.upstream.stop()

    # -- ASGI -----------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            methods = self.routes.get(scope["path"])
            if methods is None:
                raise NotFound(
                    f"Invalid URL ({scope['method']} {scope['path'][:200]}).", code="unknown_url"
                )
            handler = methods.get(scope["method"])
            if handler is None:
                raise MethodNotAllowed(
                    f"Method {scope['method']} is not allowed on {scope['path']}."
                )
            await handler(self, scope, receive, send)
        except GatewayError as e:
            if e.status >= 500:
                self._log_server_error(e)
            await send_error(send, e)
        except ConnectionAbortedError:
            return
        except Exception:
            log.exception("unhandled error on %s %s", scope["method"], scope["path"][:200])
            await send_error(send, GatewayError("The gateway hit an internal error."))

    def _log_server_error(self, e: GatewayError) -> None:
        """Gateway-made 5xx answers, at most one line a second per code, with a count."""
        code = e.error_code or "internal_error"
        now = time.monotonic()
        last, count = self._error_log.get(code, (0.0, 0))
        if now - last >= 1.0:
            log.warning("answered %d %s (%d more since the last line): %s",
                        e.status, code, count, e.message)
            self._error_log[code] = (now, 0)
        else:
            self._error_log[code] = (last, count + 1)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as e:
                    log.exception("start-up failed")
                    await send({"type": "lifespan.startup.failed", "message": str(e)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return


def create_app(settings: Settings, *, engine: Engine | None = None) -> Gateway:
    return Gateway(settings, engine=engine)
