"""Property-based fuzzing of the request parsing (hypothesis, bounded): whatever bytes arrive,
in whatever pieces, the connection answers only with well-formed HTTP/1.1 responses (or closes),
never raises, and the app only ever sees requests whose framing the parser accepted."""

from __future__ import annotations

import asyncio

import httptools
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_helpers import Recording, Seen, make_app

from fleetgate.server.options import ServerOptions
from fleetgate.server.protocol import HttpProtocol
from fleetgate.server.server import ServerState

METHODS = st.sampled_from([b"GET", b"POST", b"HEAD", b"PUT", b"PRI", b"G\x00T", b""])
TARGETS = st.sampled_from([b"/echo", b"/echo?a=1", b"/e%20cho", b"*", b"http://h/echo",
                           b"/echo#f", b"/\xff", b"", b"/a b"])
VERSIONS = st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/0.9", b"HTTP/1.1x",
                            b"ICE/1.0", b""])
NAMES = st.sampled_from([b"Host", b"Content-Length", b"Transfer-Encoding", b"Expect",
                         b"Connection", b"X-A", b"Bad Name", b"X-\r\n", b""])
VALUES = st.one_of(st.sampled_from([b"5", b"0", b"-1", b"5, 5", b"chunked", b"gzip, chunked",
                                    b"100-continue", b"close", b"keep-alive", b"99999999999"]),
                   st.binary(max_size=20))


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    line = draw(METHODS) + b" " + draw(TARGETS) + b" " + draw(VERSIONS) + b"\r\n"
    headers = b"".join(draw(NAMES) + b": " + draw(VALUES) + b"\r\n"
                       for _ in range(draw(st.integers(0, 4))))
    body = draw(st.one_of(st.binary(max_size=30),
                          st.just(b"5\r\nhello\r\n0\r\n\r\n"), st.just(b"hello")))
    return line + headers + b"\r\n" + body


def pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, last = [], 0
    for p in points:
        out.append(data[last:p])
        last = p
    out.append(data[last:])
    return [p for p in out if p]


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(stream=st.one_of(st.binary(max_size=200),
                        st.lists(requests(), min_size=1, max_size=3).map(b"".join)),
       cuts=st.lists(st.integers(0, 400), max_size=4))
async def test_any_bytes_get_well_formed_answers_or_a_close(stream: bytes, cuts: list[int]) -> None:
    seen = Seen()
    state = ServerState(make_app(seen), ServerOptions(max_body_bytes=1000, max_header_bytes=2048,
                                                      max_headers=8),
                        asyncio.get_running_loop())
    proto = HttpProtocol(state)
    t = Recording()
    proto.connection_made(t)
    for piece in pieces(stream, cuts):
        proto.data_received(piece)  # must never raise
        await asyncio.sleep(0)
    for _ in range(5):
        await asyncio.sleep(0)
    proto.connection_lost(None)
    await asyncio.sleep(0)
    out = b"".join(t.writes)
    assert out == b"" or out.startswith(b"HTTP/1.1 "), out[:80]
    if b"HEAD" not in stream:  # a HEAD answer's Content-Length describes no body
        statuses: list[int] = []

        class Collect:
            def on_headers_complete(self) -> None:
                statuses.append(parser.get_status_code())

        parser = httptools.HttpResponseParser(Collect())
        parser.feed_data(out)  # raises on anything malformed
        assert all(100 <= s <= 599 for s in statuses)
    assert len(seen.requests) <= stream.count(b"\r\n\r\n")
