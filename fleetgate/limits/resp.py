"""A small Redis client for the limits backend: one pipelined connection, RESP2, no pool.

Why not ``redis-py``: its asyncio client cost 250-500 µs of CPU per admission and settle on the
development machine (connection pool, per-command timeouts and locks, argument encoding in
Python), more than the whole rest of a request. Redis runs commands one at a time in the order
they arrive, so one connection that writes every command at once and matches the replies in
order (FIFO) is both the fastest and the simplest client. Measured in ``docs/limits.md``.

Promises:
- :meth:`Resp.call` queues the command (no task, no lock) and returns a future of its reply.
  Every command queued in one turn of the event loop leaves in one write, at the end of that
  turn: commands from many requests share the connection, its TCP segments and one system call
  (a write per command cost more CPU than the rest of the client).
- Every command has a deadline (``timeout_s``). One sweep per ``timeout_s / 4`` checks only the
  oldest command: if it is late, the connection is cut and every command on it fails with
  ``TimeoutError`` (the replies could no longer be matched). The next call reconnects.
- A lost connection fails its commands with ``ConnectionError``; nothing is retried here (the
  caller decides: admission fails closed or open, settles are resent idempotently).
- Bounded: at most ``max_pending`` commands in flight (more fail at once with
  ``ConnectionError``); a reply larger than ``max_reply_bytes`` cuts the connection.
- Error replies raise :class:`RespError` with Redis's message.
- ``redis://[[user]:password@]host[:port][/db]``, ``rediss://`` (TLS, certificate verified) and
  ``unix:///path[?db=N]`` URLs; AUTH and SELECT are sent first on every connection.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import ssl
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

Reply = Any  # bytes | int | None | list[Reply] | RespError (inside arrays)


class RespError(Exception):
    """Redis answered with an error (``-ERR ...``, ``-NOSCRIPT ...``)."""


@dataclass(frozen=True, slots=True)
class Address:
    host: str | None
    port: int
    path: str | None  # a Unix socket
    tls: bool
    username: str | None
    password: str | None
    db: int

    @classmethod
    def parse(cls, url: str) -> Address:
        u = urlsplit(url)
        if u.scheme not in ("redis", "rediss", "unix"):
            raise ValueError("a Redis URL must be redis://, rediss:// or unix://")
        query = parse_qs(u.query)
        db_text = query.get("db", [""])[0] or (u.path.lstrip("/") if u.scheme != "unix" else "")
        try:
            db = int(db_text or 0)
        except ValueError:
            raise ValueError("the Redis database in the URL must be a number") from None
        return cls(
            host=None if u.scheme == "unix" else (u.hostname or "127.0.0.1"),
            port=u.port or 6379,
            path=u.path if u.scheme == "unix" else None,
            tls=u.scheme == "rediss",
            username=unquote(u.username) if u.username else None,
            password=unquote(u.password) if u.password is not None else None,
            db=db,
        )


def bulk(value: bytes) -> bytes:
    """One RESP bulk string."""
    return b"$%d\r\n%b\r\n" % (len(value), value)


def encode(args: tuple[Any, ...] | list[Any]) -> bytes:
    """A command as RESP: an array of bulk strings (by exact type first: this runs per command)."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        t = type(a)
        if t is str:
            b = a.encode()
        elif t is int:
            b = b"%d" % a
        elif t is bytes:
            b = a
        elif t is bool:
            b = b"1" if a else b"0"
        elif t is float:
            b = repr(a).encode()
        else:
            raise TypeError(f"can't send {t.__name__} to Redis")
        out.append(bulk(b))
    return b"".join(out)


class _Incomplete(Exception):
    pass


