"""The serving process freezes its start-up heap once the app has started, so that the garbage
collector's full passes under load walk only what requests made (they were 8-12 ms pauses every
second or so with the whole gateway in view; see docs/server.md). A server embedded in another
process (the tests' own) leaves that process's collector alone."""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap

import httpx
from helpers import free_port, stop, wait_http
from server_helpers import running

_APP = textwrap.dedent("""
    import gc, sys
    from fleetgate.server.options import ServerOptions
    from fleetgate.server.server import run

    kept = [[i] for i in range(20_000)]  # what the app built at start-up

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                await send({"type": msg["type"] + ".complete"})
                if msg["type"] == "lifespan.shutdown":
                    return
        body = b"%d" % gc.get_freeze_count()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"%d" % len(body))]})
        await send({"type": "http.response.body", "body": body})

    sys.exit(run(app, ServerOptions(port=int(sys.argv[1]))))
""")


def test_the_serving_process_freezes_what_start_up_built() -> None:
    port = free_port()
    p = subprocess.Popen([sys.executable, "-c", _APP, str(port)], start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/ready", 30, p)
        frozen = int(httpx.get(f"http://127.0.0.1:{port}/", timeout=5).text)
        assert frozen > 20_000  # the app's start-up objects, at least
    finally:
        stop(p)
    assert p.returncode == 0


async def test_an_embedded_server_leaves_its_process_collector_alone() -> None:
    before = gc.get_freeze_count()
    async with running() as srv:
        async with httpx.AsyncClient() as c:
            await c.get(f"http://127.0.0.1:{srv.port}/")
    assert gc.get_freeze_count() == before
