"""Running the simulator: as a process (:func:`run`) or inside a test's event loop (:func:`running`).

Start-up mimics an engine loading weights: nothing listens until ``startup_delay_s`` has
passed, and with ``hang_on_start`` nothing ever listens. Once the socket is bound, connections
queue in the backlog until uvicorn accepts them, so ``/health`` answers 200 from the first
moment a client can connect at all.

:func:`run` owns the process: it installs uvloop when available, raises the open-file limit
(thousands of streams need thousands of descriptors), lets uvicorn handle SIGINT/SIGTERM and
returns when the server has stopped. :func:`running` is for tests and benchmarks that want the
simulator in-process: it installs no signal handlers and leaves logging configuration alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import uvicorn

from fleetgate.sim.app import SimApp, StreamCut, hard_exit
from fleetgate.sim.options import SimOptions

__all__ = ["SimServer", "run", "running", "bind_socket"]

BACKLOG = 4096


class _DropStreamCuts(logging.Filter):
    """Hide the traceback uvicorn logs when the app cuts a stream on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], StreamCut))


_DROP_STREAM_CUTS = _DropStreamCuts()


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, *, handle_signals: bool) -> None:
        super().__init__(config)
        self._handle_signals = handle_signals

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if not self._handle_signals:
            yield
            return
        with super().capture_signals():
            yield


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0 picks a free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=BACKLOG)
    sock.setblocking(False)
    return sock


class SimServer:
    """One simulator: its :class:`SimApp`, and once bound, its port.

    ``serve()`` returns after ``stop()`` (or a signal, when ``handle_signals``). ``listening``
    is set once the port is bound. The app is built at construction, so a test can hold it
    (counters, last request) before the server even starts.
    """

    def __init__(
        self,
        options: SimOptions,
        *,
        exit_fn: Callable[[int], None] = hard_exit,
        handle_signals: bool = False,
        configure_logging: bool = False,
    ) -> None:
        self.options = options
        self.app = SimApp(options, exit_fn=exit_fn)
        self.port: int | None = None
        self.listening = asyncio.Event()
        self._handle_signals = handle_signals
        self._configure_logging = configure_logging
        self._server: _Server | None = None
        self._stop_requested = asyncio.Event()

    @property
    def url(self) -> str:
        """``http://host:port`` (no ``/v1``). Only valid once ``listening`` is set."""
        if self.port is None:
            raise RuntimeError("the simulator is not listening yet")
        host = self.options.host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI client's ``base_url``: :attr:`url` plus ``/v1``."""
        return self.url + "/v1"

    async def serve(self, on_listening: Callable[[SimServer], None] | None = None) -> None:
        opts = self.options
        if opts.hang_on_start:
            await self._stop_requested.wait()  # an engine stuck while loading: never binds
            return
        if opts.startup_delay_s > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_requested.wait(), opts.startup_delay_s)
            if self._stop_requested.is_set():
                return
        config = uvicorn.Config(
            self.app,
            http="httptools",
            loop="none",
            lifespan="off",
            access_log=opts.access_log,
            log_level="info" if opts.access_log else "warning",
            log_config=uvicorn.config.LOGGING_CONFIG if self._configure_logging else None,
            backlog=BACKLOG,
            timeout_graceful_shutdown=1,
            server_header=False,
        )
        logging.getLogger("uvicorn.error").addFilter(_DROP_STREAM_CUTS)
        sock = bind_socket(opts.host, opts.port)
        self.port = sock.getsockname()[1]
        self._server = _Server(config, handle_signals=self._handle_signals)
        self.listening.set()
        if on_listening is not None:
            on_listening(self)
        try:
            await self._server.serve(sockets=[sock])
        finally:
            sock.close()

    def stop(self) -> None:
        """Ask :meth:`serve` to return; open streams get a second to finish."""
        self._stop_requested.set()
        if self._server is not None:
            self._server.should_exit = True


@contextlib.asynccontextmanager
async def running(
    options: SimOptions, *, exit_fn: Callable[[int], None] = hard_exit
) -> AsyncIterator[SimServer]:
    """Run a simulator in the current event loop for the duration of the ``async with``.

    Waits until the port is bound (so pass ``port=0`` and read ``sim.url``), except with
    ``hang_on_start``, where it yields at once. Simulated crashes call ``exit_fn``, which by
    default ends the whole process: pass your own to observe them in-process.
    """
    sim = SimServer(options, exit_fn=exit_fn)
    task = asyncio.get_running_loop().create_task(sim.serve())
    try:
        if not options.hang_on_start:
            listening = asyncio.ensure_future(sim.listening.wait())
            await asyncio.wait({listening, task}, return_when=asyncio.FIRST_COMPLETED)
            if not listening.done():
                listening.cancel()
                task.result()  # re-raise why serving failed (e.g. port in use)
        yield sim
    finally:
        sim.stop()
        await task


def _raise_fd_limit() -> None:
    with contextlib.suppress(ImportError, ValueError, OSError):
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _announce(sim: SimServer) -> None:
    names = ", ".join(sim.options.models)
    print(
        f"fleetgate sim: listening on {sim.url} serving {names} (a simulator, not a model)",
        flush=True,
    )


def run(options: SimOptions) -> None:
    """Serve ``options`` in this process until SIGINT/SIGTERM. Blocks.

    Prints one line to stdout once the port is bound:
    ``fleetgate sim: listening on http://HOST:PORT serving NAMES (a simulator, not a model)``.
    """
    _raise_fd_limit()
    loop_factory: Any = None
    with contextlib.suppress(ImportError):
        import uvloop

        loop_factory = uvloop.new_event_loop
    if options.hang_on_start:
        print("fleetgate sim: hang-on-start set, never listening", file=sys.stderr, flush=True)
    sim = SimServer(options, handle_signals=True, configure_logging=True)
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(sim.serve(on_listening=_announce))
