"""Relaying an upstream response to the client (a :class:`~fleetgate.api.exchange.Responder`),
as it arrives.

Promises:
- a streamed response is relayed in batches of complete SSE events, as they arrive, with no
  re-encoding (see :mod:`fleetgate.proxy.usage_tap`), except that CRLF line ends become LF (the
  same events; the tap reads LF). Splitting the byte stream into events is linear in its size:
  each chunk is searched once, and a partial event is joined once, when it completes
  (:class:`EventSplitter`);
- one SSE event may be at most ``server.max_sse_event_bytes``; a bigger one ends the stream with
  an ``upstream_response_too_large`` error event and closes the upstream connection;
- a non-streamed one is read whole, up to ``server.max_upstream_response_bytes`` (a bigger one is
  a 502 ``upstream_response_too_large``), its usage noted, and sent;
- an upstream failure after the stream has started ends the stream with an OpenAI-style error
  event; before that it raises a :class:`GatewayError` for the one error handler;
- :attr:`UsageTap.disconnected` tells the accounting that the client left before the end
  (before the stream's ``[DONE]`` was written to it);
  :attr:`UsageTap.first_byte_at` when the first byte of the upstream's answer was sent on (time
  to first token).
"""

from __future__ import annotations

import time

from fleetgate.api.exchange import NativeExchange, Responder
from fleetgate.errors import GatewayError, UpstreamTimeout, UpstreamUnreachable
from fleetgate.proxy.client import ClientGone, ResponseTooLarge, UpstreamClosed, UpstreamResponse
from fleetgate.proxy.usage_tap import UsageTap

SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
    (b"x-fleetgate-source", b"upstream"),
]


class EventTooLarge(Exception):
    """An SSE event grew past the bound without ending."""


def _last_blank_line_end(data: bytes) -> int:
    """Just past the last blank line ("\n\n", or "\r\n\r\n": its end is "\n\r\n"); -1 if none."""
    lf = data.rfind(b"\n\n")
    crlf = data.rfind(b"\n\r\n")
    if lf < 0 and crlf < 0:
        return -1
    return max(lf + 2 if lf >= 0 else -1, crlf + 3 if crlf >= 0 else -1)


class EventSplitter:
    """Cuts a byte stream into runs of complete SSE events (each ending in a blank line, LF or
    CRLF, wherever the stream was cut into pieces).

    :meth:`feed` returns every complete event the bytes so far finish, as one ``bytes``, and
    keeps the partial tail. The tail is kept as a list of pieces and joined once, when its
    event completes, so an event arriving in N pieces costs O(size), not O(N * size).
    ``copied`` counts the bytes joined, for the test that proves it.
    """

    __slots__ = ("max_event", "_parts", "_size", "copied")

    def __init__(self, max_event: int) -> None:
        self.max_event = max_event
        self._parts: list[bytes] = []
        self._size = 0
        self.copied = 0

    def feed(self, chunk: bytes) -> bytes:
        cut = _last_blank_line_end(chunk)
        if cut < 0 and self._parts:
            cut = self._straddle(chunk)
        if cut < 0:
            self._keep(chunk)
            return b""
        if self._parts:
            self._parts.append(chunk[:cut])
            out = b"".join(self._parts)
            self.copied += len(out)
            self._parts = []
            self._size = 0
        else:
            out = chunk[:cut] if cut < len(chunk) else chunk
        if cut < len(chunk):
            self._keep(chunk[cut:])
        return out

    def _straddle(self, chunk: bytes) -> int:
        """Where in ``chunk`` a blank line that began in the kept tail ends, or -1."""
        tail = b""
        for piece in reversed(self._parts):  # the kept tail's last bytes, however it was cut
            tail = piece[-3:] + tail
            if len(tail) >= 3:
                break
        tail = tail[-3:]
        end = _last_blank_line_end(tail + chunk[:3])
        return end - len(tail) if end > len(tail) else -1

    def _keep(self, piece: bytes) -> None:
        self._size += len(piece)
        if self._size > self.max_event:
            self._parts = []
            self._size = 0
            raise EventTooLarge(f"an SSE event grew past {self.max_event} bytes")
        self._parts.append(piece)

    def rest(self) -> bytes:
        """Whatever partial event is left when the stream ends."""
        out = b"".join(self._parts)
        self._parts = []
        self._size = 0
        return out


