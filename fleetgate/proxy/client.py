"""The upstream client: pooled keep-alive HTTP/1.1 connections, bytes handed on as they arrive.

It is a small asyncio Protocol with httptools' C parser, rather than aiohttp: on the request path
aiohttp's client cost about a third of the gateway's CPU per request (headers multidicts,
payload objects, timers rescheduled per read), and this does the one thing the gateway needs —
POST bytes to a replica and hand back status, a few headers and the body as it arrives. See
docs/benchmarks.md for the measurements.

Promises:
- the upstream sees only the headers the caller passes (content type, the model's own key);
- reading from the upstream pauses while more than ``_HIGH_WATER`` bytes wait for the caller;
- :meth:`ClientGone.fire` (the client went away) closes the upstream connection, so the engine
  stops generating, also while the gateway still waits for the response to start;
- a failure before the response starts raises a :class:`GatewayError` (502/504); so does a
  status line the gateway can't relay (outside 200-599), a ``101`` upgrade, and a response
  head (1xx answers included) longer than ``_MAX_HEAD``;
- interim ``1xx`` responses (``100 Continue``, ``103 Early Hints``) are skipped: the caller only
  ever sees the final response;
- a connection goes back to the pool only after its final response was read to the end and
  nothing more arrived on it; any byte past that end (or a body cut short) closes it, so one
  request's answer can never reach the next request on that connection;
- at most ``server.upstream_max_connections`` requests are in flight *per upstream origin*
  (scheme, host, port), so a busy model never starves another model's replicas. A request
  waits at most ``server.upstream_pool_wait_s`` for a slot, then gets 503 ``upstream_busy``
  with ``Retry-After``. A kept-alive connection that the upstream closed while idle is retried
  once on a new connection, only when not one byte of a response came back on it;
- a response that receives nothing for ``server.upstream_read_timeout_s`` fails with a timeout
  (504), found by the pool's sweep within a quarter of the timeout (at most 1 s) more;
- a non-streamed body larger than ``server.max_upstream_response_bytes`` is not buffered:
  :meth:`UpstreamResponse.read` raises :class:`ResponseTooLarge` and the connection is closed;
- ``https://`` upstreams are verified against the system CAs (or ``server.upstream_tls.ca_file``)
  with SNI and host-name checking, unless ``server.upstream_tls.verify`` is false.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import copy
import ssl
from collections.abc import AsyncIterator, Callable
from urllib.parse import urlsplit

import httptools

from fleetgate.config import ServerSettings
from fleetgate.errors import Unavailable, UpstreamTimeout, UpstreamUnreachable

_PASS_HEADERS = ("content-type", "retry-after", "x-request-id")
_WANTED = {n.encode(): n for n in _PASS_HEADERS}
_HIGH_WATER = 256 * 1024
_LOW_WATER = 64 * 1024
_MAX_ORIGINS = 4096
_MAX_HEAD = 256 * 1024  # response head bytes (with any 1xx before it) the gateway reads at most
Key = tuple[str, str, int]  # (scheme, host, port): one pool and one limit per origin


class UpstreamClosed(Exception):
    """The connection ended before the response did (or the gateway closed it)."""


class BadUpstreamResponse(UpstreamClosed):
    """The upstream answered with something the gateway can't relay (status, upgrade, syntax)."""


class ResponseTooLarge(Exception):
    """A non-streamed body went past ``server.max_upstream_response_bytes``."""


class ClientGone:
    """Set by the disconnect watcher; closes the upstream response it's pointed at."""

    __slots__ = ("gone", "response")

    def __init__(self) -> None:
        self.gone = False
        self.response: UpstreamResponse | None = None

    def fire(self) -> None:
        self.gone = True
        if self.response is not None:
            self.response.close()


