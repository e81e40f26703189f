"""Property-based fuzzing of the SSE relay and the usage tap (hypothesis, bounded).

However the upstream's bytes are cut into reads, the client gets the same bytes and the same
usage is recorded; the internal model name and usage the gateway added never reach the client;
arbitrary bytes never crash the relay.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import orjson
import pytest
from helpers import asgi
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleetgate.proxy.client import ClientGone
from fleetgate.proxy.relay import relay_stream
from fleetgate.proxy.usage_tap import UsageTap

# A FakeResponse where the compiled relay takes an UpstreamResponse: pure-Python build only.
pytestmark = pytest.mark.pure

FUZZ = settings(max_examples=150, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])


class Chunks:
    status = 200
    max_event_bytes = 1 << 20

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        for c in self.chunks:
            yield c

    def close(self) -> None:
        pass


def _run(chunks: list[bytes], hide: bool, strip: bool | None = None) -> tuple[bytes, int, int, bool]:
    out: list[bytes] = []

    async def send(msg: dict) -> None:
        out.append(msg.get("body", b""))

    tap = UsageTap(hide_usage_event=hide, strip_chunk_usage=strip,
                   rewrite=(b'"model":"up"', b'"model":"pub"'))
    asyncio.run(relay_stream(Chunks(chunks), asgi(send), tap, ClientGone()))  # type: ignore[arg-type]
    return b"".join(out), tap.prompt_tokens, tap.completion_tokens, tap.done


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for p in [*points, len(data)]:
        if p > last:
            pieces.append(data[last:p])
            last = p
    return pieces


SPACES = st.sampled_from(["", " ", "  ", "\n"])


@st.composite
def events(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["token", "token_usage", "role", "final", "usage", "comment"]))
    sp = draw(SPACES)
    model = f'"model":{sp}"up"'
    n = draw(st.integers(0, 500))
    text = draw(st.text(alphabet="ab \"\\{}usage:,", max_size=12))
    content = text.replace("\\", "\\\\").replace('"', '\\"')
    usage = f',"usage":{{"prompt_tokens":5,"completion_tokens":{n},"total_tokens":{n + 5}}}'
    if kind == "comment":
        return b": keep-alive\n\n"
    if kind == "role":
        body = f'{{"id":"x",{model},"choices":[{{"index":0,"delta":{{"role":"assistant","content":""}}}}]}}'
    elif kind == "final":
        body = f'{{"id":"x",{model},"choices":[{{"index":0,"delta":{{}},"finish_reason":"stop"}}]}}'
    elif kind == "usage":
        body = f'{{"id":"x",{model},"choices":[]{usage}}}'
    else:
        u = usage if kind == "token_usage" else ""
        body = (f'{{"id":"x",{model},"choices":[{{"index":0,"delta":{{"content":"{content}"}},'
                f'"finish_reason":null}}]{u}}}')
    return f"data: {body}\n\n".encode()


@FUZZ
@given(st.lists(events(), max_size=25), st.lists(st.integers(0, 10_000), max_size=30),
       st.booleans(), st.booleans(), st.sampled_from([None, True, False]))
def test_any_chunking_relays_the_same_bytes_and_usage(evs, cuts, hide, done, strip):
    stream = b"".join(evs) + (b"data: [DONE]\n\n" if done else b"")
    whole = _run([stream] if stream else [], hide, strip)
    pieces = _run(_split(stream, cuts), hide, strip)
    assert pieces == whole
    # The same stream with CRLF line ends (sse-starlette's) relays as the LF one does.
    crlf = stream.replace(b"\n", b"\r\n")
    assert _run(_split(crlf, cuts), hide, strip) == whole
    body = whole[0]
    assert b'"up"' not in body  # the internal name never reaches the client
    if hide and strip is not False:  # the client asked for no usage: no event carries any
        for ev in body.split(b"\n\n"):
            if ev.startswith(b"data: {"):
                assert "usage" not in orjson.loads(ev[6:])


@FUZZ
@given(st.binary(max_size=2000), st.lists(st.integers(0, 10_000), max_size=30))
def test_arbitrary_bytes_never_crash_and_chunking_never_matters(data, cuts):
    assert _run(_split(data, cuts), True) == _run([data] if data else [], True)
