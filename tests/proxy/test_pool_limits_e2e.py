"""``server.upstream_max_connections`` is per upstream: two long streams on model A, with a
limit of 2, don't hold up model B; a third request to A waits ``upstream_pool_wait_s`` at most
and gets 503 ``upstream_busy`` with ``Retry-After``. In-process gateway, two simulators."""

from __future__ import annotations

import asyncio

import httpx
from helpers import settings_for, sim

from fleetgate.app import create_app

TOKEN = "pool-limits-static-token"


def _chat(model: str, stream: bool, tokens: int) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": tokens, "stream": stream}


async def test_long_streams_on_one_model_do_not_block_another(tmp_path):
    with sim("upstream-name", "--ttft-ms", "0", "--tokens-per-s", "10") as slow_url, \
            sim("upstream-name", "--ttft-ms", "0", "--tokens-per-s", "0") as fast_url:
        models = [{"name": name, "served_name": "upstream-name",
                   "backend": {"type": "static", "urls": [url]}}
                  for name, url in (("sim", slow_url), ("other", fast_url))]
        s = settings_for(tmp_path, slow_url, auth={"mode": "static", "tokens": [TOKEN]},
                         server={"upstream_max_connections": 2, "upstream_pool_wait_s": 0.3},
                         models=models)
        app = create_app(s)
        await app.startup()
        headers = {"authorization": f"Bearer {TOKEN}"}
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://gw", headers=headers, timeout=30) as c:
            streams = [asyncio.create_task(c.post("/v1/chat/completions",
                                                  json=_chat("sim", True, 40)))
                       for _ in range(2)]
            try:
                for _ in range(200):  # both of A's connections in use
                    if app.upstream._pool and sum(
                            o.active for o in app.upstream._pool.origins.values()) >= 2:
                        break
                    await asyncio.sleep(0.02)
                r = await c.post("/v1/chat/completions", json=_chat("other", False, 3))
                assert r.status_code == 200, r.text  # model B answered ...
                assert not any(t.done() for t in streams)  # ... while A's streams still run
                busy = await c.post("/v1/chat/completions", json=_chat("sim", False, 3))
                assert busy.status_code == 503, busy.text
                assert busy.json()["error"]["code"] == "upstream_busy"
                assert int(busy.headers["retry-after"]) >= 1
                assert not any(t.done() for t in streams)
            finally:
                done = await asyncio.gather(*streams, return_exceptions=True)
        await app.shutdown()
    assert all(isinstance(d, httpx.Response) and d.status_code == 200 for d in done), done