class UpstreamResponse:
    """One response: status and headers once they arrive, then the body as it arrives."""

    __slots__ = (
        *("status", "headers", "last_read", "got_bytes", "_conn", "_pool", "_chunks", "_size"),
        *("_waiter", "_started", "_complete", "_keep_alive", "_error", "_released", "_paused"),
        *("_timeout", "_head_bytes", "notify"),
    )

    def __init__(self, conn: _Conn, pool: _Pool, timeout_s: float) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self._conn = conn
        self._pool = pool
        self._chunks: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._waiter: asyncio.Future[None] | None = None
        self._started = False
        self._complete = False
        self._keep_alive = False
        self._error: BaseException | None = None
        self._released = False
        self._paused = False
        self._timeout = timeout_s
        loop = pool.loop
        self.last_read = loop.time()
        self.got_bytes = False
        self._head_bytes = 0
        self.notify: Callable[[], None] | None = None
        pool.watch(self)  # the read timeout: the pool's sweep, not a timer per response

    @property
    def content_type(self) -> str:
        ct = self.headers.get("content-type", "application/octet-stream")
        return ct.partition(";")[0].strip().lower()

    @property
    def max_event_bytes(self) -> int:
        """The largest SSE event the relay buffers (``server.max_sse_event_bytes``)."""
        return self._pool.max_event_bytes

    # -- fed by the connection ---------------------------------------------------------------

    def _wake(self) -> None:
        if self.notify is not None:
            return  # told once the connection's read is parsed (or on a failure)
        w = self._waiter
        if w is not None:
            self._waiter = None
            if not w.done():
                w.set_result(None)

    def _headers_done(self, status: int) -> None:
        self.status = status
        self._started = True
        self._wake()

    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        if self._size > _HIGH_WATER and not self._paused and self._conn.transport is not None:
            self._paused = True
            self._conn.transport.pause_reading()
        self._wake()

    def _done(self, keep_alive: bool) -> None:
        self._complete = True
        self._keep_alive = keep_alive
        self._unwatch()
        self._wake()

    def _fail(self, exc: BaseException) -> None:
        if self._error is None and not self._complete:
            self._error = exc
        self._unwatch()
        self._wake()
        if self.notify is not None:
            self.notify()

    # -- for a caller told by ``notify`` rather than awaiting ----------------------------------

    @property
    def started(self) -> bool:
        return self._started

    @property
    def failed(self) -> bool:
        return self._error is not None

    def complete_whole(self) -> bool:
        """Whether the whole answer is in (and within the bound): :meth:`read_now` has it."""
        return self._complete and self._error is None and self._size <= self._pool.max_body_bytes

    def read_now(self) -> bytes:
        """The whole answer, once :meth:`complete_whole`."""
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._size = 0
        if self._paused and self._conn.transport is not None:
            self._paused = False  # the connection may go back to the pool: read it again
            self._conn.transport.resume_reading()
        return data

    def _unwatch(self) -> None:
        self._pool.reading.discard(self)

    def _timed_out(self) -> None:
        """Nothing arrived for ``timeout_s`` (the pool's sweep found it)."""
        self._fail(TimeoutError())
        self._conn.abort()

    # -- read by the relay -------------------------------------------------------------------

    async def _wait(self) -> None:
        w = self._pool.loop.create_future()
        self._waiter = w
        await w

    async def wait_started(self) -> None:
        while not self._started:
            if self._error is not None:
                raise _afresh(self._error)
            await self._wait()

    def iter_chunks(self) -> AsyncIterator[bytes]:
        """Everything buffered so far as one piece, until the body ends; raises on failure."""
        return _Chunks(self)

    async def next_chunk(self) -> bytes | None:
        """What :meth:`iter_chunks` yields next; None once the body has ended."""
        while True:
            if self._chunks:
                data = b"".join(self._chunks) if len(self._chunks) > 1 else self._chunks[0]
                self._chunks.clear()
                self._size = 0
                if self._paused and self._conn.transport is not None:
                    self._paused = False
                    self._conn.transport.resume_reading()
                return data
            if self._complete:
                return None
            if self._error is not None:
                raise _afresh(self._error)
            await self._wait()

    async def read(self) -> bytes:
        """The whole body; :class:`ResponseTooLarge` past ``max_upstream_response_bytes``."""
        limit = self._pool.max_body_bytes
        if self._complete and self._size <= limit:
            # The usual case: the whole answer came with its head, nothing to wait for.
            return self.read_now()
        parts: list[bytes] = []
        size = 0
        async for chunk in self.iter_chunks():
            size += len(chunk)
            if size > limit:
                self.close()  # unfinished: the connection is closed, not pooled
                raise ResponseTooLarge(f"more than {limit} bytes")
            parts.append(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def close(self) -> None:
        """Done with the response: a finished one's connection goes back to the pool; an
        unfinished one's connection is closed, which tells the upstream to stop."""
        if self._released:
            return
        self._released = True
        self._unwatch()
        reuse = (
            self._complete and self._keep_alive and self._error is None and not self._conn.dirty
        )
        if not self._complete:
            self._fail(UpstreamClosed("closed by the gateway"))
        self._pool.release(self._conn, reuse)

    def release(self) -> None:
        """:meth:`close`, by the name a :class:`~fleetgate.fleet.pool.Lease` uses."""
        self.close()


class _Chunks:
    """:meth:`UpstreamResponse.iter_chunks`: an async iterator, not a generator (the compiled
    build, docs/server.md, has no async generators)."""

    __slots__ = ("_resp",)

    def __init__(self, resp: UpstreamResponse) -> None:
        self._resp = resp

    def __aiter__(self) -> _Chunks:
        return self

    async def __anext__(self) -> bytes:
        data = await self._resp.next_chunk()
        if data is None:
            raise StopAsyncIteration
        return data


_SPENT_PARSER = httptools.HttpResponseParser(None)  # a closed connection's, never fed


def _afresh(exc: BaseException) -> BaseException:
    """A copy of a response's stored failure, to raise. Raising the stored exception itself would
    hang this frame's traceback on it, and the frame names the response that keeps it: a
    reference cycle (the response, its connection, the relay's frame and all it holds) left for
    the cyclic collector on every failed or abandoned response. The original is the copy's cause."""
    try:
        fresh = copy.copy(exc)
    except Exception:  # an exception type that can't be rebuilt from its arguments
        return exc
    fresh.__cause__ = exc
    return fresh


class _Conn(asyncio.Protocol):
    """One keep-alive connection to one upstream; one response at a time."""

    def __init__(self, key: Key) -> None:
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.resp: UpstreamResponse | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.lost = False
        self.reused = False
        # Set when anything arrives that isn't part of the one final response asked for:
        # such a connection must never be handed to another request.
        self.dirty = False
        self._interim = False  # the message being parsed is a 1xx, to be skipped
        self._headers: dict[str, str] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.parser = _SPENT_PARSER  # it named this connection: a cycle left for the collector
        r = self.resp
        if r is not None:
            r._fail(UpstreamClosed("the upstream closed the connection"))

    def abort(self) -> None:
        self.lost = True
        if self.transport is not None:
            self.transport.abort()

    def _reject(self, why: str) -> None:
        self.dirty = True
        if self.resp is not None:
            self.resp._fail(BadUpstreamResponse(why))
        self.abort()

    def data_received(self, data: bytes) -> None:
        r = self.resp
        if r is None or r._complete:
            # Nothing was asked, or the final response already ended: an upstream that says
            # more can't be trusted with the next request.
            self.dirty = True
            self.abort()
            return
        r.last_read = r._pool.loop.time()
        r.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._reject("the upstream switched protocols")
            return
        except httptools.HttpParserError:
            self._reject("the upstream sent a malformed response")
            return
        if not r._started:
            # Endless headers, or endless 1xx answers, must not hold memory or the slot.
            r._head_bytes += len(data)
            if r._head_bytes > _MAX_HEAD:
                self._reject(f"the upstream's response head went past {_MAX_HEAD} bytes")
        if r.notify is not None:
            r.notify()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._headers = {}
        r = self.resp
        if r is None or r._complete:
            self.dirty = True  # a second response after the final one

    def on_header(self, name: bytes, value: bytes) -> None:
        n = _WANTED.get(name.lower())
        if n is not None:
            self._headers[n] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        r = self.resp
        status = self.parser.get_status_code()
        self._interim = 100 <= status < 200 and status != 101
        if r is None or r._complete or self._interim:
            return
        if not 200 <= status <= 599:
            self._reject(f"the upstream answered with status {status}, which can't be relayed")
            return
        r.headers = self._headers
        r._headers_done(status)

    def on_body(self, body: bytes) -> None:
        r = self.resp
        if r is not None and not r._complete and not self._interim:
            r._feed(body)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        r = self.resp
        if r is not None and not r._complete and r._started:
            r._done(self.parser.should_keep_alive())


class _Origin:
    """One upstream origin's slots, idle connections and waiting requests."""

    __slots__ = ("active", "idle", "waiters")

    def __init__(self) -> None:
        self.active = 0
        self.idle: list[_Conn] = []
        self.waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    def wake_one(self) -> None:
        while self.waiters:
            w = self.waiters.popleft()
            if not w.done():
                w.set_result(None)
                return

    @property
    def unused(self) -> bool:
        return self.active == 0 and not self.idle and not self.waiters


class _Pool:
    def __init__(self, settings: ServerSettings, tls: ssl.SSLContext | None) -> None:
        self.loop = asyncio.get_running_loop()
        self.limit = settings.upstream_max_connections
        self.connect_timeout_s = settings.upstream_connect_timeout_s
        self.wait_s = settings.upstream_pool_wait_s
        self.max_body_bytes = settings.max_upstream_response_bytes
        self.max_event_bytes = settings.max_sse_event_bytes
        self.tls = tls
        self.closed = False
        self.origins: dict[Key, _Origin] = {}
        # Responses not yet complete nor failed, for the read-timeout sweep, which runs every
        # quarter of the timeout (at most a second): a response with nothing new for the timeout
        # fails within a quarter of it more. A timer per response cost about 3 µs a request.
        self.read_timeout_s = settings.upstream_read_timeout_s
        self.reading: set[UpstreamResponse] = set()
        self._sweeper: asyncio.Task[None] | None = None

    def watch(self, r: UpstreamResponse) -> None:
        self.reading.add(r)
        if self._sweeper is None and not self.closed:
            self._sweeper = self.loop.create_task(self._sweep())

    async def _sweep(self) -> None:
        tick = min(1.0, self.read_timeout_s / 4)
        while True:
            await asyncio.sleep(tick)
            now = self.loop.time()
            for r in [r for r in self.reading if now - r.last_read >= r._timeout]:
                r._timed_out()

    def _origin(self, key: Key) -> _Origin:
        o = self.origins.get(key)
        if o is None:
            if len(self.origins) >= _MAX_ORIGINS:  # replicas come and go: stay bounded
                for k in [k for k, v in self.origins.items() if v.unused]:
                    del self.origins[k]
            o = self.origins[key] = _Origin()
        return o

    async def _wait_for_slot(self, o: _Origin) -> None:
        try:
            async with asyncio.timeout(self.wait_s):
                while o.active >= self.limit:
                    w = self.loop.create_future()
                    o.waiters.append(w)
                    try:
                        await w
                    except BaseException:
                        if w in o.waiters:
                            o.waiters.remove(w)
                        elif w.done() and not w.cancelled():
                            o.wake_one()  # pass on the slot this waiter was given
                        raise
        except TimeoutError:
            raise Unavailable(
                f"The model's server is busy: all {self.limit} connections to it are in use "
                f"and none came free within {self.wait_s:g}s.",
                retry_after=max(1, round(self.wait_s / 2)),
                code="upstream_busy",
            ) from None

    async def acquire(self, key: Key) -> _Conn:
        o = self._origin(key)
        if o.active >= self.limit:
            await self._wait_for_slot(o)
        o.active += 1
        c = self._pop_idle(o)
        if c is not None:
            return c
        scheme, host, port = key
        tls = self.tls if scheme == "https" else None
        try:
            _, conn = await asyncio.wait_for(
                self.loop.create_connection(
                    lambda: _Conn(key), host, port, ssl=tls, server_hostname=host if tls else None
                ),
                self.connect_timeout_s,
            )
        except BaseException:
            o.active -= 1
            o.wake_one()
            raise
        return conn

    def take_idle(self, key: Key) -> _Conn | None:
        """An idle connection to ``key`` with its slot taken, or None (without waiting)."""
        o = self.origins.get(key)
        if o is None or o.active >= self.limit:
            return None
        c = self._pop_idle(o)
        if c is not None:
            o.active += 1
        return c

    @staticmethod
    def _pop_idle(o: _Origin) -> _Conn | None:
        """The most recently idle connection still usable (the dead ones are closed), or None."""
        while o.idle:
            c = o.idle.pop()
            if not c.lost and not c.dirty:
                c.reused = True
                return c
            c.abort()
        return None

    def release(self, conn: _Conn, reuse: bool) -> None:
        o = self._origin(conn.key)
        o.active -= 1
        conn.resp = None
        if reuse and not conn.lost and not conn.dirty and not self.closed:
            o.idle.append(conn)
        else:
            conn.abort()
        o.wake_one()

    def close(self) -> asyncio.Task[None] | None:
        """Close the idle connections and stop the sweep (the task to await, if any)."""
        self.closed = True
        for o in self.origins.values():
            for c in o.idle:
                c.abort()
            o.idle.clear()
        sweeper, self._sweeper = self._sweeper, None
        if sweeper is not None:
            sweeper.cancel()
        return sweeper


def _request(head: bytes, body: bytes) -> bytes:
    """The request as written: its head (from ``Upstream._target``), length and body."""
    return b"%bContent-Length: %d\r\n\r\n%b" % (head, len(body), body)


def tls_context(settings: ServerSettings) -> ssl.SSLContext:
    """The client context for ``https://`` upstreams: verification on unless turned off."""
    t = settings.upstream_tls
    ctx = ssl.create_default_context(cafile=t.ca_file)
    if not t.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


class Upstream:
    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self._pool: _Pool | None = None
        # (url, id(headers)) -> (origin, request head up to Content-Length, the headers object)
        self._targets: dict[tuple[str, int], tuple[Key, bytes, dict[str, str]]] = {}

    async def start(self) -> None:
        self._pool = _Pool(self.settings, tls_context(self.settings))

    async def stop(self) -> None:
        if self._pool is not None:
            sweeper = self._pool.close()
            self._pool = None
            if sweeper is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await sweeper

    def _target(self, url: str, headers: dict[str, str]) -> tuple[Key, bytes, dict[str, str]]:
        """The origin and the request head (request line, Host, the route's headers) for a URL,
        formatted once per route and replica: routes hand the same headers object every time."""
        t = self._targets.get((url, id(headers)))
        if t is None or t[2] is not headers:
            u = urlsplit(url)
            if u.scheme not in ("http", "https") or not u.hostname:
                raise UpstreamUnreachable(f"Unsupported upstream URL scheme '{u.scheme}'.")
            default = 443 if u.scheme == "https" else 80
            port = u.port or default
            path = (u.path or "/") + (f"?{u.query}" if u.query else "")
            host = u.hostname if u.port is None else f"{u.hostname}:{port}"
            extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\n{extra}".encode("latin-1")
            t = ((u.scheme, u.hostname, port), head, headers)
            if len(self._targets) > 4096:  # replicas come and go: stay bounded
                self._targets.clear()
            self._targets[(url, id(headers))] = t
        return t

    def send_now(
        self, url: str, body: bytes, headers: dict[str, str], gone: ClientGone,
        notify: Callable[[], None],
    ) -> UpstreamResponse | None:
        """Send on an idle pooled connection at once, without waiting; None if there is none
        (or no slot). ``notify`` is called on every change of the response's state."""
        pool = self._pool
        assert pool is not None, "Upstream.start() was not awaited"
        key, head, _ = self._target(url, headers)
        conn = pool.take_idle(key)
        if conn is None:
            return None
        resp = self._response(conn, pool, gone, notify)
        assert conn.transport is not None
        conn.transport.write(_request(head, body))
        return resp

    def _response(
        self, conn: _Conn, pool: _Pool, gone: ClientGone,
        notify: Callable[[], None] | None = None,
    ) -> UpstreamResponse:
        """The response to the request about to go out on ``conn``, where the connection and a
        client's disconnect find it."""
        resp = UpstreamResponse(conn, pool, self.settings.upstream_read_timeout_s)
        resp.notify = notify
        conn.resp = resp
        gone.response = resp
        return resp

    async def open(
        self, url: str, body: bytes, headers: dict[str, str], gone: ClientGone,
        sent: UpstreamResponse | None = None,
    ) -> UpstreamResponse:
        """POST and wait for the status line. Raises a GatewayError if that fails. ``sent``:
        the request already went out as that response (:meth:`send_now`): wait for it."""
        pool = self._pool
        assert pool is not None, "Upstream.start() was not awaited"
        key, head, _ = self._target(url, headers)
        data = _request(head, body)
        for attempt in (0, 1):
            if attempt == 0 and sent is not None:
                resp, conn = sent, sent._conn
            else:
                try:
                    conn = await pool.acquire(key)
                except TimeoutError:
                    raise UpstreamTimeout("The model's server did not answer in time.") from None
                except ssl.SSLError as e:
                    raise UpstreamUnreachable(
                        f"The TLS handshake with the model's server failed: {e.reason or e}."
                    ) from None
                except OSError:
                    raise UpstreamUnreachable("The model's server can't be reached.") from None
                resp = self._response(conn, pool, gone)
                if gone.gone:
                    resp.close()
                    raise ConnectionAbortedError("the client went away")
                assert conn.transport is not None
                conn.transport.write(data)
            try:
                await resp.wait_started()
                return resp
            except TimeoutError:
                resp.close()
                raise UpstreamTimeout("The model's server did not answer in time.") from None
            except BadUpstreamResponse as e:
                resp.close()
                raise UpstreamUnreachable(
                    f"The model's server sent a bad response: {e}.", code="upstream_bad_response"
                ) from None
            except UpstreamClosed:
                resp.close()
                if gone.gone:
                    raise ConnectionAbortedError("the client went away") from None
                if attempt == 0 and conn.reused and not resp.got_bytes:
                    continue  # it closed while idle: the request was never processed
                raise UpstreamUnreachable("The connection to the model's server failed.") from None
        raise AssertionError("unreachable")  # pragma: no cover
