"""Helpers for the server tests: the HTTP server in process, on a free port, in front of a small ASGI app that records what it
saw; and a raw HTTP/1.1 client that reads responses with httptools' response parser.

The app's routes: ``/echo`` (reads the body, answers a JSON summary of the scope and body),
``/noread`` (answers without reading the body), ``/slow?ms=N``, ``/stream?n=N`` (chunked,
one event every 50 ms, watching ``receive`` for the client going away), ``/big?mb=N``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httptools

from fleetgate.server import Server, ServerOptions


@dataclass
class Seen:
    """What the app observed, for the tests to assert on."""

    requests: list[dict[str, Any]] = field(default_factory=list)
    disconnects: list[str] = field(default_factory=list)
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)
    big_sent: int = 0


async def _read_body(receive: Any) -> bytes | None:
    body = b""
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return None
        body += msg.get("body", b"")
        if not msg.get("more_body"):
            return body


def make_app(seen: Seen) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                m = await receive()
                await send({"type": m["type"] + ".complete"})
                if m["type"] == "lifespan.shutdown":
                    return
        path = scope["path"]
        q = dict(p.split("=") for p in scope["query_string"].decode().split("&") if "=" in p)
        seen.requests.append({"path": path, "query": q})
        if path == "/noread":
            await _reply(send, b"no read")
            return
        if path == "/slow":
            await asyncio.sleep(int(q.get("ms", "100")) / 1000)
        if path == "/stream":
            await _read_body(receive)
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream")]})

            async def watch() -> None:
                if (await receive())["type"] == "http.disconnect":
                    seen.disconnects.append(path)
                    seen.disconnected.set()

            w = asyncio.ensure_future(watch())
            for i in range(int(q.get("n", "5"))):
                await send({"type": "http.response.body", "body": b"data: %d\n\n" % i,
                            "more_body": True})
                await asyncio.sleep(0.05)
            await send({"type": "http.response.body", "body": b""})
            w.cancel()
            return
        if path == "/big":
            total = int(q.get("mb", "16")) * 1024 * 1024
            chunk = b"x" * 65536
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-length", str(total).encode())]})
            while seen.big_sent < total:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                seen.big_sent += len(chunk)
            await send({"type": "http.response.body", "body": b""})
            return
        body = await _read_body(receive)
        if body is None:
            seen.disconnects.append(path)
            seen.disconnected.set()
            return
        out = {
            "type": scope["type"], "asgi": scope["asgi"], "root_path": scope["root_path"],
            "method": scope["method"], "path": path, "raw_path": scope["raw_path"].decode(),
            "query_string": scope["query_string"].decode(),
            "headers": [[k.decode(), v.decode()] for k, v in scope["headers"]],
            "body_len": len(body), "http_version": scope["http_version"],
            "scheme": scope["scheme"], "client": list(scope["client"]),
            "server": list(scope["server"]),
            "lower": all(k == k.lower() and isinstance(k, bytes) for k, _ in scope["headers"]),
        }
        await _reply(send, json.dumps(out).encode())

    return app


async def _reply(send: Any, body: bytes) -> None:
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


@dataclass
class Running:
    port: int
    seen: Seen
    server: Server


@contextlib.asynccontextmanager
async def running(app: Any = None, **opts: Any) -> AsyncIterator[Running]:
    """The server on a free port, in front of ``app`` (default: the recording app above)."""
    seen = Seen()
    o = {"port": 0, "header_timeout_s": 5, "keepalive_timeout_s": 5, **opts}
    server = Server(make_app(seen) if app is None else app, ServerOptions(**o))
    started = asyncio.Event()
    task = asyncio.ensure_future(server.serve(started=started))
    await asyncio.wait_for(started.wait(), 10)
    try:
        yield Running(server.port, seen, server)
    finally:
        server.request_stop()
        await asyncio.wait_for(task, 20)


# -- a raw client ---------------------------------------------------------------------------


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


class _Collector:
    def __init__(self) -> None:
        self.done: list[Response] = []
        self.status = 0
        self.parser: Any = None
        self.headers: dict[str, str] = {}
        self.body = b""

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode().lower()] = value.decode()

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.done.append(Response(self.status, self.headers, self.body))
        self.headers, self.body = {}, b""


class Conn:
    """One raw connection: write bytes, read whole responses (httptools' parser)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.c = _Collector()
        self.parser = httptools.HttpResponseParser(self.c)
        self.c.parser = self.parser
        self.raw = b""

    @classmethod
    async def open(cls, port: int) -> Conn:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        return cls(r, w)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def responses(self, n: int, within_s: float = 5) -> list[Response]:
        """The next ``n`` complete responses (fails if they don't come within ``within_s``)."""
        async def loop() -> None:
            while len(self.c.done) < n:
                data = await self.reader.read(65536)
                if not data:
                    raise ConnectionError(f"closed after {len(self.c.done)} responses")
                self.raw += data
                self.parser.feed_data(data)

        await asyncio.wait_for(loop(), within_s)
        out, self.c.done = self.c.done[:n], self.c.done[n:]
        return out

    async def one(self, data: bytes, within_s: float = 5) -> Response:
        await self.send(data)
        return (await self.responses(1, within_s))[0]

    async def closed(self, within_s: float = 5) -> bool:
        """True when the server closes the connection (EOF or reset) within ``within_s``."""
        try:
            while await asyncio.wait_for(self.reader.read(65536), within_s):
                pass
        except ConnectionError:
            return True
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        self.writer.close()


class Recording(asyncio.Transport):
    """A transport that records writes, for driving :class:`HttpProtocol` without sockets."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))

    def get_extra_info(self, name: str, default: object = None) -> object:
        return {"peername": ("127.0.0.1", 1), "sockname": ("127.0.0.1", 2)}.get(name)

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None: ...

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed
