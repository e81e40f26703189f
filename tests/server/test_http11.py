"""HTTP/1.1 done right by FleetGate's server, in process, over raw sockets: one test per item of
the protocol a client (or an attacker) relies on."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from server_helpers import Conn, Recording, Running, Seen, make_app, running

from fleetgate.server.options import ServerOptions
from fleetgate.server.protocol import BODY_HIGH_WATER, HttpProtocol
from fleetgate.server.server import ServerState

GET = b"GET /echo HTTP/1.1\r\nHost: t\r\n\r\n"


def post(path: str, body: bytes, extra: bytes = b"") -> bytes:
    return (b"POST %s HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n%s\r\n%s"
            % (path.encode(), len(body), extra, body))


async def test_keep_alive_serves_several_requests_on_one_connection(srv: Running) -> None:
    c = await Conn.open(srv.port)
    first = await c.one(GET)
    second = await c.one(post("/echo", b"hello"))
    assert first.status == second.status == 200
    assert json.loads(second.body)["body_len"] == 5
    # the same client address: the same TCP connection
    assert json.loads(first.body)["client"] == json.loads(second.body)["client"]
    assert "connection" not in second.headers
    assert second.headers["date"].endswith("GMT")
    c.close()


async def test_pipelined_requests_are_answered_in_order(srv: Running) -> None:
    c = await Conn.open(srv.port)
    await c.send(b"GET /slow?ms=300 HTTP/1.1\r\nHost: t\r\n\r\n"
                 + post("/echo?i=2", b"ab") + b"GET /echo?i=3 HTTP/1.1\r\nHost: t\r\n\r\n")
    rs = await c.responses(3)
    assert [r.status for r in rs] == [200, 200, 200]
    assert json.loads(rs[0].body)["path"] == "/slow"
    assert json.loads(rs[1].body)["query_string"] == "i=2"
    assert json.loads(rs[2].body)["query_string"] == "i=3"
    c.close()


async def test_chunked_request_body_is_reassembled(srv: Running) -> None:
    c = await Conn.open(srv.port)
    r = await c.one(b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
    assert r.status == 200 and json.loads(r.body)["body_len"] == 11
    assert (await c.one(GET)).status == 200  # and the connection is still in step
    c.close()


async def test_expect_100_continue_is_sent_only_when_the_app_reads_the_body(
        srv: Running) -> None:
    c = await Conn.open(srv.port)
    await c.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n"
                 b"Expect: 100-continue\r\n\r\n")
    (interim,) = await c.responses(1)
    assert interim.status == 100
    await c.send(b"hello")
    (final,) = await c.responses(1)
    assert final.status == 200 and json.loads(final.body)["body_len"] == 5
    c.close()

    c = await Conn.open(srv.port)
    await c.send(b"POST /noread HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n"
                 b"Expect: 100-continue\r\n\r\n")
    (r,) = await c.responses(1)
    assert r.status == 200 and r.body == b"no read"  # no 100 before it
    assert r.headers["connection"] == "close"  # the unsent body can't be left on the wire
    c.close()


async def test_head_sends_the_headers_and_no_body(srv: Running) -> None:
    c = await Conn.open(srv.port)
    await c.send(b"HEAD /echo HTTP/1.1\r\nHost: t\r\n\r\n" + GET)
    data = b""
    deadline = time.monotonic() + 5
    while data.count(b"HTTP/1.1 200") < 2 or not data.endswith(b"}"):
        assert time.monotonic() < deadline, data
        data += await asyncio.wait_for(c.reader.read(65536), 5)
    head_resp, get_resp = data.split(b"HTTP/1.1 200", 2)[1:]
    assert b"content-length: " in head_resp and head_resp.endswith(b"\r\n\r\n")
    assert json.loads(get_resp.split(b"\r\n\r\n", 1)[1])["path"] == "/echo"
    c.close()


async def test_content_length_with_transfer_encoding_is_refused(srv: Running) -> None:
    c = await Conn.open(srv.port)
    r = await c.one(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /echo HTTP/1.1\r\n\r\n")
    assert r.status == 400
    assert json.loads(r.body)["error"]["code"] == "bad_request"
    assert r.headers["connection"] == "close"
    assert await c.closed()
    assert srv.seen.requests == []  # nothing reached the app, the smuggled GET included


async def test_duplicate_or_conflicting_content_length_is_refused(srv: Running) -> None:
    for lengths in ((b"5", b"5"), (b"5", b"6"), (b"5, 5",)):
        c = await Conn.open(srv.port)
        extra = b"".join(b"Content-Length: %s\r\n" % v for v in lengths)
        r = await c.one(b"POST /echo HTTP/1.1\r\nHost: t\r\n" + extra + b"\r\nhello")
        assert r.status == 400, lengths
        c.close()
    assert srv.seen.requests == []


async def test_bad_request_lines_get_400(srv: Running) -> None:
    for line in (b"GARBAGE\r\n\r\n", b"GET /a b HTTP/1.1\r\n\r\n", b"GET\r\n\r\n",
                 b"GET / HTTP/1.1\r\nBad Header\r\n\r\n"):
        c = await Conn.open(srv.port)
        r = await c.one(line)
        assert r.status == 400, line
        err = json.loads(r.body)["error"]
        assert err["source"] == "gateway" and err["message"].startswith("Malformed HTTP request: ")
        c.close()
    c = await Conn.open(srv.port)
    r = await c.one(b"G\x01T / HTTP/1.1\r\n\r\n")
    assert json.loads(r.body)["error"]["message"] == "Malformed HTTP request: invalid method."
    c.close()


async def test_http_versions_it_cannot_speak_get_505(srv: Running) -> None:
    for line in (b"GET /echo HTTP/2.0\r\n\r\n", b"GET /echo HTTP/0.9\r\n\r\n",
                 b"GET /echo HTTP/1.2\r\n\r\n", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"):
        c = await Conn.open(srv.port)
        r = await c.one(line)
        assert r.status == 505, line
        assert json.loads(r.body)["error"]["message"] == (
            "This server speaks HTTP/1.1 (and 1.0) only."), line
        c.close()
    # HTTP/1.0 is spoken, one request per connection
    c = await Conn.open(srv.port)
    r = await c.one(b"GET /echo HTTP/1.0\r\n\r\n")
    assert r.status == 200 and json.loads(r.body)["http_version"] == "1.0"
    assert await c.closed()
    c = await Conn.open(srv.port)  # even when the client asks for keep-alive
    r = await c.one(b"GET /echo HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    assert r.status == 200 and r.headers["connection"] == "close"
    assert await c.closed()


async def test_client_closing_mid_body_delivers_disconnect(srv: Running) -> None:
    c = await Conn.open(srv.port)
    await c.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\nhalf")
    await asyncio.sleep(0.1)
    t0 = time.monotonic()
    c.writer.transport.abort()
    await asyncio.wait_for(srv.seen.disconnected.wait(), 2)
    print(f"\nhttp.disconnect reached the app {1000 * (time.monotonic() - t0):.1f} ms "
          "after the client closed mid-body")
    assert srv.seen.disconnects == ["/echo"]


async def test_client_closing_mid_stream_delivers_disconnect(srv: Running) -> None:
    c = await Conn.open(srv.port)
    await c.send(b"POST /stream?n=100 HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n")
    first = await asyncio.wait_for(c.reader.read(65536), 5)
    assert b"transfer-encoding: chunked" in first
    t0 = time.monotonic()
    c.writer.transport.abort()
    await asyncio.wait_for(srv.seen.disconnected.wait(), 2)
    print(f"\nhttp.disconnect reached the app {1000 * (time.monotonic() - t0):.1f} ms "
          "after the client closed mid-stream")
    assert srv.seen.disconnects == ["/stream"]


async def test_a_streamed_response_is_chunked_and_complete(srv: Running) -> None:
    c = await Conn.open(srv.port)
    r = await c.one(b"GET /stream?n=3 HTTP/1.1\r\nHost: t\r\n\r\n")
    assert r.body == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
    assert r.headers["transfer-encoding"] == "chunked"
    assert (await c.one(GET)).status == 200
    c.close()


async def test_scope_is_what_an_asgi_app_expects(srv: Running) -> None:
    c = await Conn.open(srv.port)
    r = await c.one(b"GET /echo%20x/%2Fy?a=1&b=%20 HTTP/1.1\r\nHost: t\r\nX-Mixed-Case: V\r\n\r\n")
    s = json.loads(r.body)
    assert s["path"] == "/echo x//y"
    assert s["raw_path"] == "/echo%20x/%2Fy"
    assert s["query_string"] == "a=1&b=%20"
    assert ["x-mixed-case", "V"] in s["headers"] and s["lower"]
    assert s["scheme"] == "http" and s["http_version"] == "1.1"
    assert s["client"][0] == "127.0.0.1" and s["server"] == ["127.0.0.1", srv.port]
    assert s["type"] == "http" and s["asgi"]["version"] == "3.0" and s["root_path"] == ""
    c.close()


async def test_every_request_target_form_reaches_the_app_as_a_path(srv: Running) -> None:
    # origin-form, absolute-form (as a proxy-minded client sends), a fragment (never a path's),
    # and an absolute-form the URL parser refuses.
    for target, want in ((b"/echo?a=1", ("/echo", "/echo", "a=1")),
                         (b"http://t/echo?a=1", ("/echo", "/echo", "a=1")),
                         (b"http://t/echo", ("/echo", "/echo", "")),
                         (b"/echo?a=1#frag", ("/echo", "/echo", "a=1")),
                         (b"/echo#frag", ("/echo", "/echo", ""))):
        c = await Conn.open(srv.port)
        r = await c.one(b"GET %b HTTP/1.1\r\nHost: t\r\n\r\n" % target)
        s = json.loads(r.body)
        assert (s["path"], s["raw_path"], s["query_string"]) == want, target
        c.close()
    for target in (b"http://[bad/echo", b"http://t:99999/echo"):
        c = await Conn.open(srv.port)
        r = await c.one(b"GET %b HTTP/1.1\r\nHost: t\r\n\r\n" % target)
        assert r.status == 400, target
        assert json.loads(r.body)["error"]["message"] == "Malformed HTTP request: invalid target."
        c.close()


async def test_declared_body_over_the_limit_is_413_before_the_app_runs(srv: Running) -> None:
    c = await Conn.open(srv.port)
    r = await c.one(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 100001\r\n\r\nxx")
    assert r.status == 413
    assert json.loads(r.body)["error"]["code"] == "request_too_large"
    assert "100000" in json.loads(r.body)["error"]["message"]
    assert srv.seen.requests == []
    c = await Conn.open(srv.port)  # exactly at the limit is allowed
    r = await c.one(post("/echo", b"x" * 100_000))
    assert r.status == 200 and json.loads(r.body)["body_len"] == 100_000
    c.close()


async def test_header_bytes_and_count_limits_get_431() -> None:
    async with running(max_header_bytes=4096, max_headers=20) as srv:
        c = await Conn.open(srv.port)
        r = await c.one(b"GET /echo HTTP/1.1\r\nX-Big: " + b"a" * 5000 + b"\r\n\r\n")
        assert r.status == 431
        assert json.loads(r.body)["error"]["code"] == "request_headers_too_large"
        c = await Conn.open(srv.port)
        many = b"".join(b"X-%d: v\r\n" % i for i in range(21))
        r = await c.one(b"GET /echo HTTP/1.1\r\n" + many + b"\r\n")
        assert r.status == 431
        assert "more than 20 header lines" in json.loads(r.body)["error"]["message"]
        c = await Conn.open(srv.port)
        assert (await c.one(GET)).status == 200
        assert srv.seen.requests == [{"path": "/echo", "query": {}}]


async def test_the_head_limit_counts_the_target_and_each_header_line_to_the_byte() -> None:
    # max_header_bytes bounds the request target plus every header line as sent ("name: value"
    # and its CRLF): a head exactly at the limit is served, one byte more is a 431. The long
    # name makes a count that left names out (or miscounted a line's four bytes) visible.
    limit = 300
    name = b"X-" + b"n" * 58
    fixed = len(b"/echo") + len(b"Host: t\r\n") + len(name) + len(b": \r\n")
    async with running(max_header_bytes=limit) as srv:
        for extra, status in ((0, 200), (1, 431)):
            value = b"v" * (limit - fixed + extra)
            c = await Conn.open(srv.port)
            r = await c.one(b"GET /echo HTTP/1.1\r\nHost: t\r\n%b: %b\r\n\r\n" % (name, value))
            assert r.status == status, (extra, r.body)
            c.close()


async def test_a_header_line_that_never_ends_is_cut_at_its_bound() -> None:
    # The parser holds an unfinished header line, so the server bounds the bytes of a head in
    # progress: twice max_header_bytes plus 64 KiB. At the bound it still waits; a byte past it,
    # 431 and the connection closes, long before the header timeout.
    bound = 2 * 1024 + 65536
    async with running(max_header_bytes=1024, header_timeout_s=30) as srv:
        c = await Conn.open(srv.port)
        start = b"GET /echo HTTP/1.1\r\nX-Endless: "
        await c.send(start)
        left = bound - len(start)
        while left:
            n = min(4096, left)
            await c.send(b"a" * n)
            left -= n
        with pytest.raises(asyncio.TimeoutError):
            await c.responses(1, within_s=0.5)
        await c.send(b"a")
        (r,) = await c.responses(1)
        assert r.status == 431
        assert json.loads(r.body)["error"]["code"] == "request_headers_too_large"
        assert await c.closed()


async def test_an_upgrade_request_is_answered_and_the_connection_closed(srv: Running) -> None:
    # Upgrades (WebSocket, h2c) aren't served: the request is answered as a plain one, and
    # nothing after it on the connection is read as HTTP.
    c = await Conn.open(srv.port)
    await c.send(b"GET /echo HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\n"
                 b"Upgrade: websocket\r\n\r\n" + GET)
    (r,) = await c.responses(1)
    assert r.status == 200 and r.headers["connection"] == "close"
    rest = b""
    while more := await asyncio.wait_for(c.reader.read(65536), 5):  # until the server closes
        rest += more
    assert rest == b"" and c.raw.count(b"HTTP/1.1 ") == 1  # the GET after it: never answered
    # Bytes that come in a later read, while the upgrade request is still being answered,
    # aren't parsed either.
    c = await Conn.open(srv.port)
    await c.send(b"GET /slow?ms=300 HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\n"
                 b"Upgrade: h2c\r\n\r\n")
    await asyncio.sleep(0.1)
    await c.send(GET)
    (r,) = await c.responses(1)
    assert r.status == 200 and await c.closed()
    assert [q["path"] for q in srv.seen.requests] == ["/echo", "/slow"]


async def test_a_target_split_across_reads_is_one_path_and_counts_whole() -> None:
    limit = 300
    async with running(max_header_bytes=limit) as srv:
        c = await Conn.open(srv.port)
        for piece in (b"GET /ec", b"ho?a=", b"1 HTTP/1.1\r\nHost: t\r\n\r\n"):
            await c.send(piece)
            await asyncio.sleep(0.05)
        (r,) = await c.responses(1)
        s = json.loads(r.body)
        assert (s["path"], s["query_string"]) == ("/echo", "a=1")
        c.close()
        # A target alone at the limit is served, a byte over it is 431, however it arrives.
        for extra, status in ((0, 200), (1, 431)):
            target = b"/echo?q=" + b"a" * (limit - len(b"/echo?q=") + extra)
            c = await Conn.open(srv.port)
            for piece in (b"GET " + target[:100], target[100:] + b" HTTP/1.1\r\n\r\n"):
                await c.send(piece)
                await asyncio.sleep(0.05)
            (r,) = await c.responses(1)
            assert r.status == status, extra
            c.close()


async def test_a_body_held_back_for_the_app_is_not_the_clients_slowness() -> None:
    # Reading pauses while the app hasn't read (1.5 s here): that time isn't counted against
    # the client's minimum rate, which this 1 MiB body, sent at once, meets.
    async with running(header_timeout_s=0.3, body_min_rate_bytes_s=200_000) as srv:
        c = await Conn.open(srv.port)
        body = b"x" * (1024 * 1024)
        r = await c.one(post("/slow?ms=1500", body), within_s=10)
        assert r.status == 200 and json.loads(r.body)["body_len"] == len(body)
        c.close()


async def test_an_expect_value_under_another_name_asks_for_no_100(srv: Running) -> None:
    c = await Conn.open(srv.port)
    await c.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n"
                 b"X-Note: 100-continue\r\n\r\n")
    await asyncio.sleep(0.3)  # the app is waiting for the body: nothing may be sent meanwhile
    await c.send(b"hello")
    (r,) = await c.responses(1)
    assert r.status == 200 and json.loads(r.body)["body_len"] == 5
    c.close()


async def test_a_head_sent_in_pieces_within_the_timeout_is_served() -> None:
    async with running(header_timeout_s=1.5) as srv:
        c = await Conn.open(srv.port)
        for piece in (b"GET /echo HT", b"TP/1.1\r\nHost:", b" t\r\n", b"\r\n"):
            await c.send(piece)
            await asyncio.sleep(0.25)  # the server's sweep runs several times meanwhile
        (r,) = await c.responses(1)
        assert r.status == 200
        c.close()


async def test_idle_limits_a_new_connection_by_header_timeout_and_a_served_one_by_keepalive(
) -> None:
    async with running(header_timeout_s=0.4, keepalive_timeout_s=3) as srv:
        fresh = await Conn.open(srv.port)
        t0 = time.monotonic()
        assert await fresh.closed(within_s=2.5)  # a connection that never sent a byte
        assert time.monotonic() - t0 < 2.5
        served = await Conn.open(srv.port)
        assert (await served.one(GET)).status == 200
        await asyncio.sleep(1.2)  # idle past header_timeout_s, within keepalive_timeout_s
        assert (await served.one(GET)).status == 200
        served.close()


async def test_a_head_that_never_ends_gets_408_and_an_idle_connection_is_closed() -> None:
    async with running(header_timeout_s=0.5, keepalive_timeout_s=0.5) as srv:
        half = await Conn.open(srv.port)
        await half.send(b"GET /echo HTTP/1.1\r\nHost: t\r\nX-Slow: ")
        silent = await Conn.open(srv.port)
        (r,) = await half.responses(1, within_s=5)
        assert r.status == 408
        assert json.loads(r.body)["error"]["code"] == "request_timeout"
        assert await silent.closed(within_s=5)
        assert silent.raw == b""  # an idle connection is closed without an answer
        kept = await Conn.open(srv.port)
        assert (await kept.one(GET)).status == 200
        assert await kept.closed(within_s=5)  # keepalive_timeout_s


async def test_a_trickling_body_is_cut_with_408() -> None:
    async with running(header_timeout_s=0.5, body_min_rate_bytes_s=1000) as srv:
        c = await Conn.open(srv.port)
        await c.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 100000\r\n\r\n")
        got: list[int] = []

        async def trickle() -> None:
            for _ in range(40):
                await c.send(b"x" * 10)
                await asyncio.sleep(0.1)

        t = asyncio.ensure_future(trickle())
        try:
            (r,) = await c.responses(1, within_s=5)
            got.append(r.status)
        finally:
            t.cancel()
        assert got == [408]
        await asyncio.wait_for(srv.seen.disconnected.wait(), 2)  # the app was told


async def test_a_body_above_the_minimum_rate_is_not_cut_however_long_it_takes() -> None:
    # 3,000 bytes at about 2,500 bytes/s against a 1,000 bytes/s minimum: it takes three times
    # header_timeout_s, and each sweep must see the whole body so far, not the last piece.
    async with running(header_timeout_s=0.4, body_min_rate_bytes_s=1000) as srv:
        c = await Conn.open(srv.port)
        await c.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 3000\r\n\r\n")
        for _ in range(12):
            await c.send(b"x" * 250)
            await asyncio.sleep(0.1)
        (r,) = await c.responses(1)
        assert r.status == 200 and json.loads(r.body)["body_len"] == 3000
        c.close()


async def test_past_max_connections_new_ones_get_503_and_old_ones_keep_working() -> None:
    async with running(max_connections=5) as srv:
        held = [await Conn.open(srv.port) for _ in range(5)]
        for c in held:
            assert (await c.one(GET)).status == 200
        extra = await Conn.open(srv.port)
        (r,) = await extra.responses(1)
        assert r.status == 503 and r.headers["retry-after"] == "1"
        assert json.loads(r.body)["error"]["code"] == "server_busy"
        for c in held:
            assert (await c.one(GET)).status == 200
        held[0].close()
        await asyncio.sleep(0.2)
        again = await Conn.open(srv.port)
        assert (await again.one(GET)).status == 200


async def test_a_slow_reader_holds_the_app_back_instead_of_growing_memory(srv: Running) -> None:
    c = await Conn.open(srv.port)
    await c.send(b"GET /big?mb=64 HTTP/1.1\r\nHost: t\r\n\r\n")
    await asyncio.sleep(1.0)  # the client reads nothing
    # Socket buffers plus the transport's high-water mark, far below the 64 MiB response.
    assert srv.seen.big_sent < 16 * 1024 * 1024, srv.seen.big_sent
    got = 0
    while got < 64 * 1024 * 1024:
        data = await asyncio.wait_for(c.reader.read(1 << 20), 5)
        assert data
        got += len(data)
    assert srv.seen.big_sent == 64 * 1024 * 1024
    c.close()


async def test_graceful_shutdown_finishes_the_request_in_flight() -> None:
    async with running(shutdown_grace_s=5) as srv:
        c = await Conn.open(srv.port)
        await c.send(b"GET /slow?ms=500 HTTP/1.1\r\nHost: t\r\n\r\n")
        await asyncio.sleep(0.1)
        srv.server.request_stop()
        (r,) = await c.responses(1)
        assert r.status == 200 and r.headers["connection"] == "close"
        await asyncio.sleep(0.1)
        try:
            await asyncio.open_connection("127.0.0.1", srv.port)
            refused = False
        except OSError:
            refused = True
        assert refused  # no longer accepting


def _connected(t: Recording) -> HttpProtocol:
    """The server's protocol for one connection over ``t``, in front of the recording app, with
    no socket: the test feeds it bytes and reads what it wrote."""
    state = ServerState(make_app(Seen()), ServerOptions(), asyncio.get_running_loop())
    proto = HttpProtocol(state)
    proto.connection_made(t)
    return proto


async def test_a_small_response_is_one_write() -> None:
    t = Recording()
    proto = _connected(t)
    proto.data_received(post("/echo", b"hello"))
    for _ in range(20):
        if t.writes:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    assert len(t.writes) == 1  # head and body together
    assert t.writes[0].startswith(b"HTTP/1.1 200 OK\r\n") and t.writes[0].endswith(b"}")
    proto.connection_lost(None)


async def test_a_large_body_flows_through_the_read_pause_and_resume() -> None:
    async with running(max_body_bytes=8 * 1024 * 1024) as srv:
        c = await Conn.open(srv.port)
        body = bytes(range(256)) * 4096 * 4  # 4 MiB, far past the 64 KiB high-water mark
        r = await c.one(post("/echo", body), within_s=30)
        assert r.status == 200 and json.loads(r.body)["body_len"] == len(body)
        assert (await c.one(GET)).status == 200
        c.close()


async def test_a_body_the_app_has_not_read_is_held_back_by_tcp_not_buffered() -> None:
    # The app sleeps 1.5 s before reading a 16 MiB body. The server buffers 64 KiB of it, then
    # stops reading, so the client can't hand over the rest (more than the kernel's socket
    # buffers hold) until the app reads; a server that buffered it all would take it at once.
    async with running() as srv:
        c = await Conn.open(srv.port)
        body = b"x" * (16 * 1024 * 1024)
        c.writer.write(post("/slow?ms=1500", body))
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(c.writer.drain()), 0.8)
        (r,) = await c.responses(1, within_s=30)
        assert r.status == 200 and json.loads(r.body)["body_len"] == len(body)
        c.close()


async def test_reading_pauses_at_64_kib_of_unread_body_over_any_number_of_reads() -> None:
    class Pausing(Recording):
        paused = False

        def pause_reading(self) -> None:
            self.paused = True

        def resume_reading(self) -> None:
            self.paused = False

    t = Pausing()
    proto = _connected(t)
    piece = 4096
    proto.data_received(b"POST /slow?ms=300 HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n"
                        % (BODY_HIGH_WATER * 2))
    sent = 0
    while sent <= BODY_HIGH_WATER:
        assert not t.paused, sent
        proto.data_received(b"x" * piece)
        sent += piece
    assert t.paused  # past the mark: no more is read until the app reads
    for _ in range(100):  # the app wakes after 300 ms and reads what is buffered
        await asyncio.sleep(0.01)
        if not t.paused:
            break
    assert not t.paused
    proto.connection_lost(None)


async def test_too_deep_a_pipeline_gets_503_after_the_answers_before_it(srv: Running) -> None:
    c = await Conn.open(srv.port)
    await c.send(b"GET /slow?ms=200 HTTP/1.1\r\nHost: t\r\n\r\n" + GET * 40)
    rs = await c.responses(34, within_s=10)
    assert [r.status for r in rs] == [200] * 33 + [503]
    assert json.loads(rs[-1].body)["error"]["message"] == (
        "Too many pipelined requests on one connection.")
    assert rs[-1].headers["retry-after"] == "1"
    assert await c.closed()
