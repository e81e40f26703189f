"""The express path (``Pipeline.express``): FleetGate's own server hands the pipeline a request
whose body is in and whose key is cached, and the usual request (a ready replica, an idle
upstream connection, a whole answer) is served from callbacks, without a task. Whatever has to
wait goes on in a task running the same steps as ``Pipeline.handle``, from where it stands.

These run the real server and gateway in front of a small upstream the test controls (answers
whole or in pieces, never, or by hanging up), and assert what a caller relies on: the same answer,
the same accounting, and the same outcome of every failure as the task path."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import GW, settings_for
from sqlalchemy import select

sys.path.insert(0, str(Path(__file__).parents[1] / "server"))
from server_helpers import running  # noqa: E402

from fleetgate.app import Gateway, create_app  # noqa: E402
from fleetgate.server.protocol import HttpProtocol  # noqa: E402
from fleetgate.store.tables import usage_events  # noqa: E402

ANSWER = json.dumps({
    "id": "chatcmpl-1", "object": "chat.completion", "model": "upstream-name",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello there"},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
}, separators=(",", ":")).encode()  # compact, as vLLM writes it
PUBLIC = ANSWER.replace(b'"model":"upstream-name"', b'"model":"sim"')  # the model's public name, as relayed
CHAT = {"model": "sim", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}


@dataclass
class Upstream:
    """An HTTP/1.1 upstream whose behaviour the test sets per request: ``whole`` (one write),
    ``slow`` (the same after 0.2 s), ``pieces`` (the head, then the body in three writes 20 ms
    apart), ``hang`` (no answer), or
    ``drop`` (hang up without a byte, once)."""

    mode: str = "whole"
    url: str = ""
    requests: int = 0
    connections: int = 0
    hung_up_on: asyncio.Event = field(default_factory=asyncio.Event)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def until_requests(self, n: int) -> None:
        while self.requests < n:
            self.arrived.clear()
            await asyncio.wait_for(self.arrived.wait(), 5)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if head.startswith(b"GET "):  # the fleet's health probe
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
                    continue
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                await reader.readexactly(length)
                self.requests += 1
                self.arrived.set()
                mode = self.mode
                if mode == "drop":
                    self.mode = "whole"  # once
                    writer.close()
                    return
                if mode == "hang":
                    if await reader.read(1) == b"":  # until the gateway hangs up
                        self.hung_up_on.set()
                    return
                start = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                         b"content-length: %d\r\n\r\n" % len(ANSWER))
                if mode in ("whole", "slow"):
                    if mode == "slow":
                        await asyncio.sleep(0.2)
                    writer.write(start + ANSWER)
                else:
                    writer.write(start)
                    for i in range(3):
                        await writer.drain()
                        await asyncio.sleep(0.02)
                        writer.write(ANSWER[i * len(ANSWER) // 3:(i + 1) * len(ANSWER) // 3])
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    up = Upstream()
    server = await asyncio.start_server(up.handle, "127.0.0.1", 0)
    up.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        yield up
    finally:
        server.close()


@dataclass
class Served:
    app: Gateway
    client: httpx.AsyncClient
    key: str
    tasks: list[str]  # what the server ran in a task: "app" or "work" (an express request's rest)
    port: int

    async def chat(self, **over: Any) -> httpx.Response:
        return await self.client.post("/v1/chat/completions", json={**CHAT, **over},
                                      headers={"Authorization": f"Bearer {self.key}"})

    async def rows(self) -> list[dict[str, Any]]:
        await self.app.usage.write_batch()
        with self.app.engine.connect() as c:
            return [dict(r._mapping) for r in c.execute(
                select(usage_events).order_by(usage_events.c.id))]


async def _serve(tmp_path: Path, url: str, monkeypatch: pytest.MonkeyPatch,
                 **settings: Any) -> AsyncIterator[Served]:
    tasks: list[str] = []
    run_task = HttpProtocol.run_task

    def counting(self: HttpProtocol, c: Any, work: Any) -> None:
        tasks.append("app" if work is None else "work")
        run_task(self, c, work)

    monkeypatch.setattr(HttpProtocol, "run_task", counting)
    app = create_app(settings_for(tmp_path, url, **settings))
    async with running(app) as srv, httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{srv.port}", timeout=10) as client:
        key = GW(app, client).key("k")
        await app.authn.reload()
        yield Served(app, client, key, tasks, srv.port)


@pytest.fixture
async def served(tmp_path: Path, upstream: Upstream,
                 monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Served]:
    async for s in _serve(tmp_path, upstream.url, monkeypatch):
        yield s


@pytest.mark.pure  # counts tasks by patching HttpProtocol.run_task
async def test_the_usual_request_is_answered_without_a_task(served: Served,
                                                            upstream: Upstream) -> None:
    r = await served.chat()  # opens the upstream connection: that waits, in a task
    assert r.status_code == 200 and r.content == PUBLIC
    assert served.tasks == ["work"]
    for _ in range(5):
        r = await served.chat()
        assert r.status_code == 200 and r.content == PUBLIC
        assert r.headers["content-length"] == str(len(PUBLIC))
    assert served.tasks == ["work"]  # none more
    assert upstream.connections == 1 and upstream.requests == 6
    replica, = served.app.pool._group("sim").replicas  # one lease a request, however it ran
    assert (replica.served, replica.inflight) == (6, 0)
    rows = await served.rows()
    assert [(x["status"], x["prompt_tokens"], x["completion_tokens"], x["disconnected"])
            for x in rows] == [(200, 5, 7, False)] * 6
    assert all(x["model"] == "sim" and x["endpoint"] == "chat.completions" for x in rows)


@pytest.mark.pure  # counts tasks by patching HttpProtocol.run_task
async def test_what_must_wait_goes_on_in_a_task(served: Served) -> None:
    assert (await served.chat()).status_code == 200
    served.tasks.clear()
    async with served.client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True},
                                    headers={"Authorization": f"Bearer {served.key}"}) as s:
        body = b"".join([part async for part in s.aiter_bytes()])
    assert s.status_code == 200  # a JSON answer to a stream request is relayed as it came
    assert json.loads(body)["usage"]["total_tokens"] == 12
    assert served.tasks == ["work"]
    # A refusal is answered by the one error handler, as the router's would be.
    served.tasks.clear()
    r = await served.chat(model="nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text
    r = await served.chat(max_tokens=-1)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens", r.text
    assert served.tasks == ["work", "work"]
    # An unknown key is never the express path's: the router authenticates it (401).
    r = await served.client.post("/v1/chat/completions", json=CHAT,
                                 headers={"Authorization": "Bearer sk-fg-" + "x" * 40})
    assert r.status_code == 401 and served.tasks[-1] == "app"


@pytest.mark.pure  # counts tasks by patching HttpProtocol.run_task
async def test_a_body_that_arrives_after_its_head_is_served_once_it_is_in(
        served: Served, upstream: Upstream) -> None:
    # The server offers the request to the express path only when the whole body is in: a head
    # whose body comes in a later read waits for it, then is served the same way, once.
    assert (await served.chat()).status_code == 200
    served.tasks.clear()
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    body = json.dumps(CHAT).encode()
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %b\r\n"
                 b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                 % (served.key.encode(), len(body)))
    await writer.drain()
    await asyncio.sleep(0.1)
    for part in (body[:10], body[10:]):
        writer.write(part)
        await writer.drain()
        await asyncio.sleep(0.05)
    data = b""
    while not data.endswith(PUBLIC):
        more = await asyncio.wait_for(reader.read(65536), 5)
        assert more, data
        data += more
    writer.close()
    assert data.startswith(b"HTTP/1.1 200 OK") and data.count(b"HTTP/1.1 ") == 1, data
    assert served.tasks == []  # no task: the express path served it when the body was in
    assert upstream.requests == 2
    assert [x["status"] for x in await served.rows()] == [200, 200]


@pytest.mark.pure  # counts tasks by patching HttpProtocol.run_task
async def test_bodies_the_express_path_cannot_take_are_served_in_a_task(
        served: Served, upstream: Upstream) -> None:
    # A chunked body (its length unknown at the head; here past 64 KiB, so reading pauses until
    # the app reads) and a client waiting for "100 Continue": offered to the express path, both
    # would wait for a body that never comes. In a task, the app reads: the first is refused at
    # the gateway's 64 KiB body limit, the second is answered.
    assert (await served.chat()).status_code == 200
    served.tasks.clear()

    async def answer(reader: asyncio.StreamReader) -> bytes:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        return head + await asyncio.wait_for(reader.readexactly(length), 5)

    big = json.dumps({**CHAT, "messages": [{"role": "user", "content": "x" * 100_000}]}).encode()
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %b\r\n"
            b"Content-Type: application/json\r\n" % served.key.encode())
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    writer.write(head + b"Transfer-Encoding: chunked\r\n\r\n" + b"".join(
        b"%x\r\n%b\r\n" % (len(big[i:i + 8192]), big[i:i + 8192])
        for i in range(0, len(big), 8192)) + b"0\r\n\r\n")
    data = await answer(reader)
    assert data.startswith(b"HTTP/1.1 413 ") and b'"request_too_large"' in data, data
    writer.close()

    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    body = json.dumps(CHAT).encode()
    writer.write(head + b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body))
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert interim.startswith(b"HTTP/1.1 100 Continue"), interim
    writer.write(body)
    data = await answer(reader)
    writer.close()
    assert data.startswith(b"HTTP/1.1 200 OK") and data.endswith(PUBLIC), data
    assert served.tasks == ["app", "app"]
    assert [x["status"] for x in await served.rows()] == [200, 200]


async def test_an_answer_in_pieces_is_relayed_whole(served: Served, upstream: Upstream) -> None:
    assert (await served.chat()).status_code == 200
    upstream.mode = "pieces"
    r = await served.chat()
    assert r.status_code == 200 and r.content == PUBLIC
    rows = await served.rows()
    assert [(x["status"], x["completion_tokens"]) for x in rows] == [(200, 7), (200, 7)]


async def test_an_idle_connection_the_upstream_dropped_is_retried(served: Served,
                                                                   upstream: Upstream) -> None:
    assert (await served.chat()).status_code == 200
    # It reads the next request on the kept-alive connection and hangs up without a byte; the
    # request was never processed, so it is sent again on a new connection, and answered there.
    upstream.mode = "drop"
    r = await served.chat()
    assert r.status_code == 200 and r.content == PUBLIC
    assert upstream.connections == 2 and upstream.requests == 3
    assert [x["status"] for x in await served.rows()] == [200, 200]


async def test_a_client_leaving_while_the_model_works_stops_it(served: Served,
                                                               upstream: Upstream) -> None:
    assert (await served.chat()).status_code == 200
    upstream.mode = "hang"
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    body = json.dumps(CHAT).encode()
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %b\r\n"
                 b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%b"
                 % (served.key.encode(), len(body), body))
    await writer.drain()
    await upstream.until_requests(2)
    writer.close()  # the client hangs up while the model works
    await asyncio.wait_for(upstream.hung_up_on.wait(), 5)  # so the gateway hangs up on it
    await asyncio.sleep(0.05)
    rows = await served.rows()
    assert [(x["status"], x["disconnected"]) for x in rows] == [(200, False), (499, True)]


async def test_pipelined_requests_under_a_concurrency_cap_of_one(
        tmp_path: Path, upstream: Upstream, monkeypatch: pytest.MonkeyPatch) -> None:
    capped = [{"name": "sim", "served_name": "upstream-name",
               "backend": {"type": "static", "urls": [upstream.url]},
               "limits": {"max_concurrent": 1}}]
    async for s in _serve(tmp_path, upstream.url, monkeypatch, models=capped):
        assert (await s.chat()).status_code == 200
        reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
        body = json.dumps(CHAT).encode()
        one = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %b\r\n"
               b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%b"
               % (s.key.encode(), len(body), body))
        writer.write(one * 3)  # pipelined: each starts only once the one before it ended
        data = b""
        while data.count(b"HTTP/1.1 ") < 3 or not data.endswith(PUBLIC):
            more = await asyncio.wait_for(reader.read(65536), 5)
            assert more, data
            data += more
        writer.close()
        assert data.count(b"HTTP/1.1 200 OK") == 3, data
        assert [x["status"] for x in await s.rows()] == [200] * 4


async def test_an_upstream_that_stops_answering_is_a_504(
        tmp_path: Path, upstream: Upstream, monkeypatch: pytest.MonkeyPatch) -> None:
    async for s in _serve(tmp_path, upstream.url, monkeypatch,
                          server={"upstream_read_timeout_s": 0.3}):
        assert (await s.chat()).status_code == 200
        upstream.mode = "hang"
        r = await s.chat()
        assert r.status_code == 504 and r.json()["error"]["code"] == "upstream_timeout", r.text
        assert [x["status"] for x in await s.rows()] == [200, 504]


async def test_a_graceful_stop_finishes_the_requests_in_flight(
        tmp_path: Path, upstream: Upstream, monkeypatch: pytest.MonkeyPatch) -> None:
    app = create_app(settings_for(tmp_path, upstream.url))
    async with running(app) as srv, httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{srv.port}", timeout=10) as client:
        key = GW(app, client).key("k")
        await app.authn.reload()
        h = {"Authorization": f"Bearer {key}"}
        assert (await client.post("/v1/chat/completions", json=CHAT, headers=h)).status_code == 200
        upstream.mode = "slow"  # 0.2 s to answer
        pending = asyncio.ensure_future(client.post("/v1/chat/completions", json=CHAT, headers=h))
        await upstream.until_requests(2)
        srv.server.request_stop()  # while that request waits for its answer, with no task
        r = await pending
        assert r.status_code == 200 and r.content == PUBLIC
    # The server stopped and the store was flushed on the way out: both are accounted.
    with app.engine.connect() as c:
        assert [row.status for row in c.execute(select(usage_events.c.status))] == [200, 200]


async def test_a_key_fenced_to_other_networks_is_refused_cached_or_not(
        tmp_path: Path, upstream: Upstream) -> None:
    """A key with an allow-list is never the express path's: the express door declines it, and
    the router checks the client's address, on every request, the key cached or not."""
    from fleetgate.services import Context
    from fleetgate.services.keys import create_key

    app = create_app(settings_for(tmp_path, upstream.url))
    async with running(app) as srv, httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{srv.port}", timeout=10) as client:
        ctx = Context(app.engine, app.settings)
        far, _ = create_key(ctx, name="far", allow_ips=["10.0.0.0/8"])
        near, _ = create_key(ctx, name="near", allow_ips=["127.0.0.1/32"])
        await app.authn.reload()
        assert app.authn.cached(f"Bearer {far}".encode()) is not None  # in the cache
        for _ in range(3):
            r = await client.post("/v1/chat/completions", json=CHAT,
                                  headers={"Authorization": f"Bearer {far}"})
            assert r.status_code == 403 and r.json()["error"]["code"] == "ip_not_allowed", r.text
        for _ in range(2):
            r = await client.post("/v1/chat/completions", json=CHAT,
                                  headers={"Authorization": f"Bearer {near}"})
            assert r.status_code == 200 and r.content == PUBLIC
    assert upstream.requests == 2  # the refused key's requests never went upstream


async def test_an_express_refusal_is_the_api_envelope_with_the_portal_on(
        tmp_path: Path, upstream: Upstream) -> None:
    """With the portal on, the one error handler answers browsers' pages under ``/portal`` with
    an HTML page and everything else with the JSON envelope: a request the express path refuses
    is answered by it as the router's would be, with the request's own path."""
    app = create_app(settings_for(tmp_path, upstream.url, portal={
        "enabled": True, "public_url": "http://llm.example.org"}))
    async with running(app) as srv, httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{srv.port}", timeout=10) as client:
        key = GW(app, client).key("k")
        await app.authn.reload()
        assert app.authn.cached(f"Bearer {key}".encode()) is not None  # the express path's
        for body in ({**CHAT, "model": "nope"}, {**CHAT, "max_tokens": -1}):
            r = await client.post("/v1/chat/completions", json=body,
                                  headers={"Authorization": f"Bearer {key}"})
            assert r.status_code in (400, 404), r.text
            assert r.headers["content-type"].startswith("application/json")
            assert r.json()["error"]["type"] in ("invalid_request_error", "not_found_error")
        r = await client.post("/v1/chat/completions", json=CHAT,
                              headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200 and r.content == PUBLIC
    assert upstream.requests == 1
