"""The server: listening socket, TLS, the ASGI lifespan, the time-limit sweep, graceful shutdown.

``run(app, options)`` is the blocking entry point ``fleetgate serve`` calls in each process.
It runs on uvloop, starts the app's lifespan (a failed start-up exits with code 3 before
anything listens), listens, and serves until SIGTERM or SIGINT. Then it stops accepting,
closes idle connections, lets requests in flight finish for up to ``shutdown_grace_s``, cuts
what remains (the apps see ``http.disconnect``), waits for the apps' tasks, and runs the
lifespan shutdown (where the gateway flushes its usage records). A second signal changes
nothing: the grace period is the bound.

Time limits are enforced by one sweep per process, a few times a second, over all open
connections, instead of a timer per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import resource
import signal
import socket
import ssl
from collections.abc import Callable, Coroutine
from typing import Any

from fleetgate.server.options import ServerOptions, TlsOptions
from fleetgate.server.protocol import Cycle, HttpProtocol
from fleetgate.server.wire import DateHeader

log = logging.getLogger("fleetgate.server")

App = Any  # an ASGI 3 callable: (scope, receive, send) -> awaitable
LIFESPAN_STARTUP_FAILED = 3
# The accept queue: as long as the kernel allows (it caps this at net.core.somaxconn). A burst of
# new connections faster than one loop turn accepts them must not overflow it: an overflowing
# queue drops handshakes, and the clients see resets.
BACKLOG = 65535


class ServerState:
    """What every connection of one server shares."""

    __slots__ = ("app", "options", "loop", "connections", "tasks", "date", "scheme",
                 "shutting_down", "access_log", "refused", "express", "express_paths",
                 "guarded")

    def __init__(self, app: App, options: ServerOptions, loop: asyncio.AbstractEventLoop) -> None:
        self.app = app
        self.options = options
        self.loop = loop
        self.connections: set[HttpProtocol] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.date = DateHeader()
        self.scheme = "https" if options.tls else "http"
        self.shutting_down = False
        self.access_log = options.access_log
        self.refused = 0  # connections turned away past max_connections
        # The app's express path (FleetGate's Gateway has one): ``express(cycle)`` may take a
        # request to one of ``express_paths`` whose body is in, and answer it from callbacks,
        # without a task; False leaves it to the app as usual. What it can't finish at once goes
        # on in a task, wrapped in ``guarded(scope, send, work)``, the app's error handling.
        self.express: Callable[[Cycle], bool] | None = getattr(app, "express", None)
        self.express_paths: frozenset[str] = getattr(app, "express_paths", frozenset())
        self.guarded: Callable[..., Coroutine[Any, Any, None]] | None = getattr(
            app, "guarded", None)
        if self.guarded is None:
            self.express = None


def bind_socket(options: ServerOptions) -> socket.socket:
    """A bound, non-blocking socket on ``options.host:port``; ``OSError`` if it can't bind.

    It starts listening only when the server does (after the app's start-up), so a client
    never waits in the backlog of a server that isn't up yet.
    """
    infos = socket.getaddrinfo(options.host, options.port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if options.reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(addr)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def ssl_context(tls: TlsOptions) -> ssl.SSLContext:
    """Server-side TLS (1.2+); with ``client_ca_file``, a client certificate is required."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(tls.cert_file, tls.key_file)
    if tls.client_ca_file:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cafile=tls.client_ca_file)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def raise_open_file_limit(wanted: int) -> int:
    """Raise this process's soft ``RLIMIT_NOFILE`` towards ``wanted`` (up to the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    return soft


class Lifespan:
    """Runs the app's ``lifespan`` scope: start-up before listening, shutdown at the end."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None

    async def _main(self) -> None:
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"},
                 "state": {}}
        try:
            await self.app(scope, self.inbox.get, self.outbox.put)
        except Exception as e:
            log.exception("the app's lifespan failed")
            await self.outbox.put({"type": "lifespan.crashed", "message": str(e)})

    async def _exchange(self, msg: str) -> bool:
        await self.inbox.put({"type": msg})
        reply = await self.outbox.get()
        if reply["type"] == f"{msg}.complete":
            return True
        log.error("%s failed: %s", msg, reply.get("message", reply["type"]))
        return False

    async def startup(self) -> bool:
        self.task = asyncio.get_running_loop().create_task(self._main())
        return await self._exchange("lifespan.startup")

    async def shutdown(self) -> None:
        if self.task is None or self.task.done():
            return
        await self._exchange("lifespan.shutdown")
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(self.task, 5)


