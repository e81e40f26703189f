"""One request and its response, as the data plane sees them: :class:`Exchange`.

The pipeline reads the body, starts the response, writes it, and wants to hear when the client
leaves. It does that through this small interface rather than ASGI's ``receive``/``send``
messages, so that FleetGate's own server (:mod:`fleetgate.server.protocol`) can serve it natively:
its per-request object implements :class:`Exchange` itself (no message dicts, no wrapper per
added header, no timer or task to watch for a disconnect; the server calls back when the
connection drops). Any other ASGI server gets :class:`AsgiExchange`, the same interface over
``receive`` and ``send``.

The server offers its native exchange in the scope under :data:`EXCHANGE`; :func:`exchange`
returns it, or the ASGI adapter.

Promises, for both:

* :meth:`Exchange.body` returns the whole body, refusing more than ``limit`` bytes with 413
  before reading it all, and raises ``ConnectionAbortedError`` if the client left first;
* :attr:`Exchange.extra_head` (header lines, ``name: value\\r\\n`` each, already valid) is added to
  the response head when it starts: the rate-limit headers, formatted once;
* :meth:`Exchange.on_gone` registers the one callback to run if the client goes away before the
  response is complete (``None`` unregisters it); a client already gone calls it at once;
* once the client is gone, writes are dropped, never raised, so the caller can finish its
  bookkeeping.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from fleetgate.api.asgi import Receive, Scope, Send, read_body
from fleetgate.limits.headers import RawHeaders, head_pairs

EXCHANGE = "fleetgate.exchange"
"""The scope key under which FleetGate's own server offers its native :class:`Exchange`."""


class Responder(Protocol):
    """What the relay needs: start the response, then write its body; or send a whole one."""

    async def start(self, status: int, headers: RawHeaders) -> None: ...

    async def write(self, data: bytes, more: bool = False) -> None: ...

    async def respond(self, status: int, headers: RawHeaders, body: bytes) -> None: ...


class Exchange(Responder, Protocol):
    extra_head: bytes

    async def body(self, limit: int) -> bytes: ...

    def on_gone(self, fire: Callable[[], None] | None) -> None: ...


class NativeExchange(Exchange, Protocol):
    """FleetGate's own server's exchange, which the express path (``Pipeline.express``) drives
    from callbacks, without a task: the body and the answer without awaiting, and a way to go
    on in a task when a step must wait."""

    scope: Scope
    send: Send

    def body_now(self, limit: int) -> bytes: ...

    def respond_now(self, status: int, headers: RawHeaders, body: bytes) -> None: ...

    def resume(self, work: Coroutine[Any, Any, None]) -> None: ...

    def abort(self) -> None: ...


def exchange(scope: Scope, receive: Receive, send: Send) -> Exchange:
    """The server's native exchange when it offers one, else the ASGI adapter."""
    native: Exchange | None = scope.get(EXCHANGE)
    return native if native is not None else AsgiExchange(scope, receive, send)


class AsgiExchange:
    """:class:`Exchange` over ASGI ``receive`` and ``send`` (uvicorn, test transports).

    A client going away is seen only by reading ``receive`` until ``http.disconnect``, which
    needs a task. It is started lazily: most requests finish within ``watch_delay_s``, and for
    them no task is ever created (a task per request cost about a tenth of the gateway's CPU).
    """

    __slots__ = ("scope", "receive", "send", "extra_head", "_fire", "_timer", "_task")

    def __init__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.scope = scope
        self.receive = receive
        self.send = send
        self.extra_head = b""
        self._fire: Callable[[], None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None

    async def body(self, limit: int) -> bytes:
        return await read_body(self.scope, self.receive, limit)

    async def start(self, status: int, headers: RawHeaders) -> None:
        msg: dict[str, Any] = {"type": "http.response.start", "status": status, "headers": headers}
        if self.extra_head:
            msg["headers"] = [*headers, *head_pairs(self.extra_head)]
        await self.send(msg)

    async def write(self, data: bytes, more: bool = False) -> None:
        await self.send({"type": "http.response.body", "body": data, "more_body": more})

    async def respond(self, status: int, headers: RawHeaders, body: bytes) -> None:
        await self.start(status, headers)
        await self.write(body)

    def on_gone(self, fire: Callable[[], None] | None, watch_delay_s: float = 0.25) -> None:
        self._fire = fire
        if fire is None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if self._task is not None:
                self._task.cancel()
                self._task = None
        elif self._timer is None and self._task is None:
            self._timer = asyncio.get_running_loop().call_later(watch_delay_s, self._watch)

    def _watch(self) -> None:
        self._timer = None
        if self._fire is not None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            msg = await self.receive()
            if msg["type"] == "http.disconnect":
                fire = self._fire
                if fire is not None:
                    fire()
                return
