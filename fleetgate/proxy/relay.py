"""Relaying an upstream response to the ASGI client, as it arrives.

Promises:
- a streamed response is relayed one complete SSE event at a time, as it arrives, with no
  re-encoding (see :mod:`fleetgate.proxy.usage_tap`);
- a non-streamed one is read whole (it is small), its usage noted, and sent;
- an upstream failure after the stream has started ends the stream with an OpenAI-style error
  event; before that it raises a :class:`GatewayError` for the one error handler.
"""

from __future__ import annotations

from typing import Any

from fleetgate.errors import GatewayError, UpstreamTimeout, UpstreamUnreachable
from fleetgate.proxy.client import ClientGone, UpstreamClosed, UpstreamResponse
from fleetgate.proxy.usage_tap import UsageTap

Send = Any  # ASGI send callable
SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
    (b"x-fleetgate-source", b"upstream"),
]


def _headers(resp: UpstreamResponse, length: int) -> list[tuple[bytes, bytes]]:
    out = [(b"x-fleetgate-source", b"upstream"), (b"content-length", str(length).encode())]
    for name, v in resp.headers.items():
        out.append((name.encode(), v.encode("latin-1")))
    return out


async def relay_whole(resp: UpstreamResponse, send: Send, tap: UsageTap) -> None:
    """A non-streamed answer: read it whole (it's small), note usage, send it."""
    try:
        data = await resp.read()
    except TimeoutError:
        raise UpstreamTimeout("The model's server did not answer in time.") from None
    except UpstreamClosed:
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


async def relay_stream(resp: UpstreamResponse, send: Send, tap: UsageTap, gone: ClientGone) -> None:
    """A streamed answer: the response has started once this is called."""
    await send({"type": "http.response.start", "status": resp.status, "headers": SSE_HEADERS})
    buf = b""
    error: GatewayError | None = None
    try:
        async for chunk in resp.iter_chunks():
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
    except UpstreamClosed:
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
