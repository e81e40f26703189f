"""What a client sees when the upstream misbehaves: 502, 504, passthrough, mid-stream errors."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from helpers import free_port, settings_for, sim

from fleetgate.app import create_app

CHAT = {"model": "sim", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


async def _gateway(tmp_path: Path, upstream: str, **over):
    app = create_app(settings_for(tmp_path, upstream, **over))
    await app.startup()
    return app


async def _post(app, body, key=None, **kw):
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
        from helpers import GW

        key = key or GW(app, c).key()
        return await c.post("/v1/chat/completions", json=body,
                            headers={"Authorization": f"Bearer {key}"}, **kw)


async def test_unreachable_upstream_is_502(tmp_path):
    app = await _gateway(tmp_path, f"http://127.0.0.1:{free_port()}")
    try:
        r = await _post(app, CHAT)
        assert r.status_code == 502
        assert r.json()["error"]["code"] == "upstream_unreachable"
        assert r.json()["error"]["source"] == "gateway"
    finally:
        await app.shutdown()


async def test_slow_upstream_is_504(tmp_path):
    with sim("upstream-name", "--ttft-ms", "3000", "--api-key", "upstream-secret-key") as url:
        app = await _gateway(tmp_path, url, server={"upstream_read_timeout_s": 0.3})
        try:
            r = await _post(app, CHAT)
            assert r.status_code == 504
            assert r.json()["error"]["code"] == "upstream_timeout"
        finally:
            await app.shutdown()


async def test_upstream_errors_pass_through_with_their_status(tmp_path):
    # The upstream wants a key the gateway doesn't have: its 401 comes back, marked upstream.
    with sim("upstream-name", "--api-key", "something-else-entirely") as url:
        app = await _gateway(tmp_path, url)
        try:
            r = await _post(app, CHAT)
            assert r.status_code == 401
            assert r.headers["x-fleetgate-source"] == "upstream"
            assert "source" not in r.json()["error"]
        finally:
            await app.shutdown()


@pytest.mark.parametrize("include_usage", [True, False])
async def test_stream_cut_mid_way_ends_with_an_error_event(tmp_path, include_usage):
    with sim("upstream-name", "--ttft-ms", "0", "--tokens-per-s", "0",
             "--fail-mid-stream-after", "3", "--api-key", "upstream-secret-key") as url:
        app = await _gateway(tmp_path, url)
        try:
            body = {**CHAT, "stream": True, "max_tokens": 20}
            if include_usage:
                body["stream_options"] = {"include_usage": True}
            r = await _post(app, body)
            assert r.status_code == 200
            events = [e for e in r.text.split("\n\n") if e.strip()]
            assert len(events) >= 2
            assert '"error"' in events[-1] and '"source":"gateway"' in events[-1]
            assert "[DONE]" not in r.text
        finally:
            await app.shutdown()


async def test_a_bad_answer_is_not_sent_again_to_another_replica(tmp_path):
    """A replica that answered, badly (status 999), did the work: the request is a 502 and is
    not retried elsewhere, unlike a connection that failed before any byte came back."""
    import asyncio

    seen: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if head.startswith(b"GET /health"):  # the health probe: ready
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}")
        else:
            seen.append(1)
            writer.write(b"HTTP/1.1 999 Odd\r\ncontent-length: 2\r\n\r\n{}")
        await writer.drain()
        writer.close()

    servers = [await asyncio.start_server(handle, "127.0.0.1", 0) for _ in range(2)]
    urls = [f"http://127.0.0.1:{s.sockets[0].getsockname()[1]}" for s in servers]
    app = await _gateway(tmp_path, urls[0])
    doc = app.settings.model_dump(mode="json", exclude_none=True)
    await app.shutdown()
    doc["models"][0]["backend"]["urls"] = urls
    from fleetgate import config

    app = create_app(config.parse(doc))
    await app.startup()
    try:
        r = await _post(app, CHAT)
        assert r.status_code == 502
        assert r.json()["error"]["code"] == "upstream_bad_response"
        assert len(seen) == 1
    finally:
        await app.shutdown()
        for s in servers:
            s.close()
