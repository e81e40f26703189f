"""Auth and routing edge cases, driven in-process through httpx's ASGI transport.

The upstream is a real `fleetgate sim` process that requires its own key, so a request that
reached it without the gateway's say-so would show up in its /sim/stats counters.
"""

from __future__ import annotations

import datetime as dt

import httpx
import pytest

from fleetgate.store import repo

CHAT = {"model": "sim", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 3}


async def stats(sim_url: str) -> dict:
    async with httpx.AsyncClient() as c:
        return (await c.get(f"{sim_url}/sim/stats")).json()


def assert_error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"}
    assert err["source"] == "gateway"
    assert r.headers["x-fleetgate-source"] == "gateway"
    if code is not None:
        assert err["code"] == code
    return err


@pytest.mark.parametrize(
    "headers, code",
    [
        ({}, "missing_api_key"),
        ({"Authorization": ""}, "missing_api_key"),
        ({"Authorization": "Bearer"}, "invalid_api_key"),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, "invalid_api_key"),
        ({"Authorization": "Bearer fg-not-a-real-key"}, "invalid_api_key"),
        ({"Authorization": "Bearer fg-" + "A" * 43}, "invalid_api_key"),
        ({"Authorization": "Bearer a b"}, "invalid_api_key"),
        ({"Authorization": "Token fg-" + "A" * 43}, "invalid_api_key"),
        ({"X-Api-Key": "fg-" + "A" * 43}, "missing_api_key"),
    ],
)
async def test_bad_keys_get_401_and_never_reach_upstream(gw, sim_url, headers, code):
    before = (await stats(sim_url))["requests_total"]
    r = await gw.client.post("/v1/chat/completions", json=CHAT, headers=headers)
    assert_error(r, 401, code)
    assert (await stats(sim_url))["requests_total"] == before


async def test_error_message_names_no_more_than_the_prefix(gw):
    secret = "fg-" + "Q" * 43
    r = await gw.client.post("/v1/chat/completions", json=CHAT,
                             headers={"Authorization": f"Bearer {secret}"})
    err = assert_error(r, 401, "invalid_api_key")
    assert "Q" * 10 not in r.text
    assert "fg-QQQQQQ" in err["message"]


async def test_valid_key_works_and_lower_case_bearer_is_accepted(gw):
    key = gw.key()
    for scheme in ("Bearer", "bearer", "BEARER"):
        r = await gw.client.post("/v1/chat/completions", json=CHAT,
                                 headers={"Authorization": f"{scheme} {key}"})
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "sim"  # the upstream's served name is rewritten back
        assert r.headers["x-fleetgate-source"] == "upstream"


async def test_upstream_gets_its_own_key_never_the_clients(gw, sim_url):
    key = gw.key()
    r = await gw.client.post("/v1/chat/completions", json=CHAT,
                             headers={"Authorization": f"Bearer {key}", "X-Secret": "nope"})
    assert r.status_code == 200
    async with httpx.AsyncClient() as c:
        last = (await c.get(f"{sim_url}/sim/last-request")).json()
    assert last["headers"]["authorization"] == "Bearer upstream-secret-key"
    assert key not in str(last)
    assert "x-secret" not in last["headers"]
    assert last["body"]["model"] == "upstream-name"
    assert last["body"]["messages"] == CHAT["messages"]


async def test_expired_key_is_refused(gw):
    key = gw.key(expires_at=repo.utcnow() - dt.timedelta(seconds=1))
    r = await gw.client.post("/v1/chat/completions", json=CHAT,
                             headers={"Authorization": f"Bearer {key}"})
    assert_error(r, 401, "expired_api_key")


async def test_revoked_key_is_refused_promptly_even_when_cached(gw):
    import asyncio

    key = gw.key()
    h = {"Authorization": f"Bearer {key}"}
    assert (await gw.client.post("/v1/chat/completions", json=CHAT, headers=h)).status_code == 200
    rec = repo.get_key_by_digest(gw.app.engine, __import__("fleetgate.auth.keys").auth.keys.digest(key))
    assert repo.revoke_key(gw.app.engine, rec.id)
    # revocation_poll_s is 0.2 in these tests; allow a few polls.
    for _ in range(40):
        r = await gw.client.post("/v1/chat/completions", json=CHAT, headers=h)
        if r.status_code == 401:
            break
        await asyncio.sleep(0.1)
    assert_error(r, 401, "invalid_api_key")


async def test_model_outside_the_allow_list_is_403(gw, sim_url):
    key = gw.key(models=["other"])
    before = (await stats(sim_url))["requests_total"]
    r = await gw.client.post("/v1/chat/completions", json=CHAT,
                             headers={"Authorization": f"Bearer {key}"})
    assert_error(r, 403, "model_not_allowed")
    assert (await stats(sim_url))["requests_total"] == before
    ok = await gw.client.post("/v1/chat/completions", json={**CHAT, "model": "other"},
                              headers={"Authorization": f"Bearer {key}"})
    assert ok.status_code == 200


