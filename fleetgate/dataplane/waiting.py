"""What a request does while it waits for a replica to start, or for a fair-share slot.

(A client going away is noticed by the :class:`~fleetgate.api.exchange.Exchange`, which fires
the request's :class:`~fleetgate.proxy.client.ClientGone`.)

* :func:`wait_for_replica` is cold-start ``wait`` mode. A streaming client gets its SSE head at
  once and a comment every few seconds, so neither it nor a proxy in between times out; the
  comment carries what the launcher says about the wait (a SLURM job's queue reason).
* :class:`AfterHead` is the responder for a response whose SSE head already went out while
  waiting: the relay's own head is dropped, and a non-stream answer (an error) becomes the
  stream's final ``data:`` event, since the status line can no longer change.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

from fleetgate.api.exchange import Responder
from fleetgate.fleet.pool import Pool
from fleetgate.limits.headers import RawHeaders
from fleetgate.proxy.client import ClientGone

T = TypeVar("T")


class AfterHead:
    __slots__ = ("out", "as_event")

    def __init__(self, out: Responder, as_event: bool) -> None:
        self.out = out
        self.as_event = as_event

    async def start(self, status: int, headers: RawHeaders) -> None:
        return None  # the stream's head is out already

    async def write(self, data: bytes, more: bool = False) -> None:
        if self.as_event:
            data = data.strip()
            if data:
                data = b"data: " + data + b"\n\n"
        await self.out.write(data, more)

    async def respond(self, status: int, headers: RawHeaders, body: bytes) -> None:
        await self.write(body)


# The head of a stream the gateway opens itself, before any replica answered.
WAIT_HEAD = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
    (b"x-fleetgate-source", b"gateway"),
]
KEEPALIVE = b": waiting for the model to start\n\n"


QUEUED = "waiting for a free slot on the model"


def keepalive_comment(note: str, what: str = "") -> bytes:
    """One SSE comment line: what the request waits for, and the launcher's note (a queued
    job's reason) when there is one."""
    if not note and not what:
        return KEEPALIVE
    # A comment is one line: no CR/LF may reach the stream from a launcher's text.
    text = what or "waiting for the model to start"
    if note:
        text += f" ({' '.join(note.split())[:300]})"
    return b": " + text.encode("utf-8", "replace") + b"\n\n"


class StreamHead:
    """Whether the gateway already sent a streaming client its SSE head while it waited (for a
    replica, or in the fair-share queue): sent at most once, by whichever wait comes first."""

    __slots__ = ("out", "sent")

    def __init__(self, out: Responder) -> None:
        self.out = out
        self.sent = False

    async def ensure(self) -> None:
        if not self.sent:
            self.sent = True
            await self.out.start(200, WAIT_HEAD)

    async def comment(self, note: str, what: str = "") -> None:
        await self.out.write(keepalive_comment(note, what), True)


async def wait_with_keepalive(
    fut: asyncio.Future[T],
    head: StreamHead | None,
    gone: ClientGone,
    interval_s: float,
    note: Callable[[], str] = lambda: "",
    what: str = "",
) -> T | None:
    """Await ``fut``; a streaming client (``head`` given) gets its SSE head and a comment every
    ``interval_s``. Returns None (and cancels ``fut``) if the client leaves first."""
    if head is not None:
        await head.ensure()
        if what:  # say at once why the answer is late (the cold-start wait says it at its first beat)
            await head.comment(note(), what)
    try:
        while not gone.gone:
            done, _ = await asyncio.wait({fut}, timeout=interval_s)
            if done:
                return fut.result()
            if head is not None:
                await head.comment(note(), what)
        return None
    finally:
        if not fut.done():
            fut.cancel()


async def wait_for_replica(
    pool: Pool, model: str, head: StreamHead | None, gone: ClientGone
) -> None:
    """Return once ``model`` has a routable replica; raises Unavailable on timeout or failure."""
    wait = asyncio.ensure_future(pool.wait_ready(model, pool.wait_timeout(model)))
    await wait_with_keepalive(
        wait, head, gone, pool.keepalive_s(model), lambda: pool.waiting_note(model)
    )
