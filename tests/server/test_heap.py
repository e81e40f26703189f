"""The serving process freezes its start-up heap once the app has started, so that the garbage
collector's full passes under load walk only what requests made (they were 8-12 ms pauses every
second or so with the whole gateway in view; see docs/server.md). A server embedded in another
process (the tests' own) leaves that process's collector alone.

And a request leaves nothing for the cyclic collector: its objects are freed by reference
counting when it ends, whatever its outcome. Each request's scope and its exchange used to name
each other, so every request waited for a collection (about 20 passes a second under scenario
1's load, a few µs of CPU per request)."""

from __future__ import annotations

import asyncio
import gc
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import httpx
from helpers import GW, free_port, settings_for, stop, wait_http
from server_helpers import running

from fleetgate.app import create_app
from fleetgate.server.server import GEN0_THRESHOLD

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
        body = b"%d %d" % (gc.get_freeze_count(), gc.get_threshold()[0])
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
        frozen, young = map(int, httpx.get(f"http://127.0.0.1:{port}/", timeout=5).text.split())
        assert frozen > 20_000  # the app's start-up objects, at least
        assert young == GEN0_THRESHOLD != 700  # CPython's own
    finally:
        stop(p)
    assert p.returncode == 0


async def test_an_embedded_server_leaves_its_process_collector_alone() -> None:
    before = gc.get_freeze_count(), gc.get_threshold()
    async with running() as srv:
        async with httpx.AsyncClient() as c:
            await c.get(f"http://127.0.0.1:{srv.port}/")
    assert (gc.get_freeze_count(), gc.get_threshold()) == before


async def _each_kind(c: httpx.AsyncClient, key: str) -> None:
    """One request of each outcome: answered, streamed, a client leaving mid-stream, and the
    refusals (no key, a wrong key, an unknown model, a body that isn't JSON, a cap, a rate
    limit)."""
    h = {"Authorization": f"Bearer {key}"}
    chat = {"model": "sim", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    r = await c.post("/v1/chat/completions", json=chat, headers=h)
    assert r.status_code == 200, r.text
    async with c.stream("POST", "/v1/chat/completions", json={**chat, "stream": True},
                        headers=h) as s:
        assert s.status_code == 200
        assert b"[DONE]" in b"".join([part async for part in s.aiter_bytes()])
    async with httpx.AsyncClient(base_url=str(c.base_url)) as leaving:  # its own connection
        async with leaving.stream("POST", "/v1/chat/completions", headers=h,
                                  json={**chat, "stream": True, "max_tokens": 500}) as s:
            async for _ in s.aiter_bytes():
                break  # and hang up
    assert (await c.post("/v1/chat/completions", json=chat)).status_code == 401
    bad = {"Authorization": "Bearer sk-fg-" + "x" * 40}
    assert (await c.post("/v1/chat/completions", json=chat, headers=bad)).status_code == 401
    nope = {**chat, "model": "nope"}
    assert (await c.post("/v1/chat/completions", json=nope, headers=h)).status_code == 404
    r = await c.post("/v1/chat/completions", content=b"{not json", headers=h)
    assert r.status_code == 400
    capped = {**chat, "model": "capped", "max_tokens": 50}
    r = await c.post("/v1/chat/completions", json=capped, headers=h)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens", r.text
    for _ in range(2):  # an rpm of 1: the second is refused, if the first wasn't
        r = await c.post("/v1/chat/completions", json={**chat, "model": "capped"}, headers=h)
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded", r.text


async def test_requests_through_the_gateway_leave_no_cyclic_garbage(
        tmp_path: Path, sim_url: str) -> None:
    s = settings_for(tmp_path, sim_url)
    capped = {"name": "capped", "served_name": "upstream-name", "api_key": "upstream-secret-key",
              "backend": {"type": "static", "urls": [sim_url]},
              "limits": {"rpm": 1, "max_tokens": 10}}
    app = create_app(settings_for(tmp_path, sim_url, models=[
        *(m.model_dump(mode="json", exclude_defaults=True) for m in s.models), capped]))
    async with running(app) as srv, httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{srv.port}", timeout=30) as c:
        key = GW(app, c).key("k")
        await app.authn.reload()
        await _each_kind(c, key)  # first-use caches fill here, not below
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)  # what a collection finds is kept, to be named
        try:
            for _ in range(10):
                await _each_kind(c, key)
            await asyncio.sleep(0.2)  # the hung-up streams' ends reach the gateway
            gc.collect()
            ours = Counter(type(o).__qualname__ for o in gc.garbage
                           if type(o).__module__.startswith("fleetgate"))
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
    assert not ours, f"requests left reference cycles with: {dict(ours)}"