def _headers(resp: UpstreamResponse, length: int) -> list[tuple[bytes, bytes]]:
    out = [(b"x-fleetgate-source", b"upstream"), (b"content-length", str(length).encode())]
    for name, v in resp.headers.items():
        out.append((name.encode(), v.encode("latin-1")))
    return out


def _too_large(what: str) -> UpstreamUnreachable:
    return UpstreamUnreachable(
        f"The model's server sent {what}; the gateway does not relay it.",
        code="upstream_response_too_large",
    )


async def relay_whole(resp: UpstreamResponse, out: Responder, tap: UsageTap) -> None:
    """A non-streamed answer: read it whole (bounded), note usage, send it."""
    try:
        data = await resp.read()
    except TimeoutError:
        raise UpstreamTimeout("The model's server did not answer in time.") from None
    except UpstreamClosed:
        raise UpstreamUnreachable("The model's server broke the connection.") from None
    except ResponseTooLarge:
        raise _too_large("a response larger than server.max_upstream_response_bytes") from None
    finally:
        resp.release()
    await out.respond(*_answer(resp, data, tap))


def finish_whole(resp: UpstreamResponse, out: NativeExchange, tap: UsageTap) -> None:
    """:func:`relay_whole` for an answer already whole (:meth:`UpstreamResponse.complete_whole`),
    sent at once."""
    try:
        data = resp.read_now()
    finally:
        resp.release()
    out.respond_now(*_answer(resp, data, tap))


def _answer(
    resp: UpstreamResponse, data: bytes, tap: UsageTap
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """A whole answer as the client gets it (its usage noted, the model renamed): status,
    headers, body."""
    data = tap.body(data) if resp.status == 200 else tap.apply_rewrite(data)
    tap.first_byte_at = time.monotonic()
    return resp.status, _headers(resp, len(data)), data


async def relay_stream(
    resp: UpstreamResponse, out: Responder, tap: UsageTap, gone: ClientGone
) -> None:
    """A streamed answer: the response has started once this is called."""
    await out.start(resp.status, SSE_HEADERS)
    split = EventSplitter(resp.max_event_bytes)
    error: GatewayError | None = None
    # Whether the stream's end ([DONE]) was written while the client was still there: a client
    # that hangs up after reading it (the official client does, before the chunked body's
    # terminator) got the whole answer and did not disconnect early.
    ended = False
    try:
        async for chunk in resp.iter_chunks():
            events = split.feed(chunk)
            if not events:
                continue
            if b"\r" in events:  # CRLF line ends (sse-starlette's): the same events with LF
                events = events.replace(b"\r\n", b"\n")
            relayed = tap.events(events)
            if relayed:
                if tap.first_byte_at is None:
                    tap.first_byte_at = time.monotonic()
                await out.write(relayed, True)
                ended = tap.done and not gone.gone
    except TimeoutError:
        error = UpstreamTimeout("The model's server stopped sending mid-stream.")
    except UpstreamClosed:
        if not gone.gone:
            error = UpstreamUnreachable("The model's server broke the stream mid-way.")
    except EventTooLarge:
        error = _too_large("an SSE event larger than server.max_sse_event_bytes")
    finally:
        resp.close()
    if gone.gone:
        tap.disconnected = not ended
        return
    rest = split.rest().replace(b"\r\n", b"\n")
    if error is None and rest.strip():
        relayed = tap.events(rest + b"\n\n")
        if relayed:
            await out.write(relayed, True)
    if error is None and not tap.done:
        error = UpstreamUnreachable("The model's server ended the stream without finishing it.")
    tail = error.sse_event() if error is not None else b""
    await out.write(tail)
