"""The limits backend's Redis client (``fleetgate.limits.resp``): the RESP2 parser byte by byte,
URLs, and the client against a real ``redis-server`` and against servers that misbehave (silent,
hanging up, sending garbage or replies nobody asked for)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import pytest
from helpers import free_port
from redis_server import RedisServer

from fleetgate.limits.resp import Address, Parser, Resp, RespError, encode

REPLIES = [
    (b"+OK\r\n", b"OK"),
    (b":42\r\n", 42),
    (b":-7\r\n", -7),
    (b"$5\r\nhello\r\n", b"hello"),
    (b"$0\r\n\r\n", b""),
    (b"$-1\r\n", None),
    (b"*-1\r\n", None),
    (b"*0\r\n", []),
    (b"$4\r\na\r\nb\r\n", b"a\r\nb"),  # a bulk string's length, not its CRLFs, ends it
    (b"*3\r\n:1\r\n$3\r\nabc\r\n*2\r\n:2\r\n$-1\r\n", [1, b"abc", [2, None]]),
]


@pytest.mark.parametrize(("wire", "want"), REPLIES)
def test_every_reply_parses_however_the_bytes_are_cut(wire: bytes, want: object) -> None:
    for cut in range(len(wire) + 1):
        p = Parser(1 << 20)
        got = p.feed(wire[:cut]) + p.feed(wire[cut:])
        assert got == [want], cut
        assert not p.buf


def test_several_replies_in_one_read_come_out_in_order() -> None:
    p = Parser(1 << 20)
    wire = b"".join(w for w, _ in REPLIES)
    assert p.feed(wire) == [want for _, want in REPLIES]


def test_an_error_reply_is_a_resp_error_with_the_message() -> None:
    (err,) = Parser(1 << 20).feed(b"-NOSCRIPT No matching script\r\n")
    assert isinstance(err, RespError) and str(err) == "NOSCRIPT No matching script"


def test_garbage_and_oversized_replies_are_refused() -> None:
    with pytest.raises(ValueError):
        Parser(1 << 20).feed(b"?what\r\n")
    with pytest.raises(ValueError):
        Parser(1 << 20).feed(b":notanumber\r\n")
    with pytest.raises(ValueError, match="over 16 bytes"):
        Parser(16).feed(b"$100\r\n" + b"x" * 40)


def test_commands_are_arrays_of_bulk_strings() -> None:
    assert encode(("SET", "k", b"v", 5, True)) == (
        b"*5\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n$1\r\n5\r\n$1\r\n1\r\n"
    )
    with pytest.raises(TypeError):
        encode(("SET", None))


@pytest.mark.parametrize(("url", "want"), [
    ("redis://127.0.0.1:6380/2", Address("127.0.0.1", 6380, None, False, None, None, 2)),
    ("redis://localhost", Address("localhost", 6379, None, False, None, None, 0)),
    ("rediss://:s%40cret@h:1/0", Address("h", 1, None, True, None, "s@cret", 0)),
    ("redis://user:pw@h/3", Address("h", 6379, None, False, "user", "pw", 3)),
    ("unix:///run/redis.sock?db=4", Address(None, 6379, "/run/redis.sock", False, None, None, 4)),
])
def test_urls(url: str, want: Address) -> None:
    assert Address.parse(url) == want


@pytest.mark.parametrize("url", ["http://h", "redis://h/x"])
def test_bad_urls_are_refused(url: str) -> None:
    with pytest.raises(ValueError):
        Address.parse(url)


async def test_against_real_redis(redis_srv: RedisServer) -> None:
    c = Resp(redis_srv.url.replace("/0", "/5"))
    try:
        assert await c.call("SET", "fg-resp-k", "v1") == b"OK"
        assert await c.call("GET", "fg-resp-k") == b"v1"
        assert await c.call("SET", "fg-resp-k", "v2", "NX") is None
        with pytest.raises(RespError, match="WRONGTYPE"):
            await c.call("HGETALL", "fg-resp-k")
        # Many requests at once share the one connection; replies match their commands.
        got = await asyncio.gather(*(c.call("ECHO", str(i)) for i in range(500)))
        assert got == [str(i).encode() for i in range(500)]
        # A script Redis doesn't have yet is loaded on NOSCRIPT, then run.
        await c.call("SCRIPT", "FLUSH")
        sha = c.script("return {KEYS[1], ARGV[1] + 1}")
        assert await c.evalsha(sha, ["a"], [41]) == [b"a", 42]
        await c.call("SCRIPT", "FLUSH")
        out = await c.evalsha_many(sha, [(["x"], [1]), (["y"], [2])])
        assert out == [[b"x", 2], [b"y", 3]]
        assert await c.call("SELECT", 0) == b"OK"  # SELECT applied: the key lives in db 5
        assert await c.call("GET", "fg-resp-k") is None
    finally:
        await c.aclose()
    with pytest.raises(ConnectionError):
        await c.call("PING")


@contextlib.asynccontextmanager
async def fake_redis(
    on_data: Callable[[asyncio.StreamWriter, bytes], None],
) -> AsyncIterator[str]:
    """A loopback server that answers Redis commands as ``on_data`` says."""
    writers: list[asyncio.StreamWriter] = []

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        writers.append(w)
        while data := await r.read(65536):
            on_data(w, data)
        w.close()

    port = free_port()
    server = await asyncio.start_server(handle, "127.0.0.1", port)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        for w in writers:
            w.close()
        server.close()
        await server.wait_closed()


async def test_a_silent_server_times_out_every_command_and_the_next_call_reconnects() -> None:
    seen: list[bytes] = []
    answer = False

    def on_data(w: asyncio.StreamWriter, data: bytes) -> None:
        seen.append(data)
        if answer:
            w.write(b"+PONG\r\n")

    async with fake_redis(on_data) as url:
        c = Resp(url, timeout_s=0.2)
        try:
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            results = await asyncio.gather(c.call("PING"), c.call("PING"),
                                           return_exceptions=True)
            assert all(isinstance(r, TimeoutError) for r in results), results
            assert loop.time() - t0 < 2  # the deadline, plus at most one sweep
            answer = True
            assert await c.call("PING") == b"PONG"
        finally:
            await c.aclose()


async def test_a_hang_up_fails_the_commands_in_flight() -> None:
    def on_data(w: asyncio.StreamWriter, data: bytes) -> None:
        w.close()

    async with fake_redis(on_data) as url:
        c = Resp(url, timeout_s=5)
        try:
            with pytest.raises(ConnectionError):
                await c.call("PING")
        finally:
            await c.aclose()


@pytest.mark.parametrize("reply", [b"?garbage\r\n", b"+OK\r\n+EXTRA\r\n"])
async def test_garbage_or_an_unasked_reply_cuts_the_connection(reply: bytes) -> None:
    def on_data(w: asyncio.StreamWriter, data: bytes) -> None:
        w.write(reply)

    async with fake_redis(on_data) as url:
        c = Resp(url, timeout_s=5)
        try:
            if reply.startswith(b"?"):
                with pytest.raises(ConnectionError, match="bad reply"):
                    await c.call("PING")
            else:
                assert await c.call("PING") == b"OK"  # then the extra reply cuts it
                await asyncio.sleep(0.05)
                assert c._conn is None
        finally:
            await c.aclose()


async def test_nothing_listening_is_a_connection_error_in_time() -> None:
    c = Resp(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.5)
    with pytest.raises(OSError):
        await c.call("PING")
    await c.aclose()


async def test_commands_in_flight_are_bounded() -> None:
    async with fake_redis(lambda w, d: None) as url:
        c = Resp(url, timeout_s=5, max_pending=3)
        try:
            calls = [asyncio.ensure_future(c.call("PING")) for _ in range(5)]
            await asyncio.sleep(0.1)
            over = [f for f in calls if f.done()]
            assert len(over) == 2
            assert all(isinstance(f.exception(), ConnectionError) for f in over)
        finally:
            await c.aclose()
            await asyncio.gather(*calls, return_exceptions=True)
