"""The ASGI application: it builds both planes once, dispatches, and renders every error.

:class:`Gateway` holds the parts (settings, store engine, key cache, routing table, pool,
upstream client, usage writer), builds the data-plane :class:`~fleetgate.dataplane.pipeline.
Pipeline` and the :class:`~fleetgate.api.routing.Router` from each surface's declared routes,
and runs the control-plane tasks in its lifespan. Routing is an exact match on the decoded path
and the method (templates for the admin API's ids); nothing unlisted is passed upstream. Every
error becomes the one OpenAI-shaped envelope (:mod:`fleetgate.errors`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING

from sqlalchemy import Engine

from fleetgate.api.admin import AdminRoutes
from fleetgate.api.asgi import Receive, Scope, Send, send_error, send_json
from fleetgate.api.callbacks import CallbackRoutes
from fleetgate.api.fleet import FleetRoutes
from fleetgate.api.localguard import LoopbackGuard
from fleetgate.api.openai import OpenAIRoutes
from fleetgate.api.routing import Request, Route, Router
from fleetgate.auth.authn import Authenticator
from fleetgate.auth.networks import parse_networks
from fleetgate.config import Settings
from fleetgate.dataplane.admission import Admitter
from fleetgate.dataplane.express import ExpressDoor
from fleetgate.dataplane.pipeline import Pipeline
from fleetgate.dataplane.request import ENDPOINTS
from fleetgate.dataplane.routes import RouteTable
from fleetgate.errors import GatewayError
from fleetgate.fleet.pool import Pool
from fleetgate.fleet.templates import Templates
from fleetgate.limits import quotas
from fleetgate.limits.backend import create as create_backend
from fleetgate.limits.spec import Quota, Subject
from fleetgate.proxy.client import Upstream
from fleetgate.store import repo
from fleetgate.store.db import migrate, open_engine
from fleetgate.store.usage_writer import UsageWriter

if TYPE_CHECKING:
    from fleetgate.portal.routes import PortalRoutes

log = logging.getLogger("fleetgate")


class Gateway:
    """Everything one gateway process holds. Also the ASGI callable."""

    def __init__(self, settings: Settings, *, engine: Engine | None = None) -> None:
        self.settings = settings
        self.engine = engine if engine is not None else open_engine(settings.store.url)
        self.authn = Authenticator(settings.auth, self.engine)
        self.pool = Pool(settings)
        self.upstream = Upstream(settings.server)
        self.usage = UsageWriter(self.engine)
        self.models = RouteTable.from_models(settings.models)
        self.templates = Templates(
            settings.templates, self.pool, self.models, settings.fleet.control_interval_s
        )
        lim = settings.limits
        self.limits = create_backend(
            lim.backend,
            **({"url": lim.redis_url, "fail_open": lim.redis_fail_open}
               if lim.backend == "redis" else {}),
        )
        self.pipeline = Pipeline(
            authn=self.authn,
            routes=self.models,
            pool=self.pool,
            upstream=self.upstream,
            usage=self.usage,
            max_body_bytes=settings.server.max_body_bytes,
            admitter=Admitter(self.limits),
            unknown_model=self.templates.route_for if self.templates else None,
        )
        self.templates.on_forget = self.pipeline.admitter.forget
        self.admin = AdminRoutes(self.engine, settings) if settings.auth.mode == "keys" else None
        self.portal: PortalRoutes | None = None  # set by build_routes when portal.enabled
        self.router = Router(
            self.build_routes(),
            self.authn.authenticate,
            on_denied=self.admin.on_denied if self.admin is not None else None,
            trusted_proxies=parse_networks(settings.server.trusted_proxies),
        )
        self.guard = LoopbackGuard(settings.server.host) if settings.auth.mode == "none" else None
        # The OpenAI routes the express path may take: those the router declares ``key`` (the
        # express path enforces that auth, from the same key cache), in key mode only.
        self._express = {
            e.path: e for e in ENDPOINTS
            if settings.auth.mode == "keys" and self.router.match("POST", e.path)[0].auth == "key"
        }
        self.express_paths = frozenset(self._express)
        # FleetGate's own server offers those requests here first (see ExpressDoor).
        self.express = ExpressDoor(self.authn, self.pipeline, self._express, self._answer_error).offer
        self.started = False
        self._error_log: dict[str, tuple[float, int]] = {}
        self._tasks: list[asyncio.Task[None]] = []

    def build_routes(self) -> list[Route]:
        return [
            Route("GET", "/health", self._health, "public", "Liveness."),
            Route("GET", "/ready", self._ready, "public", "Readiness: started, keys readable."),
            *OpenAIRoutes(
                self.pipeline, public_models_list=self.settings.server.public_models_list
            ).routes(),
            *FleetRoutes(self.pool, self.templates).routes(),
            *CallbackRoutes(self.pool.control).routes(),  # public: one-time job tokens
            # Users, groups and keys live in the store: only key mode has them.
            *(self.admin.routes() if self.admin is not None else ()),
            *(self._portal_routes() if self.settings.portal.enabled else ()),
        ]

    def _portal_routes(self) -> list[Route]:
        from fleetgate.portal.routes import PortalRoutes  # Jinja2 and ldap3 only when enabled

        self.portal = PortalRoutes(self.engine, self.settings, self.pool)
        return self.portal.routes()

    # -- public routes --------------------------------------------------------------------------

    async def _health(self, req: Request) -> None:
        await send_json(req.send, 200, {"status": "ok"})

    async def _ready(self, req: Request) -> None:
        if not self.started:
            await send_json(req.send, 503, {"status": "starting"}, [(b"retry-after", b"1")])
        elif not self.authn.store_readable():
            await send_json(
                req.send, 503, {"status": "key store unreadable"}, [(b"retry-after", b"5")]
            )
        else:
            await send_json(req.send, 200, {"status": "ready"})

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
        await self.limits.start()
        if self.settings.auth.mode == "keys":
            await self._seed_quotas()
        await self.pool.start()
        self._tasks = [
            asyncio.create_task(self.authn.run_refresher(), name="key-refresher"),
            asyncio.create_task(self.usage.run(), name="usage-writer"),
        ]
        if self.templates:
            self._tasks.append(asyncio.create_task(self.templates.run(), name="templates"))
        self.started = True

    async def _seed_quotas(self) -> None:
        """Start each quota's counter at what the usage records say was used this period, so a
        restart doesn't hand out a month's quota again (Redis keeps a counter that exists)."""
        now = time.time()
        try:
            found = await asyncio.to_thread(
                repo.quota_usage, self.engine,
                quotas.period_start(now, "day").replace(tzinfo=None),
                quotas.period_start(now, "month").replace(tzinfo=None))
            for q in found:
                await self.limits.seed_quota(Subject.of(q.kind, q.name),
                                             Quota(q.tokens, q.period),  # type: ignore[arg-type]
                                             q.used, now)
        except Exception as e:
            log.error("could not seed quota counters from the usage records (%s): quotas count "
                      "from zero until the next period", type(e).__name__)
        else:
            if found:
                log.info("seeded %d quota counters from the usage records", len(found))

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
        await self.limits.close()
        await self.upstream.stop()

    # -- ASGI -----------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def guarded(self, scope: Scope, send: Send, work: Awaitable[None]) -> None:
        """Run a request's work (the router, or an express request's task) under the one error
        handler."""
        try:
            await work
        except GatewayError as e:
            await self._answer_error(scope, send, e)
        except ConnectionAbortedError:
            return
        except Exception:
            log.exception("unhandled error on %s %s", scope["method"], scope["path"][:200])
            await send_error(send, GatewayError("The gateway hit an internal error."))

    async def _answer_error(self, scope: Scope, send: Send, e: GatewayError) -> None:
        if e.status >= 500:
            self._log_server_error(e)
        if self.portal is not None and scope["path"].startswith("/portal"):
            await self.portal.error_page(scope, send, e)  # a browser's page, not JSON
            return
        await send_error(send, e)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.guarded(scope, send, self._route(scope, receive, send))

    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.guard is not None:
            self.guard.check(scope)
        await self.router(scope, receive, send)

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
