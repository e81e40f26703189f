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
from fleetgate.errors import Unavailable, UpstreamTimeout, UpstreamUnreachable
from fleetgate.proxy.client import ClientGone, ResponseTooLarge, Upstream

OK = b'{"ok":true}'


class Server:
    def __init__(self) -> None:
        self.connections = 0
        self.half_heads = 0
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
                req_body = await r.readexactly(length)
                if path == "/close-after-read":
                    return  # read the request, answer nothing
                if path == "/half-head":
                    self.half_heads += 1
                    w.write(b"HTTP/1.1 200 OK\r\nContent-")  # the request was taken: no retry
                    await w.drain()
                    return
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
                if path in ("/early-hints", "/continue"):
                    # Interim responses first, then the real one: the client must skip them.
                    w.write(b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n"
                            if path == "/early-hints" else b"HTTP/1.1 100 Continue\r\n\r\n")
                    await w.drain()
                    await asyncio.sleep(0.05)
                if path.startswith("/status-"):
                    code = path.removeprefix("/status-").encode()
                    w.write(b"HTTP/1.1 %s Odd\r\nContent-Length: 2\r\n\r\nno" % code)
                    await w.drain()
                    continue
                if path == "/trailing-bytes":
                    # A complete answer, then bytes nobody asked for: a poisoned connection.
                    w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n" + OK
                            + b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nstolen")
                    await w.drain()
                    continue
                if path.startswith("/big-"):
                    n = int(path.removeprefix("/big-"))
                    w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % n)
                    for _ in range(n // 65536):
                        w.write(b"x" * 65536)
                        await w.drain()
                    w.write(b"x" * (n % 65536))
                    await w.drain()
                    continue
                if path == "/echo":
                    w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s"
                            % (len(req_body), req_body))
                    await w.drain()
                    continue
                if path == "/huge-head":
                    w.write(b"HTTP/1.1 200 OK\r\nX-Pad: " + b"a" * (1024 * 1024))
                    await w.drain()
                    await asyncio.wait_for(r.read(), 30)
                    return
                if path == "/endless-103":
                    for _ in range(20000):
                        w.write(b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n")
                        await w.drain()
                    await asyncio.wait_for(r.read(), 30)
                    return
                if path == "/hold":
                    await asyncio.wait_for(r.read(), 30)  # hold the slot until closed
                    return
                if path == "/trickle":
                    # A chunked body, a piece every 0.15 s for 0.9 s: never silent for 0.3 s.
                    w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                    for _ in range(6):
                        await w.drain()
                        await asyncio.sleep(0.15)
                        w.write(b"1\r\nx\r\n")
                    w.write(b"0\r\n\r\n")
                    await w.drain()
                    continue
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


async def post(
    u: Upstream, url: str, gone: ClientGone | None = None, body: bytes = b'{"x":1}'
) -> tuple[int, bytes, dict]:
    resp = await u.open(url, body, {"Content-Type": "application/json"}, gone or ClientGone())
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


async def test_the_read_timeout_counts_from_the_last_byte_not_the_start(server):
    _, url = server
    u = await client(upstream_read_timeout_s=0.3)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    status, body, _ = await post(u, url + "/trickle")  # 0.9 s in all, never 0.3 s silent
    assert (status, body) == (200, b"x" * 6) and loop.time() - t0 > 0.85
    t0 = loop.time()
    with pytest.raises(UpstreamTimeout):
        await post(u, url + "/silent")
    # Found by the pool's sweep, a quarter of the timeout apart: late by at most that.
    assert 0.3 <= loop.time() - t0 < 0.3 + 0.075 + 0.1
    assert not u._pool.reading  # type: ignore[union-attr]  # nothing left watched
    await u.stop()


async def test_stopping_stops_the_sweep(server):
    _, url = server
    u = await client(upstream_read_timeout_s=0.3)
    assert (await post(u, url + "/ok"))[0] == 200
    sweeper = u._pool._sweeper  # type: ignore[union-attr]
    assert sweeper is not None and not sweeper.done()
    await u.stop()
    assert sweeper.cancelled()


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


@pytest.mark.parametrize("path", ["/early-hints", "/continue"])
async def test_interim_1xx_is_skipped_and_the_next_request_gets_its_own_answer(server, path):
    s, url = server
    u = await client()
    status, body, _ = await post(u, url + path)
    assert (status, body) == (200, OK)
    # Same pooled connection, another request: it must get its own answer, not the first one's.
    status, body, _ = await post(u, url + "/echo", body=b"second request")
    assert (status, body) == (200, b"second request")
    assert s.connections == 1
    await u.stop()


@pytest.mark.parametrize("code", [200, 299, 404, 599])
async def test_every_status_from_200_to_599_is_relayed_as_sent(server, code):
    _, url = server
    u = await client()
    status, body, _ = await post(u, url + f"/status-{code}")
    assert (status, body) == (code, b"no")
    await u.stop()


@pytest.mark.parametrize("code", ["999", "099", "101", "600"])
async def test_status_that_cannot_be_relayed_is_502(server, code):
    _, url = server
    u = await client()
    with pytest.raises(UpstreamUnreachable, match="bad response") as e:
        await post(u, url + f"/status-{code}")
    assert e.value.status == 502 and e.value.error_code == "upstream_bad_response"
    status, body, _ = await post(u, url + "/echo", body=b"after")  # the pool still works
    assert (status, body) == (200, b"after")
    await u.stop()


async def test_bytes_after_the_final_response_keep_the_connection_out_of_the_pool(server):
    s, url = server
    u = await client()
    assert (await post(u, url + "/trailing-bytes"))[:2] == (200, OK)
    status, body, _ = await post(u, url + "/echo", body=b"mine")
    assert (status, body) == (200, b"mine")  # never the "stolen" answer left on the wire
    assert s.connections == 2
    await u.stop()


async def test_body_larger_than_the_bound_is_refused_not_buffered(server):
    s, url = server
    u = await client(max_upstream_response_bytes=256 * 1024)
    assert len((await post(u, url + "/big-200000"))[1]) == 200000
    with pytest.raises(ResponseTooLarge):
        await post(u, url + "/big-3000000")
    assert (await post(u, url + "/echo", body=b"next"))[1] == b"next"
    await u.stop()


async def test_a_reused_connection_that_dies_after_part_of_a_head_is_not_retried(server):
    # Retrying is only safe when the upstream never answered a byte (an idle connection it had
    # closed); once it has started answering, the request was processed: a retry would run it
    # (and charge it) twice.
    s, url = server
    u = await client()
    assert (await post(u, url + "/echo", body=b"warm"))[:2] == (200, b"warm")
    with pytest.raises(UpstreamUnreachable):
        await post(u, url + "/half-head")
    assert s.half_heads == 1
    await u.stop()


async def test_a_body_exactly_at_the_bound_is_relayed_and_a_byte_more_refused(server):
    _, url = server
    u = await client(max_upstream_response_bytes=256 * 1024)
    assert len((await post(u, url + f"/big-{256 * 1024}"))[1]) == 256 * 1024
    with pytest.raises(ResponseTooLarge, match=f"more than {256 * 1024} bytes"):
        await post(u, url + f"/big-{256 * 1024 + 1}")
    await u.stop()


async def test_a_big_answer_read_after_it_arrived_leaves_its_connection_reusable(server):
    """Past the high-water mark reading pauses; an answer that was complete before the relay read
    it must still leave its pooled connection reading, or the next request on it never hears."""
    s, url = server
    u = await client()
    resp = await u.open(url + "/big-300000", b"{}", {"Content-Type": "application/json"},
                        ClientGone())
    for _ in range(200):  # until the whole answer is in (its last read crosses the mark)
        if resp._complete:
            break
        await asyncio.sleep(0.01)
    assert resp._complete and resp._paused  # the case under test
    data = await resp.read()
    resp.close()
    assert len(data) == 300_000
    status, body, _ = await asyncio.wait_for(post(u, url + "/echo", body=b"again"), 5)
    assert (status, body) == (200, b"again")
    assert s.connections == 1
    await u.stop()


async def test_connection_limit_is_per_origin_and_the_wait_is_bounded():
    a, b = Server(), Server()
    sa = await asyncio.start_server(a.handle, "127.0.0.1", 0)
    sb = await asyncio.start_server(b.handle, "127.0.0.1", 0)
    url_a = f"http://127.0.0.1:{sa.sockets[0].getsockname()[1]}"
    url_b = f"http://127.0.0.1:{sb.sockets[0].getsockname()[1]}"
    u = await client(upstream_max_connections=2, upstream_pool_wait_s=0.3)
    holds = [asyncio.create_task(post(u, url_a + "/hold")) for _ in range(2)]
    try:
        for _ in range(100):
            if a.open_now == 2:
                break
            await asyncio.sleep(0.02)
        assert a.open_now == 2
        # Model B's upstream is another origin: its requests don't wait behind A's streams.
        assert (await asyncio.wait_for(post(u, url_b + "/echo", body=b"b"), 5))[1] == b"b"
        # A third request to A waits at most upstream_pool_wait_s, then 503 upstream_busy.
        with pytest.raises(Unavailable) as e:
            await asyncio.wait_for(post(u, url_a + "/ok"), 5)
        assert e.value.error_code == "upstream_busy"
        assert e.value.status == 503 and "retry-after" in e.value.headers
    finally:
        for t in holds:
            t.cancel()
        await asyncio.gather(*holds, return_exceptions=True)
        await u.stop()
        sa.close()
        sb.close()


@pytest.mark.parametrize("path", ["/huge-head", "/endless-103"])
async def test_a_response_head_that_never_ends_is_cut_off(server, path):
    _, url = server
    u = await client()
    with pytest.raises(UpstreamUnreachable, match="head went past") as e:
        await asyncio.wait_for(post(u, url + path), 10)
    assert e.value.error_code == "upstream_bad_response"
    await u.stop()