async def test_unknown_model_is_404(gw):
    key = gw.key()
    r = await gw.client.post("/v1/chat/completions", json={**CHAT, "model": "nope"},
                             headers={"Authorization": f"Bearer {key}"})
    err = assert_error(r, 404, "model_not_found")
    assert err["param"] == "model"


@pytest.mark.parametrize(
    "path",
    [
        "//v1/chat/completions",
        "/v1/../admin",
        "/v1/chat/completions/",
        "/V1/chat/completions",
        "/v1/chat/completions%00",
        "/admin",
        "/tokenize",
        "/invocations",
        "/metrics",
        "/v1/chat/completions;x",
    ],
)
async def test_path_tricks_are_404_and_never_proxied(gw, sim_url, path):
    key = gw.key()
    before = (await stats(sim_url))["requests_total"]
    r = await gw.client.post(path, json=CHAT, headers={"Authorization": f"Bearer {key}"})
    assert r.status_code in (404, 405), (path, r.status_code)
    assert r.json()["error"]["source"] == "gateway"
    assert (await stats(sim_url))["requests_total"] == before


@pytest.mark.parametrize("host", ["evil.example", "", "localhost:1", "gw\r\nx: y"])
async def test_odd_host_headers_change_nothing(gw, host):
    r = await gw.client.post("/v1/chat/completions", json=CHAT, headers={"Host": host})
    assert_error(r, 401)


async def test_wrong_method_is_405_with_allow(gw):
    r = await gw.client.get("/v1/chat/completions")
    assert_error(r, 405, "method_not_allowed")
    assert r.headers["allow"] == "POST"  # RFC 9110 requires it
    r = await gw.client.delete("/v1/models")
    assert_error(r, 405)
    assert r.headers["allow"] == "GET"


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("depth", [254, 600, 1000])
async def test_deeply_nested_json_is_400_not_500(gw, sim_url, stream, depth):
    """'sim' is renamed upstream, so the body is re-serialised: orjson writes only 254 levels."""
    key = gw.key()
    before = (await stats(sim_url))["requests_total"]
    body = (b'{"model": "sim", "stream": ' + (b"true" if stream else b"false")
            + b', "prompt": ' + b"[" * depth + b"]" * depth + b"}")
    r = await gw.client.post("/v1/completions", content=body,
                             headers={"Authorization": f"Bearer {key}"})
    assert_error(r, 400, "invalid_json")
    assert (await stats(sim_url))["requests_total"] == before


async def test_oversize_body_is_413_before_auth_work_reaches_upstream(gw, sim_url):
    key = gw.key()
    before = (await stats(sim_url))["requests_total"]
    big = {"model": "sim", "messages": [{"role": "user", "content": "x" * 100_000}]}
    r = await gw.client.post("/v1/chat/completions", json=big,
                             headers={"Authorization": f"Bearer {key}"})
    assert_error(r, 413, "request_too_large")
    assert (await stats(sim_url))["requests_total"] == before


@pytest.mark.parametrize(
    "body, code",
    [
        (b"", "invalid_request"),
        (b"not json", "invalid_json"),
        (b"[1,2]", "invalid_json"),
        (b'{"messages": []}', "missing_model"),
        (b'{"model": 5}', "missing_model"),
        (b'{"model": "sim", "stream": "yes"}', "invalid_request"),
        (b'{"model": "sim", "max_tokens": -1}', "invalid_request"),
        (b'{"model": "sim", "n": 0}', "invalid_request"),
        (b'{"model": "sim", "stream_options": 3}', "invalid_request"),
    ],
)
async def test_bad_bodies_are_400(gw, body, code):
    key = gw.key()
    r = await gw.client.post("/v1/chat/completions", content=body,
                             headers={"Authorization": f"Bearer {key}"})
    assert_error(r, 400, code)


async def test_bad_body_without_key_is_401_not_400(gw):
    r = await gw.client.post("/v1/chat/completions", content=b"junk")
    assert_error(r, 401)


async def test_models_list_is_public_and_filtered_by_key(gw):
    r = await gw.client.get("/v1/models")
    assert r.status_code == 200
    assert [m["id"] for m in r.json()["data"]] == ["sim", "other"]
    key = gw.key(models=["other"])
    r = await gw.client.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
    assert [m["id"] for m in r.json()["data"]] == ["other"]
    r = await gw.client.get("/v1/models", headers={"Authorization": "Bearer wrong"})
    assert_error(r, 401)


async def test_health_and_ready(gw):
    assert (await gw.client.get("/health")).json() == {"status": "ok"}
    assert (await gw.client.get("/ready")).status_code == 200
