"""One HTTP/1.1 connection: a raw ``asyncio.Protocol`` over httptools' parser, running an ASGI app.

Promises, per connection:
- requests are answered in the order they arrived (keep-alive and pipelining); a pipelined
  request's app starts only once the previous response is complete, and reading pauses while
  requests are queued (at most ``MAX_PIPELINED``; past it the next one gets 503 and the
  connection closes after the queued answers);
- the head is bounded: ``max_header_bytes`` and ``max_headers`` (431), and it must arrive within
  ``header_timeout_s`` (408, checked by the server's once-a-tick sweep, not a timer per request);
  a body slower than ``body_min_rate_bytes_s`` is cut (408); an idle keep-alive connection is
  closed after ``keepalive_timeout_s``;
- framing the parser refuses (``Content-Length`` with ``Transfer-Encoding``, a duplicate or
  invalid ``Content-Length``, a bad request line) is a 400, an HTTP version other than 1.0/1.1 a
  505, a declared body over ``max_body_bytes`` a 413, all before the app runs; every refusal
  closes the connection and uses the one OpenAI-shaped error envelope;
- ``100 Continue`` is sent only when the app asks for a body the client is holding back;
- the request body is buffered up to ``BODY_HIGH_WATER`` bytes, then reading pauses until the app
  reads; the response honours the transport's flow control (``send`` waits while writing is
  paused), so a slow reader can't grow memory without bound;
- a small response (one with ``Content-Length``) goes out in one ``transport.write``: the head
  is held until the first body message;
- when the client goes away, the app's ``receive`` returns ``http.disconnect`` at once, and
  ``send`` drops what it is given (as uvicorn does), so an app can finish its bookkeeping.

All of it runs on the event loop thread; nothing here blocks. One asyncio task per request runs
the app (an async app that awaits I/O needs one); everything else is a callback. The exception:
an app may take a request without a task (its ``express`` hook, see
:class:`~fleetgate.server.server.ServerState`): a ``POST`` to one of its ``express_paths`` with a
``Content-Length`` body of at most ``BODY_HIGH_WATER`` bytes and no ``Expect: 100-continue`` is
offered to it once the whole body is in; pipelined requests never are.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import httptools

from fleetgate.api.asgi import read_body, too_large
from fleetgate.api.exchange import EXCHANGE
from fleetgate.errors import GatewayError
from fleetgate.server import wire

if TYPE_CHECKING:
    from fleetgate.server.server import ServerState

log = logging.getLogger("fleetgate.server")
access_log = logging.getLogger("fleetgate.access")

ASGI_INFO = {"version": "3.0", "spec_version": "2.3"}
BODY_HIGH_WATER = 64 * 1024
MAX_PIPELINED = 32
LINGER_S = 2.0  # after a refusal, how long unread request bytes are drained before closing
_NO_BODY_STATUS = frozenset({204, 304})


class _Refuse(Exception):
    """Raised inside a parser callback to stop parsing and answer with ``err``."""

    def __init__(self, err: GatewayError) -> None:
        self.err = err


_SPENT_PARSER = httptools.HttpRequestParser(None)  # a closed connection's, never fed


class Cycle:
    """One request and its response: the ASGI ``receive`` and ``send`` of that request."""

    __slots__ = (
        "proto", "scope", "chunks", "buffered", "received", "body_done", "final_delivered",
        "disconnected", "waiters", "started", "complete", "head", "chunked", "no_body",
        "length", "sent", "keep_alive", "expect_100", "body_since", "status", "extra_head",
        "gone_cb", "express_ok", "deferred",
    )

    def __init__(self, proto: HttpProtocol, scope: dict[str, Any], keep_alive: bool,
                 expect_100: bool, now: float) -> None:
        self.proto = proto
        self.scope = scope
        self.chunks: list[bytes] = []
        self.buffered = 0
        self.received = 0
        self.body_done = False
        self.final_delivered = False
        self.disconnected = False
        self.waiters: list[asyncio.Future[None]] = []
        self.started = False
        self.complete = False
        self.head: bytes | None = None
        self.chunked = False
        self.no_body = False
        self.length: int | None = None
        self.sent = 0
        self.keep_alive = keep_alive
        self.expect_100 = expect_100
        self.body_since = now  # when the body clock started (shifted by paused time)
        self.status = 0
        self.extra_head = b""  # the Exchange's header lines, added to the head
        self.gone_cb: Callable[[], None] | None = None
        self.express_ok = False
        self.deferred = False
        scope[EXCHANGE] = self

    def wake(self) -> None:
        if self.waiters:
            for f in self.waiters:
                if not f.done():
                    f.set_result(None)
            self.waiters.clear()

    async def receive(self) -> dict[str, Any]:
        while True:
            if self.disconnected or self.complete:
                return {"type": "http.disconnect"}
            if self.chunks or (self.body_done and not self.final_delivered):
                more = not self.body_done
                return {"type": "http.request", "body": self._take_body(), "more_body": more}
            if self.final_delivered:
                pass  # the body is all read: wait for the client to go away (a disconnect watch)
            elif self.expect_100 and not self.started:
                self.expect_100 = False
                self.body_since = self.proto.loop.time()
                self.proto.transport.write(wire.CONTINUE_100)  # type: ignore[union-attr]
            fut = self.proto.loop.create_future()
            self.waiters.append(fut)
            await fut

    async def send(self, msg: dict[str, Any]) -> None:
        kind = msg["type"]
        if kind == "http.response.body":
            await self.write(msg.get("body", b""), msg.get("more_body", False))
        elif kind == "http.response.start":
            if self.started:
                raise RuntimeError("http.response.start sent twice")
            self.started = True
            self._start(msg["status"], msg.get("headers") or (), self.extra_head)
        else:
            raise RuntimeError(f"unsupported ASGI message {kind!r}")

    # -- the native Exchange (fleetgate/api/exchange.py): the data plane's way in, no messages --

    async def body(self, limit: int) -> bytes:
        """The whole request body (the server already refused a declared length over its own
        bound; ``limit`` is the app's)."""
        if self.body_done and not self.final_delivered and not self.disconnected:
            # The usual case: the body came with the head, in the same read.
            data = self._take_body()
            if len(data) > limit:
                raise too_large(limit)
            return data
        return await read_body(self.scope, self.receive, limit)

    def body_now(self, limit: int) -> bytes:
        """The whole body, when it is all in (the express path runs only then)."""
        data = self._take_body()
        if len(data) > limit:
            raise too_large(limit)
        return data

    def resume(self, work: Coroutine[Any, Any, None]) -> None:
        """Go on with this request in a task, under the app's error handling."""
        proto = self.proto
        guarded = proto.state.guarded
        assert guarded is not None  # only an app with an express path resumes
        proto.run_task(self, guarded(self.scope, self.send, work))

    def abort(self) -> None:
        """The express path failed unexpectedly: a 500 if nothing was sent, else cut."""
        if not self.complete:
            self.proto._abort_response(self)

    def _take_body(self) -> bytes:
        """What is buffered of the body; reading resumes if it had paused for it."""
        chunks = self.chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self.chunks = []
        if self.body_done:
            self.final_delivered = True
        if self.buffered > BODY_HIGH_WATER:
            self.buffered = 0
            self.proto.update_reading()
        else:
            self.buffered = 0
        return data

    async def start(self, status: int, headers: Any) -> None:
        if self.started:
            raise RuntimeError("the response started twice")
        self.started = True
        self._start(status, headers, self.extra_head)

    def on_gone(self, fire: Callable[[], None] | None) -> None:
        self.gone_cb = fire
        if fire is not None and self.disconnected and not self.complete:
            fire()

    def lost(self) -> None:
        """The client went away (or was cut): wake the app's waits and tell its callback."""
        self.disconnected = True
        self.wake()
        fire = self.gone_cb
        if fire is not None and not self.complete:
            self.gone_cb = None
            fire()

    async def respond(self, status: int, headers: Any, body: bytes) -> None:
        """A whole response: head and body in one write, no await."""
        self.respond_now(status, headers, body)

    def respond_now(self, status: int, headers: Any, body: bytes) -> None:
        if self.started:
            raise RuntimeError("the response started twice")
        self.started = True
        self._start(status, headers, self.extra_head)
        self._emit(body, False)

    async def write(self, body: bytes, more: bool = False) -> None:
        if self._emit(body, more):
            await self.proto.drain()

    def _emit(self, body: bytes, more: bool) -> bool:
        """Send a body part; True when the caller should wait for the client to read."""
        if not self.started or self.complete:
            raise RuntimeError("http.response.body out of order")
        if self.disconnected:
            if not more:
                self.complete = True
            return False
        out = self.head
        self.head = None
        if self.chunked:
            if body:
                chunk = b"%x\r\n%b\r\n" % (len(body), body)
                out = chunk if out is None else out + chunk
            if not more:
                out = b"0\r\n\r\n" if out is None else out + b"0\r\n\r\n"
        elif body and not self.no_body:
            self.sent += len(body)
            if self.length is not None and self.sent > self.length:
                raise RuntimeError("response body longer than its Content-Length")
            out = body if out is None else out + body
        proto = self.proto
        if out:
            proto.transport.write(out)  # type: ignore[union-attr]
        if not more:
            if self.length is not None and self.sent != self.length and not self.no_body:
                self.keep_alive = False  # the framing is broken: the client must not reuse
            self.complete = True
            self.gone_cb = None
            self.wake()
            proto.response_done(self)
            return False
        return proto.write_paused

    def _start(self, status: int, headers: Any, raw: bytes) -> None:
        self.status = status
        proto = self.proto
        parts = [wire.status_line(status), proto.state.date.line]
        length = None
        for name, value in headers:
            wire.check_header(name, value)
            lname = name.lower()
            if lname == b"content-length":
                length = int(value)
            elif lname == b"connection":
                if b"close" in value.lower():
                    self.keep_alive = False
                continue  # the server decides the connection's fate
            elif lname == b"transfer-encoding":
                continue  # and the framing
            parts += (name, b": ", value, b"\r\n")
        if raw:
            parts.append(raw)
        http11 = self.scope["http_version"] == "1.1"
        self.no_body = self.scope["method"] == "HEAD" or status in _NO_BODY_STATUS or status < 200
        self.length = length
        if not self.no_body and length is None:
            if http11:
                self.chunked = True
                parts.append(b"transfer-encoding: chunked\r\n")
            else:
                self.keep_alive = False  # HTTP/1.0: the body ends when the connection does
        if not self.body_done or proto.state.shutting_down:
            # Unread body bytes would be taken for the next request: this connection ends.
            self.keep_alive = False
        if not self.keep_alive:
            parts.append(b"connection: close\r\n")
        parts.append(b"\r\n")
        head = b"".join(parts)
        if self.disconnected:
            return  # nobody to send it to; the app's later sends are dropped too
        if self.chunked:
            proto.transport.write(head)  # type: ignore[union-attr]  # a stream: head goes now
        else:
            self.head = head  # coalesced with the first body message


class HttpProtocol(asyncio.Protocol):
    """One client connection. Created by the server for every accepted socket."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.opts = state.options
        self.max_head_bytes = state.options.max_header_bytes
        self.max_headers = state.options.max_headers
        self.loop = state.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.client: tuple[str, int] | None = None
        self.server: tuple[str, int] | None = None
        # The head being parsed.
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_bytes = 0
        self.head_seen = 0
        self.in_head = False
        self.head_since = 0.0
        self.expect_100 = False
        self.content_length = -1
        # Requests.
        self.parsing: Cycle | None = None
        self.active: Cycle | None = None
        self.queue: deque[Cycle] = deque()
        self.pending_refusal: GatewayError | None = None
        self.served = 0
        self.idle_since = 0.0
        # Connection state.
        self.closing = False
        self.dead_parser = False
        self.discarding = False
        self.reading_paused = False
        self.paused_at = 0.0
        self.write_paused = False
        self.drain_waiters: list[asyncio.Future[None]] = []
        self.linger: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        st = self.state
        if len(st.connections) >= self.opts.max_connections:
            self.closing = True
            err = wire.ServerBusy("The server has too many connections open; retry shortly.",
                                  retry_after=1)
            transport.write(wire.refusal(err, st.date.line))  # type: ignore[attr-defined]
            transport.close()
            st.refused += 1
            return
        st.connections.add(self)
        self.idle_since = self.loop.time()
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.client = (str(peer[0]), int(peer[1]))
        local = transport.get_extra_info("sockname")
        if isinstance(local, tuple):
            self.server = (str(local[0]), int(local[1]))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        # The parser names this protocol (its callbacks): a cycle that would leave every closed
        # connection to the cyclic collector. Nothing is parsed after this.
        self.dead_parser = True
        self.parser = _SPENT_PARSER
        self.state.connections.discard(self)
        if self.linger is not None:
            self.linger.cancel()
        for c in (self.active, *self.queue):
            if c is not None:
                c.lost()
                if c.deferred:
                    c.scope.pop(EXCHANGE, None)  # never run
        self.queue.clear()
        self._wake_drain()

    def data_received(self, data: bytes) -> None:
        if self.dead_parser:
            return  # refused or lingering: the bytes are dropped
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as e:
            # A callback raised; httptools keeps the original as the context.
            cause = e.__context__
            if isinstance(cause, _Refuse):
                self._refuse(cause.err)
                return
            raise
        except httptools.HttpParserUpgrade:
            # The request was complete; upgrades aren't served. Answer it, then close.
            self.dead_parser = True
            last = self.queue[-1] if self.queue else self.active
            if last is not None:
                last.keep_alive = False
            self.update_reading()
            return
        except httptools.HttpParserInvalidMethodError:
            self._refuse(wire.BadRequest("Malformed HTTP request: invalid method."))
            return
        except httptools.HttpParserError as e:
            reason = str(e)
            if "HTTP version" in reason or "PRI" in reason:
                self._refuse(wire.VersionNotSupported(
                    "This server speaks HTTP/1.1 (and 1.0) only."))
            else:
                self._refuse(wire.BadRequest(f"Malformed HTTP request: {reason[:100]}."))
            return
        if self.in_head:
            # The parser holds a partial header line until it ends: bound what it can hold.
            self.head_seen += len(data)
            if self.head_seen > 2 * self.opts.max_header_bytes + 65536:
                self._refuse(self._too_big_head())

    def eof_received(self) -> bool | None:
        return None  # a half-closed client is treated as gone: the transport closes

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._wake_drain()

    # -- httptools callbacks -----------------------------------------------------------------

    def on_message_begin(self) -> None:
        if len(self.queue) >= MAX_PIPELINED:
            raise _Refuse(wire.ServerBusy("Too many pipelined requests on one connection.",
                                          retry_after=1))
        self.url = b""
        self.headers = []
        self.head_bytes = 0
        self.head_seen = 0
        self.in_head = True
        self.head_since = self.loop.time()
        self.expect_100 = False
        self.content_length = -1

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.head_bytes += len(url)
        if self.head_bytes > self.max_head_bytes:
            raise _Refuse(self._too_big_head())

    def on_header(self, name: bytes, value: bytes) -> None:
        headers = self.headers
        size = self.head_bytes = self.head_bytes + len(name) + len(value) + 4
        if size > self.max_head_bytes or len(headers) >= self.max_headers:
            if size > self.max_head_bytes:
                raise _Refuse(self._too_big_head())
            raise _Refuse(wire.HeadersTooLarge(
                f"The request has more than {self.max_headers} header lines."))
        name = name.lower()
        if name == b"content-length":
            self.content_length = int(value)  # the parser has checked it: digits, only one
        elif name == b"expect" and value.lower() == b"100-continue":
            self.expect_100 = True
        headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.in_head = False
        p = self.parser
        version = p.get_http_version()
        if version != "1.1" and version != "1.0":
            raise _Refuse(wire.VersionNotSupported("This server speaks HTTP/1.1 (and 1.0) only."))
        limit = self.opts.max_body_bytes
        if limit is not None and self.content_length > limit:
            raise _Refuse(too_large(limit))
        url = self.url
        try:
            if url[:1] == b"/" and b"#" not in url:
                # origin-form, the usual case: the parser has already checked its characters
                raw_path, _, query = url.partition(b"?")
            else:
                # Any: the stubs say bytes, but an absent part is None (and the compiled build
                # checks what it reads against the type it was told).
                parsed: Any = httptools.parse_url(url)
                raw_path, query = parsed.path or b"/", parsed.query or b""
            path = raw_path.decode("ascii")
        except (httptools.HttpParserInvalidURLError, UnicodeDecodeError):
            raise _Refuse(wire.BadRequest("Malformed HTTP request: invalid target.")) from None
        if "%" in path:
            path = unquote(path)
        scope = {
            "type": "http",
            "asgi": ASGI_INFO,
            "http_version": version,
            "server": self.server,
            "client": self.client,
            "scheme": self.state.scheme,
            "method": p.get_method().decode("ascii"),
            "root_path": "",
            "path": path,
            "raw_path": raw_path,
            "query_string": query,
            "headers": self.headers,
        }
        keep_alive = p.should_keep_alive() and version == "1.1"
        c = Cycle(self, scope, keep_alive, self.expect_100, self.loop.time())
        st = self.state
        if (st.express is not None and path in st.express_paths and not self.expect_100
                and 0 <= self.content_length <= BODY_HIGH_WATER and scope["method"] == "POST"):
            c.express_ok = True
        self.parsing = c
        if self.active is None:
            self._run(c)
        else:
            self.queue.append(c)
            self.update_reading()

    def on_body(self, body: bytes) -> None:
        c = self.parsing
        if c is None:
            return
        c.chunks.append(body)
        c.expect_100 = False  # the client sent the body without waiting: no 100 is owed
        c.buffered += len(body)
        c.received += len(body)
        c.wake()
        if c.buffered > BODY_HIGH_WATER:
            self.update_reading()

    def on_message_complete(self) -> None:
        c = self.parsing
        if c is not None:
            c.body_done = True
            c.wake()
            self.parsing = None
            if c.deferred:
                c.deferred = False
                self._run(c)

    # -- running requests ------------------------------------------------------------------

    def _run(self, c: Cycle, express: bool = True) -> None:
        """Start a request: offered to the app's express path (see :meth:`ServerState.express`)
        once its body is in, if it may take it; else the app runs in a task."""
        self.active = c
        if express and c.express_ok:
            if not c.body_done:
                c.deferred = True  # started by on_message_complete
                return
            take = self.state.express
            assert take is not None  # express_ok is set only when the app has the hook
            try:
                if take(c):
                    return
            except Exception:
                log.exception("error in the express path on %s", c.scope["path"][:200])
                c.abort()
                return
        self.run_task(c, None)

    def run_task(self, c: Cycle, work: Coroutine[Any, Any, None] | None) -> None:
        """Run the app for ``c`` in a task, or ``work``: the rest of a request the express path
        began (the app's ``guarded`` wraps it)."""
        st = self.state
        task = self.loop.create_task(self._app(c, work))
        st.tasks.add(task)
        task.add_done_callback(st.tasks.discard)

    async def _app(self, c: Cycle, work: Coroutine[Any, Any, None] | None) -> None:
        try:
            if work is None:
                await self.state.app(c.scope, c.receive, c.send)
            else:
                await work
        except BaseException as e:
            if not isinstance(e, asyncio.CancelledError):
                log.exception("error in the app on %s %s", c.scope["method"],
                              c.scope["path"][:200])
            if not c.complete:
                self._abort_response(c)
            if not isinstance(e, Exception):
                raise
        else:
            if not c.complete:
                if not c.disconnected:
                    log.error("the app returned without completing a response on %s %s",
                              c.scope["method"], c.scope["path"][:200])
                self._abort_response(c)
        finally:
            # The scope and the cycle name each other. Unlinked here, a request's objects are
            # freed when it ends; left, every request (its scope, headers and lists) waited
            # for the cyclic collector, whose passes then ran about 20 times a second under load.
            c.scope.pop(EXCHANGE, None)
            if self.closing and self.active is c:
                self.active = None  # the connection is gone; so is the cycle's link back to it

    def _abort_response(self, c: Cycle) -> None:
        """The app failed: a 500 if nothing was sent yet, else cut the connection."""
        c.complete = True
        c.wake()
        if self.closing:
            return
        if not c.started:
            c.status = 500
            err = GatewayError("The gateway hit an internal error.")
            self.transport.write(wire.refusal(err, self.state.date.line))  # type: ignore[union-attr]
        self._close(linger=False)

    def response_done(self, c: Cycle) -> None:
        self.served += 1
        if c.express_ok:
            c.scope.pop(EXCHANGE, None)  # no task's end to unlink it (see _app)
        if self.state.access_log:
            s = c.scope
            access_log.info('%s - "%s %s HTTP/%s" %d', self.client[0] if self.client else "-",
                            s["method"], s["path"][:200], s["http_version"], c.status)
        if self.closing:
            return
        if not c.keep_alive or not c.body_done or self.state.shutting_down:
            self._close(linger=not c.body_done)
            return
        self.active = None
        now = self.loop.time()
        if self.queue:
            # Pipelined: started in a task, never inside the previous request's own callbacks
            # (its lease, grant and accounting are settled after its response went out).
            self._run(self.queue.popleft(), express=False)
            self.update_reading()
            return
        if self.pending_refusal is not None:
            self._refuse(self.pending_refusal)
            return
        if self.dead_parser:
            self._close(linger=False)
            return
        self.idle_since = now
        if self.in_head:
            self.head_since = now  # the rest of a pipelined head: its clock starts now
        self.update_reading()

    async def drain(self) -> None:
        if self.closing:
            return
        fut = self.loop.create_future()
        self.drain_waiters.append(fut)
        await fut

    def _wake_drain(self) -> None:
        for f in self.drain_waiters:
            if not f.done():
                f.set_result(None)
        self.drain_waiters.clear()

    # -- reading, refusing, closing --------------------------------------------------------

    def update_reading(self) -> None:
        """Pause reading while requests queue up or an unread body passes the high-water mark."""
        if self.closing or self.transport is None:
            return
        c = self.parsing
        pause = bool(self.queue) or (c is not None and c.buffered > BODY_HIGH_WATER) or (
            self.dead_parser and not self.discarding)
        if pause == self.reading_paused:
            return
        self.reading_paused = pause
        if pause:
            self.paused_at = self.loop.time()
            self.transport.pause_reading()
        else:
            if c is not None:
                c.body_since += self.loop.time() - self.paused_at  # paused time isn't the client's
            self.transport.resume_reading()

    def _too_big_head(self) -> wire.HeadersTooLarge:
        return wire.HeadersTooLarge(
            f"The request head is larger than the limit of {self.opts.max_header_bytes} bytes.")

    def _refuse(self, err: GatewayError, *, linger: bool = True) -> None:
        """Answer ``err`` after any earlier responses, then close."""
        self.dead_parser = True
        self.in_head = False
        if self.closing:
            return
        if self.active is not None:
            self.pending_refusal = err  # sent when the responses before it are done
            self.update_reading()
            return
        self.transport.write(wire.refusal(err, self.state.date.line))  # type: ignore[union-attr]
        self._close(linger=linger)

    def _close(self, *, linger: bool) -> None:
        """Close after what was written has gone out.

        With ``linger``, the request may still be arriving: closing with unread bytes would
        make the kernel reset the connection, and the client could lose the answer. So the
        write side is shut, the rest is read and dropped, and the socket closes when the client
        closes or after ``LINGER_S``.
        """
        if self.closing:
            return
        self.closing = True
        t = self.transport
        assert t is not None
        if linger and t.can_write_eof():
            self.dead_parser = True
            self.discarding = True
            t.write_eof()
            if self.reading_paused:
                self.reading_paused = False
                t.resume_reading()
            self.linger = self.loop.call_later(LINGER_S, t.close)
        else:
            t.close()

    @property
    def busy(self) -> bool:
        """A request is under way on this connection (in a task or not)."""
        c = self.active
        return c is not None and not c.complete and not self.closing

    def shutdown(self) -> None:
        """The server is stopping: close now if idle, else after the response in progress."""
        if self.active is None and not self.closing:
            self._close(linger=False)

    def check(self, now: float) -> None:
        """Called by the server's sweep, a few times a second at most: enforce the time limits."""
        c = self.active
        if c is not None:
            if c.body_done or c is not self.parsing or self.closing:
                return  # busy with the app: its own timeouts apply, not the client's
            o = self.opts
            if not self.reading_paused and not c.expect_100:
                elapsed = now - c.body_since
                if (elapsed > o.header_timeout_s
                        and c.received < o.body_min_rate_bytes_s * elapsed):
                    c.lost()  # the app sees the client gone; its answer is dropped
                    if not c.started:
                        err = wire.RequestTimeout(
                            f"The request body arrived more slowly than "
                            f"{o.body_min_rate_bytes_s:g} bytes/s.")
                        self.transport.write(  # type: ignore[union-attr]
                            wire.refusal(err, self.state.date.line))
                    self._close(linger=False)
            return
        if self.closing or self.dead_parser:
            return
        o = self.opts
        if self.in_head:
            if now - self.head_since > o.header_timeout_s:
                self._refuse(wire.RequestTimeout(
                    f"The request head did not arrive within {o.header_timeout_s:g} s."),
                    linger=False)
        elif now - self.idle_since > (o.keepalive_timeout_s if self.served
                                      else o.header_timeout_s):
            self._close(linger=False)
