"""The upstream client: one pooled aiohttp session, bytes relayed as they arrive.

Promises:
- the client's headers are never forwarded; the upstream sees only the content type and the
  model's own upstream key;
- a streamed response is relayed one complete SSE event at a time, as it arrives, with no
  re-encoding (see :mod:`fleetgate.proxy.usage_tap`);
- a client disconnect closes the upstream response, so the engine stops generating;
- an upstream failure before the response starts raises a :class:`GatewayError` (502/504); one
  after the stream has started ends the stream with an OpenAI-style error event.
"""

from __future__ import annotations

from typing import Any

import aiohttp

from fleetgate.config import ServerSettings
from fleetgate.errors import GatewayError, UpstreamTimeout, UpstreamUnreachable
from fleetgate.proxy.usage_tap import UsageTap

Send = Any  # ASGI send callable
_PASS_HEADERS = ("content-type", "retry-after", "x-request-id")
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
    (b"x-fleetgate-source", b"upstream"),
]


class ClientGone:
    """Set by the disconnect watcher; closes the upstream response it's pointed at."""

    __slots__ = ("gone", "response")

    def __init__(self) -> None:
        self.gone = False
        self.response: aiohttp.ClientResponse | None = None

    def fire(self) -> None:
        self.gone = True
        if self.response is not None:
            self.response.close()


class Upstream:
    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        s = self.settings
        connector = aiohttp.TCPConnector(
            limit=s.upstream_max_connections, limit_per_host=0, ttl_dns_cache=300
        )
        self.session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(
                total=None,
                connect=s.upstream_connect_timeout_s,
                sock_read=s.upstream_read_timeout_s,
            ),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
        )

    async def stop(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None

    async def open(
        self, url: str, body: bytes, headers: dict[str, str], gone: ClientGone
    ) -> aiohttp.ClientResponse:
        """POST and wait for the status line. Raises a GatewayError if that fails."""
        assert self.session is not None, "Upstream.start() was not awaited"
        try:
            resp = await self.session.post(url, data=body, headers=headers)
        except TimeoutError:
            raise UpstreamTimeout("The model's server did not answer in time.") from None
        except aiohttp.ClientConnectorError:
            raise UpstreamUnreachable("The model's server can't be reached.") from None
        except aiohttp.ClientError:
            raise UpstreamUnreachable("The connection to the model's server failed.") from None
        gone.response = resp
        if gone.gone:
            resp.close()
        return resp


def _headers(resp: aiohttp.ClientResponse, length: int) -> list[tuple[bytes, bytes]]:
    out = [(b"x-fleetgate-source", b"upstream"), (b"content-length", str(length).encode())]
    for name in _PASS_HEADERS:
        v = resp.headers.get(name)
        if v is not None:
            out.append((name.encode(), v.encode("latin-1")))
    return out


async def relay_whole(resp: aiohttp.ClientResponse, send: Send, tap: UsageTap) -> None:
    """A non-streamed answer: read it whole (it's small), note usage, send it."""
    try:
        data = await resp.read()
    except TimeoutError:
        raise UpstreamTimeout("The model's server did not answer in time.") from None
    except aiohttp.ClientError:
        raise UpstreamUnreachable("The model's server broke the connection.") from None
    finally:
        resp.release()
    if resp.status == 200:
        data = tap.body(data)
    elif tap.rewrite is not None:
        data = data.replace(*tap.rewrite)
    await send(
        {"type": "http.response.start", "status": resp.status, "headers": _headers(resp, len(data))}
    )
    await send({"type": "http.response.body", "body": data})


async def relay_stream(
    resp: aiohttp.ClientResponse, send: Send, tap: UsageTap, gone: ClientGone
) -> None:
    """A streamed answer: the response has started once this is called."""
    await send({"type": "http.response.start", "status": resp.status, "headers": _SSE_HEADERS})
    buf = b""
    error: GatewayError | None = None
    try:
        async for chunk in resp.content.iter_any():
            buf += chunk
            end = buf.rfind(b"\n\n")
            if end < 0:
                continue
            out = tap.events(buf[: end + 2])
            buf = buf[end + 2 :]
            if out:
                await send({"type": "http.response.body", "body": out, "more_body": True})
    except TimeoutError:
        error = UpstreamTimeout("The model's server stopped sending mid-stream.")
    except aiohttp.ClientError:
        if not gone.gone:
            error = UpstreamUnreachable("The model's server broke the stream mid-way.")
    finally:
        resp.close()
    if gone.gone:
        return
    if buf.strip():
        out = tap.events(buf + b"\n\n")
        if out:
            await send({"type": "http.response.body", "body": out, "more_body": True})
    if error is None and not tap.done:
        error = UpstreamUnreachable("The model's server ended the stream without finishing it.")
    tail = error.sse_event() if error is not None else b""
    await send({"type": "http.response.body", "body": tail, "more_body": False})
