"""The upstream HTTP client against a scripted raw-socket server on loopback.

The server's behaviour is chosen by the request path, so each test shows one thing the client
promises: keep-alive reuse, a transparent retry when an idle connection was closed, bodies by
length and chunked, the connection limit, timeouts, refusals and the client going away.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from fleetgate.config import ServerSettings
from fleetgate.errors import UpstreamTimeout, UpstreamUnreachable
from fleetgate.proxy.client import ClientGone, Upstream

OK = b'{"ok":true}'


class Server:
    def __init__(self) -> None:
        self.connections = 0
        self.open_now = 0
        self.max_open = 0
        self.closed = asyncio.Event()
        self.server: asyncio.Server | None = None

    async def handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open_now += 1
        self.max_open = max(self.max_open, self.open_now)
        try:
            while True:
                head = await r.readuntil(b"\r\n\r\n")
                path = head.split(b" ", 2)[1].decode()
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                await r.readexactly(length)
                if path == "/close-after-read":
                    return  # read the request, answer nothing
                if path == "/once-then-close":
                    w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n" + OK)
                    await w.drain()
                    return  # an idle keep-alive connection the server then closes
                if path == "/silent":
                    await asyncio.wait_for(r.read(), 30)  # answer nothing; return on EOF
                    return
                if path == "/garbage":
                    w.write(b"NOT HTTP AT ALL\r\n\r\n")
                    await w.drain()
                    continue
                if path == "/slow":
                    await asyncio.sleep(0.2)
                if path == "/chunked":
                    w.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                            b"Transfer-Encoding: chunked\r\n\r\n")
                    for part in (b"data: 1\n\n", b"data: 2\n\n"):
                        w.write(b"%x\r\n%s\r\n" % (len(part), part))
                        await w.drain()
                        await asyncio.sleep(0.01)
                    w.write(b"0\r\n\r\n")
                else:
                    w.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                            b"X-Secret: no\r\nContent-Length: 11\r\n\r\n" + OK)
                await w.drain()
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            return
        finally:
            self.open_now -= 1
            self.closed.set()
            w.close()


@pytest.fixture
async def server() -> AsyncIterator[tuple[Server, str]]:
    s = Server()
    s.server = await asyncio.start_server(s.handle, "127.0.0.1", 0)
    port = s.server.sockets[0].getsockname()[1]
    yield s, f"http://127.0.0.1:{port}"
    s.server.close()


async def client(**kw) -> Upstream:
    u = Upstream(ServerSettings(**kw))
    await u.start()
    return u


async def post(u: Upstream, url: str, gone: ClientGone | None = None) -> tuple[int, bytes, dict]:
    resp = await u.open(url, b'{"x":1}', {"Content-Type": "application/json"}, gone or ClientGone())
    try:
        return resp.status, await resp.read(), resp.headers
    finally:
        resp.close()


async def test_keep_alive_reuses_one_connection_and_passes_only_known_headers(server):
    s, url = server
    u = await client()
    for _ in range(5):
        status, body, headers = await post(u, url + "/ok")
        assert (status, body) == (200, OK)
    assert s.connections == 1
    assert headers == {"content-type": "application/json"}  # X-Secret isn't passed on
    await u.stop()


async def test_idle_connection_closed_by_the_server_is_retried_transparently(server):
    s, url = server
    u = await client()
    assert (await post(u, url + "/once-then-close"))[0] == 200
    await asyncio.wait_for(s.closed.wait(), 2)
    assert (await post(u, url + "/ok"))[0] == 200  # the dead idle connection isn't an error
    assert s.connections == 2
    await u.stop()


async def test_fresh_connection_dropped_without_an_answer_is_502(server):
    _, url = server
    u = await client()
    with pytest.raises(UpstreamUnreachable):
        await post(u, url + "/close-after-read")
    await u.stop()


async def test_chunked_body_arrives_whole(server):
    _, url = server
    u = await client()
    status, body, headers = await post(u, url + "/chunked")
    assert status == 200 and body == b"data: 1\n\ndata: 2\n\n"
    assert headers["content-type"] == "text/event-stream"
    await u.stop()


async def test_connection_limit_queues_requests_beyond_it(server):
    s, url = server
    u = await client(upstream_max_connections=2)
    results = await asyncio.gather(*(post(u, url + "/slow") for _ in range(6)))
    assert all(r[0] == 200 for r in results)
    assert s.max_open <= 2
    await u.stop()


async def test_silent_upstream_times_out_as_504(server):
    _, url = server
    u = await client(upstream_read_timeout_s=0.3)
    with pytest.raises(UpstreamTimeout):
        await post(u, url + "/silent")
    await u.stop()


async def test_malformed_response_is_502(server):
    _, url = server
    u = await client()
    with pytest.raises(UpstreamUnreachable):
        await post(u, url + "/garbage")
    await u.stop()


async def test_refused_connection_is_502():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    u = await client()
    with pytest.raises(UpstreamUnreachable):
        await post(u, f"http://127.0.0.1:{port}/ok")
    await u.stop()


async def test_client_going_away_closes_the_upstream_connection(server):
    s, url = server
    u = await client()
    gone = ClientGone()
    task = asyncio.create_task(post(u, url + "/silent", gone))
    await asyncio.sleep(0.2)
    assert s.open_now == 1
    gone.fire()
    with pytest.raises((ConnectionAbortedError, UpstreamUnreachable)):
        await asyncio.wait_for(task, 2)
    await asyncio.wait_for(s.closed.wait(), 2)
    assert s.open_now == 0
    await u.stop()
