"""The data plane: one request's path, as named steps.

    authenticate -> parse -> authorize -> admit -> acquire -> relay -> account

:meth:`Pipeline.handle` runs them for the OpenAI routes. The dispatcher (:mod:`fleetgate.app`)
has already run :meth:`Pipeline.authenticate` for every route that declares it needs a key, so
``handle`` starts from a :class:`~fleetgate.auth.principals.Principal`.

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

import time

from fleetgate.api.asgi import Receive, Scope, Send, read_body
from fleetgate.auth.authn import Authenticator
from fleetgate.auth.principals import Principal
from fleetgate.dataplane import request as reqmod
from fleetgate.dataplane.request import Endpoint, ParsedRequest
from fleetgate.dataplane.routes import ModelRoute, RouteTable
from fleetgate.dataplane.waiting import AfterHead, DisconnectWatch, wait_for_replica
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
from fleetgate.proxy.client import ClientGone, Upstream
from fleetgate.proxy.relay import relay_stream, relay_whole
from fleetgate.proxy.usage_tap import UsageTap
from fleetgate.store.repo import UsageEvent, utcnow
from fleetgate.store.usage_writer import UsageWriter


class Admission:
    """What ``admit`` grants a request; ``settle`` is called once with its real usage.

    A no-op for now: the admission issue fills it with rate buckets, quotas and fair share.
    """

    __slots__ = ()

    def settle(self, prompt_tokens: int, completion_tokens: int) -> None:
        return None


_ADMITTED = Admission()


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
    ) -> None:
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
            raise ModelNotFound(f"The model '{req.model[:200]}' does not exist.", param="model")
        if not principal.allows(route.name):
            raise PermissionDenied(
                f"This API key may not use the model '{route.name}'.", param="model"
            )
        return route

    def admit(self, principal: Principal, route: ModelRoute, req: ParsedRequest) -> Admission:
        return _ADMITTED

    async def acquire(
        self,
        principal: Principal,
        route: ModelRoute,
        affinity: bytes | None,
        *,
        send: Send,
        gone: ClientGone,
        stream: bool,
    ) -> tuple[Lease | None, bool]:
        """A lease on a ready replica, waiting through a cold start if the model says so.

        Returns the lease (None when the client left while waiting) and whether the SSE head
        already went out during the wait.
        """
        try:
            return self.pool.acquire(route.name, affinity_key=affinity), False
        except Unavailable as e:
            if self.pool.cold_start_mode(route.name) != "wait":
                raise _for(principal, e) from None
        try:
            await wait_for_replica(self.pool, route.name, send, gone, keepalive=stream)
        except Unavailable as e:
            raise _Waited(_for(principal, e), stream) from None
        if gone.gone:
            return None, stream
        try:
            return self.pool.acquire(route.name, affinity_key=affinity), stream
        except Unavailable as e:
            raise _Waited(_for(principal, e), stream) from None

    def account(
        self,
        principal: Principal,
        route: ModelRoute,
        endpoint: Endpoint,
        status: int,
        stream: bool,
        tap: UsageTap,
        started: float,
    ) -> None:
        self.usage.record(
            UsageEvent(
                key_id=principal.key_id,
                model=route.name,
                endpoint=endpoint.name,
                status=status,
                stream=stream,
                prompt_tokens=tap.prompt_tokens,
                completion_tokens=tap.completion_tokens,
                latency_ms=int((time.monotonic() - started) * 1000),
                created_at=utcnow(),
            )
        )

    # -- the whole path -------------------------------------------------------------------------

    async def handle(
        self, endpoint: Endpoint, principal: Principal, scope: Scope, receive: Receive, send: Send
    ) -> None:
        started = time.monotonic()
        raw = await read_body(scope, receive, self.max_body_bytes)
        req = self.parse(raw, endpoint)
        route = self.authorize(principal, req)
        admission = self.admit(principal, route, req)
        affinity = _affinity(req) if route.affinity else None
        up = reqmod.upstream_body(raw, req, route.upstream_name)
        gone = ClientGone()
        watch = DisconnectWatch(receive, gone)
        tap = UsageTap(
            hide_usage_event=up.hide_usage_event,
            strip_chunk_usage=up.strip_chunk_usage,
            rewrite=route.rewrite,
        )
        status = 0
        lease: Lease | None = None
        sse_started = False
        try:
            lease, sse_started = await self.acquire(
                principal, route, affinity, send=send, gone=gone, stream=req.stream
            )
            if lease is None:
                return
            url = lease.url + endpoint.path
            try:
                resp = await self.upstream.open(url, up.body, route.headers, gone)
            except UpstreamUnreachable as first:
                # Nothing reached the client yet: take the replica out, try once more elsewhere.
                self.pool.report_connect_failure(lease)
                lease.release()
                lease = None
                try:
                    lease = self.pool.acquire(route.name, affinity_key=affinity)
                except Unavailable:
                    raise first from None  # no other replica: say what happened, a 502
                url = lease.url + endpoint.path
                resp = await self.upstream.open(url, up.body, route.headers, gone)
            status = resp.status
            if req.stream and resp.status == 200 and resp.content_type == "text/event-stream":
                await relay_stream(resp, AfterHead(send, False) if sse_started else send, tap, gone)
            else:
                await relay_whole(resp, AfterHead(send, True) if sse_started else send, tap)
        except _Waited as w:
            status = w.error.status
            if not w.sse_started:
                raise w.error from None
            await _end_stream(send, w.error)
        except GatewayError as e:
            status = e.status
            if not sse_started:
                raise
            await _end_stream(send, e)
        finally:
            watch.stop()
            if lease is not None:
                lease.release()
            admission.settle(tap.prompt_tokens, tap.completion_tokens)
            self.account(principal, route, endpoint, status, req.stream, tap, started)


class _Waited(Exception):
    """An error after a cold-start wait, which may have started the SSE response already."""

    def __init__(self, error: GatewayError, sse_started: bool) -> None:
        self.error = error
        self.sse_started = sse_started


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


async def _end_stream(send: Send, e: GatewayError) -> None:
    """The SSE response already started: end it with the error as its last event."""
    await send({"type": "http.response.body", "body": e.sse_event(), "more_body": False})
