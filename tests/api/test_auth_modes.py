"""Static-token and no-auth modes, and a models list that requires a key, through the ASGI app."""

from __future__ import annotations

import json

import httpx
from helpers import settings_for

from fleetgate.app import create_app

CHAT = {"model": "sim", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


async def _client(app):
    await app.startup()
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw")


async def test_static_tokens(tmp_path, sim_url):
    app = create_app(settings_for(tmp_path, sim_url, auth={
        "mode": "static", "tokens": ["shared-token-0123456789"], "revocation_poll_s": 1}))
    c = await _client(app)
    try:
        ok = await c.post("/v1/chat/completions", json=CHAT,
                          headers={"Authorization": "Bearer shared-token-0123456789"})
        assert ok.status_code == 200
        bad = await c.post("/v1/chat/completions", json=CHAT,
                           headers={"Authorization": "Bearer shared-token-012345678"})
        assert bad.status_code == 401
        assert "shared-token" not in bad.text
    finally:
        await c.aclose()
        await app.shutdown()


async def test_none_mode_needs_no_key(tmp_path, sim_url):
    app = create_app(settings_for(tmp_path, sim_url, auth={"mode": "none"}))
    await app.startup()
    c = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1:8000")
    try:
        assert (await c.post("/v1/chat/completions", json=CHAT)).status_code == 200
        # What a web page could send: no preflight for text/plain, a foreign Origin, or (with
        # DNS rebinding) a foreign Host. None of it reaches the model.
        before = (await c.get("/v1/models")).status_code
        assert before == 200
        sent = json.dumps(CHAT)
        for headers, status in [
            ({"content-type": "text/plain", "origin": "http://127.0.0.1:8000"}, 415),
            ({"content-type": "application/json", "origin": "http://evil.example"}, 403),
            ({"content-type": "application/json", "host": "evil.example:8000"}, 400),
        ]:
            r = await c.post("/v1/chat/completions", content=sent, headers=headers)
            assert r.status_code == status, r.text
            assert r.headers["x-fleetgate-source"] == "gateway"
    finally:
        await c.aclose()
        await app.shutdown()


async def test_keys_mode_does_not_police_hosts(gw):
    """The Host/Origin guard is for key-less mode only: with keys, the key is the guard."""
    key = gw.key()
    r = await gw.client.post("/v1/chat/completions", json=CHAT,
                             headers={"Authorization": f"Bearer {key}", "origin": "http://x"})
    assert r.status_code == 200


async def test_models_list_can_require_a_key(tmp_path, sim_url):
    app = create_app(settings_for(tmp_path, sim_url, server={"public_models_list": False}))
    c = await _client(app)
    try:
        r = await c.get("/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    finally:
        await c.aclose()
        await app.shutdown()