class Parser:
    """RESP2 replies from a byte stream. :meth:`feed` returns every complete reply so far."""

    __slots__ = ("buf", "max_bytes")

    def __init__(self, max_bytes: int) -> None:
        self.buf = bytearray()
        self.max_bytes = max_bytes

    def feed(self, data: bytes) -> list[Reply]:
        self.buf += data
        out: list[Reply] = []
        pos = 0
        while pos < len(self.buf):
            try:
                reply, pos = self._one(pos)
            except _Incomplete:
                break
            out.append(reply)
        if pos:
            del self.buf[:pos]
        if len(self.buf) > self.max_bytes:
            raise ValueError(f"a Redis reply over {self.max_bytes} bytes")
        return out

    def _line(self, pos: int) -> tuple[bytes, int]:
        end = self.buf.find(b"\r\n", pos)
        if end < 0:
            raise _Incomplete
        return bytes(self.buf[pos + 1:end]), end + 2

    def _one(self, pos: int) -> tuple[Reply, int]:
        if pos >= len(self.buf):
            raise _Incomplete  # an array's next item hasn't arrived
        kind = self.buf[pos]
        line, pos = self._line(pos)
        if kind == 0x2B:  # + simple string
            return line, pos
        if kind == 0x3A:  # : integer
            return int(line), pos
        if kind == 0x2D:  # - error
            return RespError(line.decode("utf-8", "replace")), pos
        if kind == 0x24:  # $ bulk string
            n = int(line)
            if n < 0:
                return None, pos
            if len(self.buf) < pos + n + 2:
                raise _Incomplete
            return bytes(self.buf[pos:pos + n]), pos + n + 2
        if kind == 0x2A:  # * array
            n = int(line)
            if n < 0:
                return None, pos
            items = []
            for _ in range(n):
                item, pos = self._one(pos)
                items.append(item)
            return items, pos
        raise ValueError(f"not a RESP2 reply (type byte {kind!r})")


class _Conn(asyncio.Protocol):
    def __init__(self, client: Resp) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.parser = Parser(client.max_reply_bytes)
        # (future, deadline) per command written, oldest first
        self.waiting: collections.deque[tuple[asyncio.Future[Reply], float]] = collections.deque()
        self.lost: BaseException | None = None
        self.out: list[bytes] = []  # commands queued this turn of the loop, written by flush()
        self.flushing = False

    def queue(self, command: bytes) -> None:
        self.out.append(command)
        if not self.flushing:
            self.flushing = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self.flushing = False
        out, self.out = self.out, []
        if out and self.lost is None and self.transport is not None:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            replies = self.parser.feed(data)
        except (ValueError, RecursionError) as e:
            self.fail(ConnectionError(f"bad reply from Redis: {e}"))
            return
        for r in replies:
            if not self.waiting:
                self.fail(ConnectionError("Redis sent a reply nobody asked for"))
                return
            fut, _ = self.waiting.popleft()
            if fut.done():
                continue
            if isinstance(r, RespError):
                fut.set_exception(r)
            else:
                fut.set_result(r)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(ConnectionError(f"the connection to Redis was lost: {exc or 'closed'}"))

    def fail(self, exc: BaseException) -> None:
        if self.lost is None:
            self.lost = exc
        if self.client._conn is self:
            self.client._conn = None
        self.out = []
        while self.waiting:
            fut, _ = self.waiting.popleft()
            if not fut.done():
                fut.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()


