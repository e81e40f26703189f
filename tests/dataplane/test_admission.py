"""The pipeline's admit step, in-process with a real simulator upstream: a model's own limits
(429 with OpenAI's rate-limit headers, which the official client's retry honours), caps (400
naming the cap), headers on successful answers, and fair-share queueing with SSE keep-alives."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from helpers import GW, settings_for, sim

from fleetgate.app import create_app

CHAT = {"model": "sim", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
RATE_HEADERS = (
    "x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests",
)


async def gateway(tmp: Path, upstream: str, **model_over: Any) -> GW:
    s = settings_for(tmp, upstream)
    doc = s.model_dump(mode="json", exclude_none=True)
    doc["models"][0].update(model_over)
    from fleetgate import config

    app = create_app(config.parse(doc))
    await app.startup()
    return GW(app, httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw"))


@pytest.fixture
async def limited(tmp_path: Path, sim_url: str) -> AsyncIterator[GW]:
    gw = await gateway(tmp_path, sim_url, limits={"rpm": 60, "max_tokens": 50, "max_n": 2})
    yield gw
    await gw.client.aclose()
    await gw.app.shutdown()


async def test_a_models_rpm_gives_429_with_openai_headers(limited: GW) -> None:
    key = limited.key()
    h = {"Authorization": f"Bearer {key}"}
    ok = await limited.client.post("/v1/chat/completions", json=CHAT, headers=h)
    assert ok.status_code == 200
    assert ok.headers["x-ratelimit-limit-requests"] == "60"
    assert int(ok.headers["x-ratelimit-remaining-requests"]) == 59
    statuses = [
        (await limited.client.post("/v1/chat/completions", json=CHAT, headers=h)).status_code
        for _ in range(60)
    ]
    assert statuses.count(200) == 59 and statuses[-1] == 429
    r = await limited.client.post("/v1/chat/completions", json=CHAT, headers=h)
    assert r.status_code == 429
    err = r.json()["error"]
    assert err["code"] == "rate_limit_exceeded" and err["source"] == "gateway"
    assert int(r.headers["retry-after"]) >= 1
    for name in RATE_HEADERS:
        assert name in r.headers
    assert r.headers["x-ratelimit-remaining-requests"] == "0"


async def test_the_official_clients_retry_succeeds_after_retry_after(limited: GW) -> None:
    key = limited.key()
    client = openai.AsyncOpenAI(
        base_url="http://gw/v1", api_key=key, max_retries=0,
        http_client=httpx.AsyncClient(transport=httpx.ASGITransport(app=limited.app)),
    )
    for _ in range(60):
        await client.chat.completions.create(**CHAT)
    with pytest.raises(openai.RateLimitError) as e:
        await client.chat.completions.create(**CHAT)
    assert e.value.response.headers["x-ratelimit-remaining-requests"] == "0"
    retrying = client.with_options(max_retries=3)
    done = await retrying.chat.completions.with_raw_response.create(**CHAT)
    assert done.http_response.status_code == 200  # it waited for Retry-After, then got in


@pytest.mark.parametrize(
    ("body", "param"),
    [({"max_tokens": 51}, "max_tokens"), ({"max_completion_tokens": 100}, "max_tokens"),
     ({"n": 3}, "n")],
)
async def test_caps_are_a_400_naming_the_cap_never_a_clamp(
    limited: GW, sim_url: str, body: dict[str, Any], param: str
) -> None:
    key = limited.key()
    r = await limited.client.post("/v1/chat/completions", json={**CHAT, **body},
                                  headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and "cap" in err["message"] and "model 'sim'" in err["message"]


async def test_limits_are_shared_by_all_callers_of_the_model(limited: GW) -> None:
    a, b = limited.key("a"), limited.key("b")
    for i in range(60):
        k = a if i % 2 else b
        r = await limited.client.post("/v1/chat/completions", json=CHAT,
                                      headers={"Authorization": f"Bearer {k}"})
        assert r.status_code == 200
    for k in (a, b):
        r = await limited.client.post("/v1/chat/completions", json=CHAT,
                                      headers={"Authorization": f"Bearer {k}"})
        assert r.status_code == 429


async def test_a_model_without_limits_sends_no_rate_headers(gw: GW) -> None:
    r = await gw.client.post("/v1/chat/completions", json=CHAT,
                             headers={"Authorization": f"Bearer {gw.key()}"})
    assert r.status_code == 200 and "x-ratelimit-limit-requests" not in r.headers


@pytest.fixture(scope="module")
def slow_sim() -> Any:
    with sim("upstream-name", "--ttft-ms", "0", "--tokens-per-s", "20",
             "--api-key", "upstream-secret-key") as url:
        yield url


async def test_fair_share_queues_past_the_per_replica_cap_with_keepalives(
    tmp_path: Path, slow_sim: str
) -> None:
    gw = await gateway(tmp_path, slow_sim, admission={
        "max_inflight_per_replica": 1, "max_queue": 1, "queue_timeout_s": 30})
    gw.app.pool.groups["sim"].policy.cold_start  # noqa: B018 (the model exists)
    key = gw.key()
    h = {"Authorization": f"Bearer {key}"}
    long_req = {**CHAT, "max_tokens": 30}  # 1.5 s at 20 tokens/s

    async def until(check: Any, what: str) -> None:  # a loaded machine is slow to get there
        for _ in range(500):
            if check():
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"not reached: {what}")

    try:
        first = asyncio.create_task(gw.client.post("/v1/chat/completions", json=long_req,
                                                   headers=h))
        admitter = gw.app.pipeline.admitter
        await until(lambda: "sim" in admitter._gates and admitter._gates["sim"].in_flight == 1,
                    "the first request holds the one slot")
        gate = admitter._gates["sim"]
        # The one slot is taken: a stream waits in the queue, with its head and a comment.
        lines: list[str] = []

        async def streamed() -> None:
            async with gw.client.stream("POST", "/v1/chat/completions", headers=h,
                                        json={**CHAT, "stream": True}) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    lines.append(line)

        waiting = asyncio.create_task(streamed())
        await until(lambda: gate.waiting == 1, "the stream waits in the queue")
        # The queue holds one: a third request is refused at once.
        third = await gw.client.post("/v1/chat/completions", json=CHAT, headers=h)
        assert third.status_code == 503 and third.json()["error"]["code"] == "queue_full"
        assert "retry-after" in third.headers
        assert (await first).status_code == 200
        await asyncio.wait_for(waiting, 30)
        assert lines[0].startswith(": waiting for a free slot")
        assert any(x.startswith("data: ") and "[DONE]" not in x for x in lines)
        assert lines[-1] == "data: [DONE]" or lines[-2] == "data: [DONE]"
    finally:
        await gw.client.aclose()
        await gw.app.shutdown()


@pytest.mark.parametrize(
    ("over", "refused"),
    [
        ({}, False),
        ({"limits": {"rpm": 10}}, True),
        ({"admission": {"max_inflight_per_replica": 4}}, True),
        ({"limits": {"max_n": 1}}, True),
    ],
)
def test_several_workers_on_memory_counters_are_refused_when_limits_exist(
    tmp_path: Path, over: dict[str, Any], refused: bool
) -> None:
    import click

    from fleetgate import config
    from fleetgate.cli.serve import check_workers

    doc = settings_for(tmp_path, "http://127.0.0.1:9").model_dump(mode="json", exclude_none=True)
    doc["models"][0].update(over)
    s = config.parse(doc)
    check_workers(s, 1)  # one worker is always fine
    if refused:
        with pytest.raises(click.ClickException, match="limits.backend: redis"):
            check_workers(s, 2)
        doc["limits"] = {"backend": "redis", "redis_url": "redis://127.0.0.1:1/0"}
        check_workers(config.parse(doc), 2)  # exact across workers on Redis
    else:
        check_workers(s, 2)


def test_queued_clients_that_leave_give_their_slots_back(tmp_path: Path, slow_sim: str) -> None:
    """Streams waiting for a fair-share slot whose clients disconnect leave nothing behind: once
    the running request ends, the next one is served at once (a leaked slot would keep it
    queued until queue_timeout_s). Over real HTTP: the in-process transport can't disconnect."""
    from helpers import create_key, free_port
    from helpers import gateway as serve

    doc = settings_for(tmp_path, slow_sim).model_dump(mode="json", exclude_none=True)
    doc["models"][0]["admission"] = {"max_inflight_per_replica": 1, "queue_timeout_s": 5}
    cfg = tmp_path / "gw.yaml"
    import yaml

    cfg.write_text(yaml.safe_dump(doc))
    key = create_key(cfg, "k")
    h = {"Authorization": f"Bearer {key}"}
    with serve(cfg, free_port()) as url, httpx.Client(base_url=url, headers=h, timeout=30) as c:
        import threading

        done: list[int] = []
        t = threading.Thread(target=lambda: done.append(c.post(
            "/v1/chat/completions", json={**CHAT, "max_tokens": 40}).status_code))
        t.start()
        import time

        time.sleep(0.5)
        for _ in range(3):  # streams that queue, read their first comment, then leave
            with c.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
                first_line = next(r.iter_lines())
                assert first_line.startswith(": waiting for a free slot")
        t.join(30)
        assert done == [200]
        ok = c.post("/v1/chat/completions", json=CHAT)
        assert ok.status_code == 200, ok.text


def test_several_workers_are_refused_with_templates(tmp_path: Path) -> None:
    """Every worker would launch its own replicas of a dynamic model."""
    import click

    from fleetgate import config
    from fleetgate.cli.serve import check_workers

    doc = settings_for(tmp_path, "http://127.0.0.1:9").model_dump(mode="json", exclude_none=True)
    doc["templates"] = [{
        "name": "qwen", "match": ["Qwen/*"],
        "backend": {"type": "local", "command": "fleetgate sim --model {model_path} --port {port}"},
    }]
    s = config.parse(doc)
    check_workers(s, 1)
    with pytest.raises(click.ClickException, match=r"templates\[qwen\]"):
        check_workers(s, 2)
