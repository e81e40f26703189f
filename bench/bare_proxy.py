"""The floor for Python on this box: a bare proxy with the gateway's essential work and nothing
else, as the calibration in issue 11 measured it. A reference for ``bench/server_ab.py``, not a
product: no routing table, no errors in OpenAI's shape, no streaming, no limits.

    python -m bench.bare_proxy --port P --upstream http://127.0.0.1:U --key KEY

Per request, on uvloop + httptools as raw ``asyncio.Protocol``s: look the key's SHA-256 digest
up in a dict, parse ``model`` from the JSON body, send the body upstream over a pooled
keep-alive connection, read the whole answer, count its ``usage`` in memory, and answer with
one write.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
from collections import Counter, deque
from urllib.parse import urlparse

import httptools
import orjson


class Upstream(asyncio.Protocol):
    """One keep-alive connection to the upstream; one request at a time."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.body: list[bytes] = []
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        waiter, self.waiter = self.waiter, None
        body, self.body = b"".join(self.body), []
        if waiter is not None and not waiter.done():
            waiter.set_result((self.parser.get_status_code(), body))
        self.pool.idle.append(self)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("upstream closed"))
        if self in self.pool.idle:
            self.pool.idle.remove(self)


class Pool:
    def __init__(self, url: str) -> None:
        u = urlparse(url)
        self.host, self.port = u.hostname or "127.0.0.1", u.port or 80
        self.idle: deque[Upstream] = deque()
        self.head = b"Host: %s:%d\r\nContent-Type: application/json\r\n" % (
            self.host.encode(), self.port)

    async def request(self, path: bytes, body: bytes) -> tuple[int, bytes]:
        if self.idle:
            conn = self.idle.pop()
        else:
            loop = asyncio.get_running_loop()
            _, conn = await loop.create_connection(lambda: Upstream(self), self.host, self.port)
        conn.waiter = asyncio.get_running_loop().create_future()
        conn.transport.write(b"POST %s HTTP/1.1\r\n%sContent-Length: %d\r\n\r\n%s"  # type: ignore[union-attr]
                             % (path, self.head, len(body), body))
        return await conn.waiter


class Client(asyncio.Protocol):
    def __init__(self, app: BareProxy) -> None:
        self.app = app
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.auth = b""
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()  # type: ignore[union-attr]

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"authorization":
            self.auth = value

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        body, self.body = b"".join(self.body), []
        asyncio.get_running_loop().create_task(self.app.handle(self, self.url, self.auth, body))

    def reply(self, status: int, body: bytes) -> None:
        t = self.transport
        if t is not None and not t.is_closing():
            t.write(b"HTTP/1.1 %d OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                    b"\r\n%s" % (status, len(body), body))


class BareProxy:
    def __init__(self, upstream: str, key: str) -> None:
        self.pool = Pool(upstream)
        self.digests = {hashlib.sha256(key.encode()).digest(): "bench"}
        self.usage: Counter[tuple[str, str]] = Counter()

    async def handle(self, c: Client, url: bytes, auth: bytes, body: bytes) -> None:
        who = self.digests.get(hashlib.sha256(auth[7:]).digest()) if auth[:7] == b"Bearer " else None
        if who is None:
            c.reply(401, b'{"error":"invalid key"}')
            return
        model = orjson.loads(body).get("model", "")
        try:
            status, answer = await self.pool.request(url, body)
        except OSError:
            c.reply(502, b'{"error":"upstream"}')
            return
        if status == 200:
            usage = orjson.loads(answer).get("usage") or {}
            self.usage[(who, model)] += usage.get("total_tokens", 0)
        c.reply(status, answer)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.bare_proxy", description=__doc__)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--upstream", required=True)
    ap.add_argument("--key", required=True)
    a = ap.parse_args()
    import uvloop

    async def run() -> None:
        proxy = BareProxy(a.upstream, a.key)
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: Client(proxy), "127.0.0.1", a.port)
        async with server:
            await server.serve_forever()

    uvloop.run(run())


if __name__ == "__main__":
    main()