class Resp:
    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 1.0,
        max_pending: int = 100_000,
        max_reply_bytes: int = 1024 * 1024,
    ) -> None:
        self.address = Address.parse(url)
        self.timeout_s = timeout_s
        self.max_pending = max_pending
        self.max_reply_bytes = max_reply_bytes
        self._conn: _Conn | None = None
        self._connecting: asyncio.Future[_Conn] | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False
        self._scripts: dict[bytes, bytes] = {}  # sha1 -> source

    # -- connection -------------------------------------------------------------------------------

    async def _connect(self) -> _Conn:
        if self._closed:
            raise ConnectionError("the Redis client is closed")
        if self._conn is not None:
            return self._conn
        if self._connecting is not None:
            return await asyncio.shield(self._connecting)
        loop = asyncio.get_running_loop()
        self._connecting = loop.create_future()
        try:
            conn = await asyncio.wait_for(self._open(), self.timeout_s)
        except BaseException as e:
            fut, self._connecting = self._connecting, None
            err = e if isinstance(e, OSError) else ConnectionError(f"can't reach Redis: {e!r}")
            fut.set_exception(err)
            fut.exception()  # retrieved: nobody else may be waiting
            raise err from None
        self._connecting.set_result(conn)
        self._connecting = None
        self._conn = conn
        if self._sweeper is None:
            self._sweep_later()
        return conn

    async def _open(self) -> _Conn:
        a = self.address
        loop = asyncio.get_running_loop()
        conn: _Conn
        if a.path is not None:
            _, conn = await loop.create_unix_connection(lambda: _Conn(self), a.path)
        else:
            ctx = ssl.create_default_context() if a.tls else None
            host = a.host or "127.0.0.1"
            _, conn = await loop.create_connection(lambda: _Conn(self), host, a.port, ssl=ctx)
        try:
            hello: list[asyncio.Future[Reply]] = []
            if a.password is not None:
                auth = ("AUTH", a.username, a.password) if a.username else ("AUTH", a.password)
                hello.append(self._send(conn, auth))
            if a.db:
                hello.append(self._send(conn, ("SELECT", a.db)))
            for f in hello:
                await f
        except BaseException:
            conn.fail(ConnectionError("Redis refused the connection's AUTH or SELECT"))
            raise
        return conn

    def _send(self, conn: _Conn, args: tuple[Any, ...] | list[Any]) -> asyncio.Future[Reply]:
        return self._send_encoded(conn, encode(args))

    def _send_encoded(self, conn: _Conn, command: bytes) -> asyncio.Future[Reply]:
        fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        if conn.lost is not None or conn.transport is None:
            fut.set_exception(ConnectionError("the connection to Redis was lost"))
            return fut
        if len(conn.waiting) >= self.max_pending:
            fut.set_exception(ConnectionError("too many Redis commands in flight"))
            return fut
        conn.waiting.append((fut, time.monotonic() + self.timeout_s))
        conn.queue(command)
        return fut

    def _sweep_later(self) -> None:
        loop = asyncio.get_running_loop()
        self._sweeper = loop.call_later(max(0.01, self.timeout_s / 4), self._sweep)

    def _sweep(self) -> None:
        self._sweeper = None
        if self._closed:
            return
        conn = self._conn
        if conn is not None and conn.waiting and conn.waiting[0][1] < time.monotonic():
            conn.fail(TimeoutError(f"Redis did not answer within {self.timeout_s} s"))
        self._sweep_later()

    # -- commands ---------------------------------------------------------------------------------

    async def call(self, *args: Any) -> Reply:
        conn = self._conn
        if conn is None:
            conn = await self._connect()
        return await self._send(conn, args)

    async def many(self, commands: list[tuple[Any, ...]]) -> list[Reply | RespError]:
        """Send commands back to back (a pipeline); every reply or error, in order."""
        return await self._many_encoded([encode(c) for c in commands])

    def script(self, source: str) -> bytes:
        """Register a Lua script; its SHA1, for :meth:`evalsha`."""
        sha = hashlib.sha1(source.encode()).hexdigest().encode()
        self._scripts[sha] = source.encode()
        return sha

    async def evalsha(self, sha: bytes, keys: list[str], args: list[Any]) -> Reply:
        return await self.evalsha_one(sha, encode(("EVALSHA", sha, len(keys), *keys, *args)))

    async def evalsha_one(self, sha: bytes, command: bytes) -> Reply:
        """One run of a script the caller encoded itself (as :func:`encode` writes
        ``EVALSHA sha ...``); loads the script first if Redis lacks it."""
        for attempt in (0, 1):
            conn = self._conn or await self._connect()
            try:
                return await self._send_encoded(conn, command)
            except RespError as e:
                if attempt or not str(e).startswith("NOSCRIPT"):
                    raise
            await self.call("SCRIPT", "LOAD", self._scripts[sha])
        raise AssertionError("unreachable")  # pragma: no cover

    async def evalsha_many(
        self, sha: bytes, calls: list[tuple[list[str], list[Any]]]
    ) -> list[Reply | RespError]:
        """Many runs of one script, pipelined; loads the script first if Redis lacks it."""
        return await self.evalsha_encoded(
            sha, [encode(("EVALSHA", sha, len(k), *k, *a)) for k, a in calls])

    async def evalsha_encoded(self, sha: bytes, commands: list[bytes]) -> list[Reply | RespError]:
        """:meth:`evalsha_many` for commands the caller encoded itself (``EVALSHA`` of ``sha``,
        as :func:`encode` writes it): every reply or error, in order."""
        out = await self._many_encoded(commands)
        if any(isinstance(r, RespError) and str(r).startswith("NOSCRIPT") for r in out):
            await self.call("SCRIPT", "LOAD", self._scripts[sha])
            out = await self._many_encoded(commands)
        return out

    async def _many_encoded(self, commands: list[bytes]) -> list[Reply | RespError]:
        conn = self._conn or await self._connect()
        futs = [self._send_encoded(conn, c) for c in commands]
        out: list[Reply | RespError] = []
        for f in futs:
            try:
                out.append(await f)
            except RespError as e:
                out.append(e)
        return out

    async def aclose(self) -> None:
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.fail(ConnectionError("the Redis client was closed"))
