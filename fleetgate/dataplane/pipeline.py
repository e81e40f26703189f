"""The data plane: one request's path, as named steps.

    authenticate -> parse -> authorize -> admit -> acquire -> relay -> account

:meth:`Pipeline.handle` runs them for the OpenAI routes. The dispatcher (:mod:`fleetgate.app`)
has already run :meth:`Pipeline.authenticate` for every route that declares it needs a key, so
``handle`` starts from a :class:`~fleetgate.auth.principals.Principal`.

:meth:`Pipeline.express` runs the same steps without a task, on FleetGate's own server, for a
request whose body is in and whose key is cached: the usual request (a ready replica, an idle
upstream connection, a whole answer) is sent and answered from callbacks. What must wait goes on
in a task, in :meth:`Pipeline._serve`, the code ``handle`` runs after ``admit``. Either way one
:class:`Flight` carries the admitted request and :meth:`Pipeline._finish` ends it.

Promises:

* No step waits on slow work. Keys, routes and the routing table are in memory; usage goes onto
  an in-memory queue that the control plane writes in batches. The only awaits are the client's
  body, the upstream, and, in cold-start ``wait`` mode, the replica the controller is starting.
* The upstream path is the endpoint's constant, never the client's text; the client's headers
  are never forwarded, only the route's own.
* Every request that reached ``parse`` is accounted for, whatever its outcome, with the usage the
  upstream reported (or, for a client that left mid-stream, what the engine had generated).
* A connection that fails before any byte came back is retried once on another replica; the
  failed replica leaves routing until a probe passes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from fleetgate.api.exchange import Exchange, NativeExchange
from fleetgate.auth.authn import Authenticator
from fleetgate.auth.principals import Principal
from fleetgate.dataplane import request as reqmod
from fleetgate.dataplane.admission import Admitter
from fleetgate.dataplane.request import Endpoint, ParsedRequest
from fleetgate.dataplane.routes import ModelRoute, RouteTable
from fleetgate.dataplane.waiting import (
    QUEUED,
    AfterHead,
    StreamHead,
    wait_for_replica,
    wait_with_keepalive,
)
from fleetgate.errors import (
    GatewayError,
    InvalidRequest,
    ModelNotFound,
    PermissionDenied,
    Unavailable,
    UpstreamUnreachable,
)
from fleetgate.fleet.balancer import affinity_key
from fleetgate.fleet.pool import Lease, Pool
from fleetgate.limits.backend import Grant
from fleetgate.limits.backend import create as create_backend
from fleetgate.limits.fairshare import FairGate, Slot, abandon
from fleetgate.proxy.client import ClientGone, Upstream, UpstreamResponse
from fleetgate.proxy.relay import finish_whole, relay_stream, relay_whole
from fleetgate.proxy.usage_tap import UsageTap
from fleetgate.store.repo import usage_event
from fleetgate.store.usage_writer import UsageWriter

log = logging.getLogger("fleetgate")


class Pipeline:
    def __init__(
        self,
        *,
        authn: Authenticator,
        routes: RouteTable,
        pool: Pool,
        upstream: Upstream,
        usage: UsageWriter,
        max_body_bytes: int,
        admitter: Admitter | None = None,
        unknown_model: Callable[[Principal, str], ModelRoute] | None = None,
    ) -> None:
        # A model name not in the table: started from a template (fleet/templates.py), or an
        # error of its own; None: 404.
        self.unknown_model = unknown_model
        self.admitter = admitter if admitter is not None else Admitter(create_backend("memory"))
        self.authn = authn
        self.routes = routes
        self.pool = pool
        self.upstream = upstream
        self.usage = usage
        self.max_body_bytes = max_body_bytes

    # -- the steps ------------------------------------------------------------------------------

    async def authenticate(self, authorization: bytes | None) -> Principal:
        return await self.authn.authenticate(authorization)

    @staticmethod
    def parse(raw: bytes, endpoint: Endpoint) -> ParsedRequest:
        return reqmod.parse(raw, endpoint)

    def authorize(self, principal: Principal, req: ParsedRequest) -> ModelRoute:
        """The request's route, if the model exists (404) and the caller may use it (403)."""
        route = self.routes.get(req.model)
        if route is None:
            if self.unknown_model is not None:
                return self.unknown_model(principal, req.model)
            raise ModelNotFound(f"The model '{req.model[:200]}' does not exist.", param="model")
        if not principal.allows(route.name):
            raise PermissionDenied(
                f"This API key may not use the model '{route.name}'.", param="model"
            )
        return route

    def admit(
        self, principal: Principal, route: ModelRoute, req: ParsedRequest
    ) -> Grant | Awaitable[Grant]:
        """Caps (400), then every rate limit, concurrency cap and quota that applies (429),
        in one backend call; nothing to check costs a dict lookup. The memory backend decides
        at once; await what isn't a Grant yet (Redis)."""
        return self.admitter.admit(principal, route, req)

    def queue(
        self, principal: Principal, route: ModelRoute, head: StreamHead | None, gone: ClientGone
    ) -> Slot | None | Awaitable[Slot | None]:
        """Fair share: a slot on a model with ``max_inflight_per_replica``, waiting in the
        caller's queue when they are all taken (await what isn't a Slot yet). None when the
        model has no gate (or the client left while queued)."""
        gate = self.admitter.gate(route)
        if gate is None:
            return None
        self.admitter.resize(gate, route, self.pool.ready_count(route.name))
        slot = gate.try_acquire()
        if slot is not None:
            return slot
        return self._wait_in_queue(gate, principal, route, head, gone)

    async def _wait_in_queue(
        self,
        gate: FairGate,
        principal: Principal,
        route: ModelRoute,
        head: StreamHead | None,
        gone: ClientGone,
    ) -> Slot | None:
        waiting = asyncio.ensure_future(gate.acquire(principal.user, principal.weight))
        try:
            slot = await wait_with_keepalive(
                waiting, head, gone, self.pool.keepalive_s(route.name), what=QUEUED
            )
        except BaseException:
            abandon(waiting)
            raise
        if slot is None:  # the client left; a slot handed over at that instant goes back
            abandon(waiting)
        return slot

    def acquire(
        self,
        principal: Principal,
        route: ModelRoute,
        affinity: bytes | None,
        head: StreamHead | None,
        gone: ClientGone,
    ) -> Lease | Awaitable[Lease | None]:
        """A lease on a ready replica, or (await it) the wait through a cold start if the model
        says so, None when the client left while waiting."""
        try:
            return self.pool.acquire(route.name, affinity_key=affinity)
        except Unavailable as e:
            if self.pool.cold_start_mode(route.name) != "wait":
                raise _for(principal, e) from None
        return self._wait_for_replica(principal, route, affinity, head, gone)

    async def _wait_for_replica(
        self,
        principal: Principal,
        route: ModelRoute,
        affinity: bytes | None,
        head: StreamHead | None,
        gone: ClientGone,
    ) -> Lease | None:
        try:
            await wait_for_replica(self.pool, route.name, head, gone)
            if gone.gone:
                return None
            return self.pool.acquire(route.name, affinity_key=affinity)
        except Unavailable as e:
            raise _for(principal, e) from None

    def account(
        self,
        principal: Principal,
        route: ModelRoute,
        endpoint: Endpoint,
        status: int,
        stream: bool,
        tap: UsageTap,
        started: float,
        gone: ClientGone | None = None,
    ) -> None:
        first = tap.first_byte_at
        now = time.monotonic()
        # All of it, in the table's column order: this runs once per request.
        self.usage.record(
            usage_event((
                principal.key_id,
                route.name,
                endpoint.name,
                status,
                stream,
                tap.prompt_tokens,
                tap.completion_tokens,
                int((now - started) * 1000),
                time.time(),
                principal.user_id,
                int((first - started) * 1000) if first is not None else None,
                # A client that left before any answer (while queued, say) is a disconnect too.
                tap.disconnected or (gone is not None and gone.gone and first is None),
            ))
        )

    # -- the whole path -------------------------------------------------------------------------

    async def handle(self, endpoint: Endpoint, principal: Principal, ex: Exchange) -> None:
        started = time.monotonic()
        raw = await ex.body(self.max_body_bytes)
        req, route, affinity, up, grant = self._admit_body(endpoint, principal, raw)
        if not isinstance(grant, Grant):
            grant = await grant
        await self._serve(Flight(endpoint, principal, ex, started, req, route, affinity, up, grant))

    def _admit_body(
        self, endpoint: Endpoint, principal: Principal, raw: bytes
    ) -> tuple[ParsedRequest, ModelRoute, bytes | None, reqmod.UpstreamBody,
               Grant | Awaitable[Grant]]:
        """parse, authorize, admit: the steps before any wait but admission's own."""
        req = self.parse(raw, endpoint)
        route = self.authorize(principal, req)
        affinity = _affinity(req) if route.affinity else None
        priority = _priority(principal) if route.settings.admission.pass_priority else None
        up = reqmod.upstream_body(raw, req, route.upstream_name, priority)
        return req, route, affinity, up, self.admit(principal, route, req)

    def express(self, endpoint: Endpoint, principal: Principal, ex: NativeExchange) -> None:
        """The same steps for a request whose body is in and whose key is cached, run at once
        on the event loop's callback: no task, unless a step has to wait. The usual request
        (a ready replica, an idle upstream connection, a whole answer) never waits for one: its
        answer is relayed from the upstream connection's own callback. Whatever must wait (a
        queue, a cold start, a new connection, a stream, a failure to retry) goes on as a task
        running the same code :meth:`handle` runs, from where the request stands."""
        started = time.monotonic()
        # A GatewayError from these steps goes to the caller, to answer as handle's would be.
        raw = ex.body_now(self.max_body_bytes)
        req, route, affinity, up, grant = self._admit_body(endpoint, principal, raw)
        if not isinstance(grant, Grant):
            ex.resume(self._admitted(endpoint, principal, ex, started, req, route, affinity, up,
                                     grant))
            return
        f = Flight(endpoint, principal, ex, started, req, route, affinity, up, grant)
        try:
            if not self._send_now(f, ex):
                ex.resume(self._serve(f))  # the steps that wait, as handle runs them
        except BaseException:
            self._finish(f)
            raise

    def _send_now(self, f: Flight, ex: NativeExchange) -> bool:
        """Send an express request upstream at once, if nothing has to wait: no stream, no
        fair-share gate, a ready replica and an idle connection to it."""
        route = f.route
        if f.req.stream or route.settings.admission.max_inflight_per_replica is not None:
            return False
        try:
            lease = f.lease = self.pool.acquire(route.name, affinity_key=f.affinity)
        except Unavailable:
            return False  # the task's acquire says why, or waits for the cold start
        f.pipeline = self
        f.native = ex
        try:
            resp = self.upstream.send_now(
                lease.url + f.endpoint.path, f.up.body, route.headers, f.gone, f.on_upstream
            )
        except GatewayError:
            resp = None  # (a URL it can't use) the task's open says so, as handle's would
        if resp is None:  # no idle connection: the task opens one, on this lease
            f.pipeline = f.native = None
            return False
        f.resp = resp
        return True

    async def _admitted(
        self, endpoint: Endpoint, principal: Principal, ex: Exchange, started: float,
        req: ParsedRequest, route: ModelRoute, affinity: bytes | None, up: reqmod.UpstreamBody,
        pending: Awaitable[Grant],
    ) -> None:
        grant = await pending
        await self._serve(Flight(endpoint, principal, ex, started, req, route, affinity, up, grant))

    def _express_done(self, f: Flight) -> None:
        """The upstream's answer changed state under an express request (see :meth:`express`)."""
        resp, ex = f.resp, f.native
        assert resp is not None and ex is not None
        if not resp.complete_whole():
            if resp.started or resp.failed:
                # A body in several reads, or a failure: the rest as handle runs it.
                resp.notify = None
                f.resp = f.pipeline = None
                ex.resume(self._serve(f, resp))
            return
        resp.notify = None  # (it named the flight, which names it)
        f.resp = f.pipeline = None
        try:
            f.status = resp.status
            finish_whole(resp, ex, f.tap)
        finally:
            self._finish(f)

    async def _serve(self, f: Flight, sent: UpstreamResponse | None = None) -> None:
        endpoint, principal, ex, req, route, gone = f.endpoint, f.principal, f.ex, f.req, f.route, f.gone
        affinity, up, tap = f.affinity, f.up, f.tap
        head = StreamHead(ex) if req.stream else None
        try:
            if f.lease is None:  # (an express request may hold one already: no gate, no wait)
                queued = self.queue(principal, route, head, gone)
                f.slot = queued if queued is None or isinstance(queued, Slot) else await queued
                if gone.gone:
                    return
                acquired = self.acquire(principal, route, affinity, head, gone)
                f.lease = acquired if isinstance(acquired, Lease) else await acquired
                if f.lease is None:
                    return
            assert f.lease is not None
            url = f.lease.url + endpoint.path
            try:
                resp = await self.upstream.open(url, up.body, route.headers, gone, sent)
            except UpstreamUnreachable as first:
                if first.error_code == "upstream_bad_response":
                    raise  # it answered, badly: the work may be done, so never send it twice
                # Nothing reached the client yet: take the replica out, try once more elsewhere.
                self.pool.report_connect_failure(f.lease)
                f.lease.release()
                f.lease = None
                try:
                    f.lease = self.pool.acquire(route.name, affinity_key=affinity)
                except Unavailable:
                    if self.pool.cold_start_mode(route.name) != "wait":
                        raise first from None  # no other replica: say what happened, a 502
                    # The model waits for replicas: wait for this one's replacement (or its
                    # return), as a cold start would.
                    acquired = self.acquire(principal, route, affinity, head, gone)
                    f.lease = acquired if isinstance(acquired, Lease) else await acquired
                    if f.lease is None:
                        return
                url = f.lease.url + endpoint.path
                resp = await self.upstream.open(url, up.body, route.headers, gone)
            f.status = resp.status
            sent_head = head is not None and head.sent
            if req.stream and resp.status == 200 and resp.content_type == "text/event-stream":
                await relay_stream(resp, AfterHead(ex, False) if sent_head else ex, tap, gone)
            else:
                await relay_whole(resp, AfterHead(ex, True) if sent_head else ex, tap)
        except GatewayError as e:
            f.status = e.status
            if head is None or not head.sent:
                raise
            # The SSE response already started while waiting: end it with the error event.
            await ex.write(e.sse_event())
        finally:
            self._finish(f)

    def _finish(self, f: Flight) -> None:
        """However the request ended: give back what it held, settle its grant, account it."""
        f.ex.on_gone(None)
        if f.lease is not None:
            f.lease.release()
        if f.slot is not None:
            f.slot.release()
        tap = f.tap
        f.grant.settle(tap.prompt_tokens, tap.completion_tokens)
        gone = f.gone
        if f.status == 0 and gone.gone:
            f.status = CLIENT_CLOSED  # left before the model's server answered
        self.account(f.principal, f.route, f.endpoint, f.status, f.req.stream, tap, f.started, gone)


class Flight:
    """One admitted request on its way: what the steps after ``admit`` share, whichever way
    (:meth:`Pipeline.handle` or :meth:`Pipeline.express`) it runs."""

    __slots__ = ("endpoint", "principal", "ex", "started", "req", "route", "affinity", "up",
                 "grant", "gone", "tap", "status", "slot", "lease", "resp", "pipeline", "native")

    def __init__(
        self, endpoint: Endpoint, principal: Principal, ex: Exchange, started: float,
        req: ParsedRequest, route: ModelRoute, affinity: bytes | None, up: reqmod.UpstreamBody,
        grant: Grant,
    ) -> None:
        self.endpoint = endpoint
        self.principal = principal
        self.ex = ex
        self.started = started
        self.req = req
        self.route = route
        self.affinity = affinity
        self.up = up
        self.grant = grant
        # From here on the grant is settled however the request ends.
        ex.extra_head = grant.head
        self.gone = gone = ClientGone()
        ex.on_gone(gone.fire)
        self.tap = UsageTap(
            hide_usage_event=up.hide_usage_event,
            strip_chunk_usage=up.strip_chunk_usage,
            rewrite=route.rewrite,
        )
        self.status = 0
        self.slot: Slot | None = None
        self.lease: Lease | None = None
        # An express request waiting for its answer: the response (which calls on_upstream),
        # the pipeline to finish it, and the server's exchange to answer on.
        self.resp: UpstreamResponse | None = None
        self.pipeline: Pipeline | None = None
        self.native: NativeExchange | None = None

    def on_upstream(self) -> None:
        p = self.pipeline
        if p is None:
            return
        native = self.native
        try:
            p._express_done(self)
        except Exception:
            log.exception("error relaying an answer on %s", self.endpoint.path)
            self.pipeline = None
            if native is not None:
                native.abort()


CLIENT_CLOSED = 499
"""The status recorded for a client that left before any answer (nginx's "client closed
request"); nothing is sent."""


def _priority(p: Principal) -> int:
    """vLLM's ``priority`` (lower is served first) from the caller's fair-share weight."""
    return -round(p.weight * 100)


def _for(principal: Principal, e: Unavailable) -> Unavailable:
    """Internal detail (probe errors, URLs) only for admins."""
    if e.internal and principal.admin:
        e.message = f"{e.message} Reason: {e.internal}"
        e.args = (e.message,)
    return e


def _affinity(req: ParsedRequest) -> bytes | None:
    try:
        return affinity_key(req.doc)
    except (TypeError, RecursionError, ValueError):
        # orjson refuses to write what it read 254+ levels deep.
        raise InvalidRequest("The request body is nested too deeply.", code="invalid_json") from None