class Server:
    def __init__(self, app: App, options: ServerOptions, *, owns_process: bool = False) -> None:
        self.app = app
        self.options = options
        # The whole process is this server's (``run``): its start-up heap is frozen once the
        # app has started (see settle_heap). An embedding caller keeps its own GC.
        self.owns_process = owns_process
        self.stopping = asyncio.Event()
        self.state: ServerState | None = None
        self.port = options.port  # the bound port, once listening (differs when 0 was asked)

    def request_stop(self) -> None:
        if not self.stopping.is_set():
            log.info("stopping: finishing requests in flight (up to %g s)",
                     self.options.shutdown_grace_s)
        self.stopping.set()

    async def serve(self, sock: socket.socket | None = None,
                    started: asyncio.Event | None = None) -> int:
        """Serve until :meth:`request_stop`; the process exit code."""
        o = self.options
        loop = asyncio.get_running_loop()
        raise_open_file_limit(2 * o.max_connections + 256)
        lifespan = Lifespan(self.app)
        if not await lifespan.startup():
            return LIFESPAN_STARTUP_FAILED
        state = self.state = ServerState(self.app, o, loop)
        if self.owns_process:
            settle_heap()
        try:
            sock = sock or bind_socket(o)
            server = await loop.create_server(
                lambda: HttpProtocol(state), sock=sock, backlog=BACKLOG,
                ssl=ssl_context(o.tls) if o.tls else None,
                ssl_handshake_timeout=o.header_timeout_s if o.tls else None,
            )
        except BaseException:
            await lifespan.shutdown()
            raise
        self.port = sock.getsockname()[1]
        log.info("listening on %s://%s:%d", state.scheme, o.host, self.port)
        tick = min(1.0, max(0.05, min(o.header_timeout_s, o.keepalive_timeout_s) / 4))
        sweeper = loop.create_task(self._sweep(state, tick))
        if started is not None:
            started.set()
        try:
            await self.stopping.wait()
        finally:
            server.close()
            await self._drain(state)
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
            await lifespan.shutdown()
        # The last line of a clean stop; the same words as uvicorn's, which scripts look for.
        log.info("Application shutdown complete.")
        return 0

    async def _sweep(self, state: ServerState, tick: float) -> None:
        loop = state.loop
        while True:
            await asyncio.sleep(tick)
            state.date.refresh()
            now = loop.time()
            for i, conn in enumerate(list(state.connections)):
                conn.check(now)
                if i % 1000 == 999:
                    await asyncio.sleep(0)  # many connections: let requests run in between

    async def _drain(self, state: ServerState) -> None:
        # From here no connection starts a new request (idle ones close now, busy ones after
        # their response), so the running apps' tasks are all there is to wait for.
        state.shutting_down = True
        for conn in list(state.connections):
            conn.shutdown()
        # Requests run in tasks, and express requests (no task) on busy connections.
        loop = state.loop
        deadline = loop.time() + self.options.shutdown_grace_s
        while True:
            busy = sum(1 for conn in state.connections if conn.busy)
            left = deadline - loop.time()
            if not (busy or state.tasks):
                break
            if left <= 0:
                log.warning("cutting %d requests still running after the grace period",
                            max(busy, len(state.tasks)))
                break
            if state.tasks:
                await asyncio.wait(set(state.tasks), timeout=min(left, 0.05))
            else:
                await asyncio.sleep(min(left, 0.02))
        for conn in list(state.connections):
            if conn.transport is not None:
                # abort, not close: close would wait for a client that isn't reading.
                conn.transport.abort()
        # Their connection_lost comes on a later turn of the loop; an express request cut there
        # goes on in a task (to account for it), which the wait below covers.
        for _ in range(100):
            if not state.connections:
                break
            await asyncio.sleep(0.01)
        if state.tasks:
            # The apps saw http.disconnect; give them a moment to finish their bookkeeping.
            _, pending = await asyncio.wait(set(state.tasks), timeout=5)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1)


GEN0_THRESHOLD = 7000


def settle_heap() -> None:
    """Move everything the start-up built (modules, config, the app, its caches) out of the
    garbage collector's sight. A full collection otherwise walks all of it again, every second
    or so under load, pausing every request in flight for 10 ms or more on a small machine; after
    this it walks only what requests made since.

    And the youngest generation is collected every ``GEN0_THRESHOLD`` net allocations, not
    CPython's 700. A request leaves no cycles behind, so what a young collection finds is mostly
    the requests in flight, which survive it; under scenario 1's load that was one pass every
    110 requests or so, each about 0.15 ms, and with this it is one every 340."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GEN0_THRESHOLD, *gc.get_threshold()[1:])


def run(app: App, options: ServerOptions, sock: socket.socket | None = None) -> int:
    """Serve ``app`` on uvloop until SIGTERM/SIGINT; returns the exit code."""
    import uvloop

    async def main() -> int:
        server = Server(app, options, owns_process=True)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, server.request_stop)
        return await server.serve(sock)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main())
