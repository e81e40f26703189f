"""The relay: SSE splitting (linear, bounded), usage counted when a client leaves early, and
hostile upstreams seen through the in-process gateway (1xx, odd statuses, spaced JSON)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import orjson
import pytest
from helpers import asgi, settings_for, sim

from fleetgate.app import create_app
from fleetgate.config import ServerSettings
from fleetgate.proxy.client import ClientGone, Upstream
from fleetgate.proxy.relay import EventSplitter, relay_stream
from fleetgate.proxy.usage_tap import UsageTap

MiB = 1024 * 1024
TOKEN = "relay-test-static-token"


class FakeResponse:
    """Just what relay_stream reads: status, chunks, a bound, close()."""

    status = 200

    def __init__(self, chunks: list[bytes], max_event_bytes: int = 8 * MiB) -> None:
        self.chunks = chunks
        self.max_event_bytes = max_event_bytes
        self.closed = False

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        for c in self.chunks:
            yield c

    def close(self) -> None:
        self.closed = True


class Sink:
    def __init__(self) -> None:
        self.messages: list[dict] = []

    async def __call__(self, msg: dict) -> None:
        self.messages.append(msg)

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.messages if "body" in m)


def _tokens(sse: bytes) -> int:
    return sse.count(b'"content":"tok') + sse.count(b'"content":" tok')


def test_a_large_event_in_many_pieces_is_joined_once():
    size, piece = 16 * MiB, 64 * 1024
    s = EventSplitter(64 * MiB)
    data = b"data: " + b"x" * size
    outs = [s.feed(data[i : i + piece]) for i in range(0, len(data), piece)]
    assert not any(outs)
    out = s.feed(b"\n\n")
    assert out == data + b"\n\n"
    # The quadratic version copied the whole buffer on every piece: ~256 x 16 MiB / 2 here.
    assert s.copied <= 2 * len(out)


def test_blank_line_split_across_pieces_still_ends_the_event():
    s = EventSplitter(1024)
    assert s.feed(b"data: 1\n") == b""
    assert s.feed(b"\ndata: 2") == b"data: 1\n\n"
    assert s.rest() == b"data: 2"


@pytest.mark.pure  # a FakeResponse where the compiled relay takes an UpstreamResponse
async def test_crlf_events_stream_one_by_one_as_lf_events():
    """sse-starlette ends lines with CRLF: events must still go out as they complete."""
    ev = b'data: {"choices":[{"delta":{"content":"x"}}]}\r\n\r\n'
    resp = FakeResponse([ev, ev[:-1], ev[-1:] + b"data: [DONE]\r\n\r\n"])
    sent: list[bytes] = []

    async def send(msg: dict) -> None:
        if msg["type"] == "http.response.body":
            sent.append(msg["body"])

    tap = UsageTap(hide_usage_event=False, rewrite=None)
    await relay_stream(resp, asgi(send), tap, ClientGone())  # type: ignore[arg-type]
    lf = ev.replace(b"\r\n", b"\n")
    assert sent == [lf, lf + b"data: [DONE]\n\n", b""]
    assert tap.done and tap.completion_tokens == 2


@pytest.mark.pure  # a FakeResponse where the compiled relay takes an UpstreamResponse
async def test_an_event_past_the_bound_ends_the_stream_with_an_error_event():
    chunks = [b"data: {\"choices\":[]}\n\n"] + [b"y" * 65536] * 40  # 2.5 MiB, no blank line
    resp = FakeResponse(chunks, max_event_bytes=1 * MiB)
    sink = Sink()
    await relay_stream(resp, asgi(sink), UsageTap(hide_usage_event=False, rewrite=None), ClientGone())
    assert resp.closed
    last = sink.body.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
    err = orjson.loads(last.removeprefix(b"data: "))["error"]
    assert err["code"] == "upstream_response_too_large" and err["source"] == "gateway"
    assert sink.messages[-1]["more_body"] is False


async def test_client_leaving_after_20_of_30_tokens_is_billed_for_what_was_relayed():
    """The gateway asks the engine for continuous usage; the client asked for nothing."""
    with sim("m", "--ttft-ms", "0", "--tokens-per-s", "100") as url:
        u = Upstream(ServerSettings())
        await u.start()
        body = orjson.dumps({
            "model": "m", "messages": [{"role": "user", "content": "one two three"}],
            "max_tokens": 30, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        })
        gone = ClientGone()
        resp = await u.open(url + "/v1/chat/completions", body,
                            {"Content-Type": "application/json"}, gone)
        tap = UsageTap(hide_usage_event=True, rewrite=None)
        received: list[bytes] = []

        async def client_send(msg: dict) -> None:
            received.append(msg.get("body", b""))
            if _tokens(b"".join(received)) >= 20:
                gone.fire()  # the client reads 20 tokens and hangs up

        await asyncio.wait_for(relay_stream(resp, asgi(client_send), tap, gone), 30)
        await u.stop()
    seen = b"".join(received)
    relayed = _tokens(seen)
    assert 20 <= relayed < 30
    assert b"usage" not in seen  # the usage the gateway added stays hidden
    assert tap.disconnected
    assert tap.completion_tokens == relayed and tap.prompt_tokens == 3


# -- hostile upstreams through the in-process gateway ---------------------------------------


async def _raw_upstream(handler) -> tuple[asyncio.Server, str]:
    srv = await asyncio.start_server(handler, "127.0.0.1", 0)
    return srv, f"http://127.0.0.1:{srv.sockets[0].getsockname()[1]}"


async def _read_request(r: asyncio.StreamReader) -> bytes:
    head = await r.readuntil(b"\r\n\r\n")
    n = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    return await r.readexactly(n)


def _answer(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
        len(body), body)


@pytest.fixture
async def hostile(tmp_path: Path):
    """An in-process gateway in front of a scripted upstream; yields (client, set_script)."""
    script: dict = {}

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while True:
                req = orjson.loads(await _read_request(r))
                w.write(script["reply"](req))
                await w.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            w.close()

    srv, url = await _raw_upstream(handle)
    app = create_app(settings_for(tmp_path, url, auth={"mode": "static", "tokens": [TOKEN]}))
    await app.startup()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
        c.headers["authorization"] = f"Bearer {TOKEN}"
        yield c, script
    await app.shutdown()
    srv.close()


async def test_early_hints_never_hand_one_users_answer_to_the_next(hostile):
    c, script = hostile

    def reply(req: dict) -> bytes:
        who = req["messages"][0]["content"].encode()
        answer = b'{"model": "upstream-name", "answer": "%s", "choices": []}' % who
        return b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + _answer(answer)

    script["reply"] = reply
    for model, who in (("sim", "alice"), ("other", "bob"), ("sim", "carol")):
        r = await c.post("/v1/chat/completions", json={
            "model": model, "messages": [{"role": "user", "content": who}]})
        assert r.status_code == 200, r.text
        assert r.json()["answer"] == who
        assert r.json()["model"] == model  # "model": "upstream-name" with a space, rewritten
        assert "upstream-name" not in r.text


@pytest.mark.parametrize("status", [b"999", b"042"])
async def test_a_status_the_gateway_cannot_relay_is_a_502_envelope(hostile, status, caplog):
    c, script = hostile
    script["reply"] = lambda req: b"HTTP/1.1 %s Odd\r\nContent-Length: 2\r\n\r\n{}" % status
    r = await c.post("/v1/chat/completions", json={
        "model": "sim", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 502
    assert r.json()["error"]["source"] == "gateway"
    assert "Traceback" not in caplog.text


@pytest.mark.pure  # a FakeResponse where the compiled relay takes an UpstreamResponse
@pytest.mark.parametrize(("leave_after", "disconnected"), [(b"[DONE]", False), (b"tok1", True)])
async def test_a_client_that_hangs_up_after_the_end_did_not_leave_early(
    leave_after: bytes, disconnected: bool
) -> None:
    """The official client closes its connection once it has read ``[DONE]``, which can be
    before the gateway writes the chunked body's terminator: that is a complete answer, not a
    disconnect. Leaving after the first token is one."""
    ev = b'data: {"choices":[{"delta":{"content":"tok%d"}}]}\n\n'

    class Upstream(FakeResponse):
        async def iter_chunks(self) -> AsyncIterator[bytes]:
            for c in self.chunks:
                yield c
                await asyncio.sleep(0)  # waiting for the next bytes, as a real response does

    resp = Upstream([ev % 1, ev % 2, b"data: [DONE]\n\n"])
    gone = ClientGone()

    async def send(msg: dict) -> None:
        if leave_after in msg.get("body", b""):
            # The connection drops once the client has read this: the server's callback runs
            # on a later turn of the loop.
            asyncio.get_running_loop().call_soon(gone.fire)

    tap = UsageTap(hide_usage_event=False, rewrite=None)
    await relay_stream(resp, asgi(send), tap, gone)  # type: ignore[arg-type]
    assert tap.disconnected is disconnected
