"""Static-token and no-auth modes, and a models list that requires a key, through the ASGI app."""

from __future__ import annotations

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
    c = await _client(app)
    try:
        assert (await c.post("/v1/chat/completions", json=CHAT)).status_code == 200
    finally:
        await c.aclose()
        await app.shutdown()


async def test_models_list_can_require_a_key(tmp_path, sim_url):
    app = create_app(settings_for(tmp_path, sim_url, server={"public_models_list": False}))
    c = await _client(app)
    try:
        r = await c.get("/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    finally:
        await c.aclose()
        await app.shutdown()
