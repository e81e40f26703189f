"""Small ASGI helpers shared by the HTTP surfaces: read a bounded body, send JSON and errors."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson

from fleetgate.errors import GatewayError, PayloadTooLarge

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_JSON = (b"content-type", b"application/json")
_GATEWAY = (b"x-fleetgate-source", b"gateway")


def header(scope: Scope, name: bytes) -> bytes | None:
    for k, v in scope["headers"]:
        if k == name:
            return v
    return None


def too_large(limit: int) -> PayloadTooLarge:
    """413 for a body over ``limit``: the one wording, for the server's check and the app's."""
    return PayloadTooLarge(f"Request body is larger than the limit of {limit} bytes.")


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The whole request body, refusing more than ``limit`` bytes (413) before reading it all."""
    declared = header(scope, b"content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise too_large(limit)
        except ValueError:
            pass
    chunks: list[bytes] = []
    size = 0
    while True:
        msg = await receive()
        if msg["type"] != "http.request":
            raise ConnectionAbortedError("client went away while sending the body")
        part = msg.get("body", b"")
        if part:
            size += len(part)
            if size > limit:
                raise too_large(limit)
            chunks.append(part)
        if not msg.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def send_json(
    send: Send,
    status: int,
    payload: object,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    body = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    hs = [_JSON, _GATEWAY, (b"content-length", str(len(body)).encode())]
    if headers:
        hs.extend(headers)
    await send({"type": "http.response.start", "status": status, "headers": hs})
    await send({"type": "http.response.body", "body": body})


async def send_error(send: Send, err: GatewayError) -> None:
    extra = [(k.encode(), v.encode()) for k, v in err.headers.items()]
    await send_json(send, err.status, err.to_bytes(), extra)
