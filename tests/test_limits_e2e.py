"""Limits, quotas, allow-lists and usage records end to end: the CLI sets them on users, groups
and keys, a real ``fleetgate serve`` enforces them, the official ``openai`` client sees the result.

Three users with different groups, limits and quotas; keys with network allow-lists; a quota that
survives a restart (seeded from the usage records); and usage sums after mixed streaming and
non-streaming requests, with disconnects, that equal what the upstream reported, exactly.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from helpers import cli, free_port, gateway, new_key, sim, until

MSG = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("limits")
    # 200 tokens/s: a 40-token stream takes 0.2 s, long enough to leave it half-way.
    with sim("engine", "--ttft-ms", "0", "--tokens-per-s", "200") as sim_url:
        cfg = tmp / "gw.yaml"
        cfg.write_text(
            "auth: {mode: keys, revocation_poll_s: 0.2}\n"
            f"store: {{url: 'sqlite:///{tmp / 'fg.db'}'}}\n"
            "models:\n  - name: chat\n    served_name: engine\n"
            f"    backend: {{type: static, urls: ['{sim_url}']}}\n"
        )
        cli(cfg, "groups", "create", "steady", "--models", "*", "--rpm", "2")
        cli(cfg, "groups", "create", "budget", "--models", "*", "--quota-tokens", "120",
            "--quota-period", "day")
        cli(cfg, "groups", "create", "open", "--models", "*", "--weight", "3")
        cli(cfg, "users", "create", "ana", "--group", "steady")
        cli(cfg, "users", "create", "ben", "--group", "budget")
        cli(cfg, "users", "create", "cat", "--group", "open", "--max-tokens", "8", "--max-n", "1")
        cli(cfg, "users", "create", "dee", "--group", "open")
        keys = {u: new_key(cfg, f"{u}-1", "--user", u) for u in ("ana", "ben", "cat", "dee")}
        keys["far"] = new_key(cfg, "far", "--user", "dee", "--allow-ips", "10.0.0.0/8")
        keys["near"] = new_key(cfg, "near", "--user", "dee", "--allow-ips", "127.0.0.1,10.0.0.0/8")
        yield {"cfg": cfg, "keys": keys, "sim": sim_url}


@pytest.fixture(scope="module")
def stack(setup: dict[str, Any]) -> Iterator[dict[str, Any]]:
    with gateway(setup["cfg"], free_port()) as url:
        yield {**setup, "url": url}


def client(url: str, key: str, retries: int = 0) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=retries, timeout=20)


def chat(url: str, key: str, **kw: Any) -> Any:
    return client(url, key).chat.completions.create(model="chat", messages=MSG,
                                                    **{"max_tokens": 4, **kw})


def test_a_group_rpm_limit_is_a_rate_limit_error_with_headers(stack: dict[str, Any]) -> None:
    key = stack["keys"]["ana"]
    chat(stack["url"], key)
    chat(stack["url"], key)
    with pytest.raises(openai.RateLimitError) as e:
        chat(stack["url"], key)
    h = e.value.response.headers
    assert e.value.code == "rate_limit_exceeded"
    assert h["x-ratelimit-limit-requests"] == "2" and h["x-ratelimit-remaining-requests"] == "0"
    assert float(h["retry-after"]) > 0 and h["x-ratelimit-reset-requests"]


def test_caps_on_a_user_are_400s_naming_the_cap(stack: dict[str, Any]) -> None:
    key = stack["keys"]["cat"]
    assert chat(stack["url"], key, max_tokens=8).choices
    with pytest.raises(openai.BadRequestError) as e:
        chat(stack["url"], key, max_tokens=9)
    assert e.value.code == "max_tokens_above_cap" and "user 'cat'" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        chat(stack["url"], key, n=2)
    assert e.value.code == "n_above_cap"


def test_allow_lists_refuse_other_addresses(stack: dict[str, Any]) -> None:
    with pytest.raises(openai.PermissionDeniedError) as e:
        chat(stack["url"], stack["keys"]["far"])
    assert e.value.code == "ip_not_allowed"
    assert chat(stack["url"], stack["keys"]["near"]).choices
    # Narrowing a user's list reaches a running gateway within the poll.
    cli(stack["cfg"], "users", "update", "dee", "--allow-ips", "192.168.0.0/16")
    near = stack["keys"]["near"]

    def refused() -> bool:
        try:
            chat(stack["url"], near)
            return False
        except openai.PermissionDeniedError:
            return True

    until(refused, 10, "the user's new allow-list")
    cli(stack["cfg"], "users", "update", "dee", "--allow-ips", "")
    until(lambda: not refused(), 10, "the user's list removed")


def usage_rows(cfg: Path, by: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = json.loads(cli(cfg, "usage", "--by", by, "--format", "json"))
    return rows


def stored(cfg: Path, key_name: str) -> list[Any]:
    """This key's usage rows, straight from the store."""
    from sqlalchemy import select

    from fleetgate import config
    from fleetgate.store.db import open_engine
    from fleetgate.store.tables import api_keys, usage_events

    engine = open_engine(config.load(cfg).store.url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(
                select(usage_events).join(api_keys, api_keys.c.id == usage_events.c.key_id)
                .where(api_keys.c.name == key_name).order_by(usage_events.c.id)))
    finally:
        engine.dispose()


def test_usage_sums_equal_what_the_upstream_reported(stack: dict[str, Any]) -> None:
    cfg, url = stack["cfg"], stack["url"]
    key = new_key(cfg, "dee-count", "--user", "dee")
    prompt = completion = 0
    c = client(url, key)
    for i in range(12):
        if i % 2:
            r = chat(url, key, max_tokens=5 + i)
            prompt += r.usage.prompt_tokens
            completion += r.usage.completion_tokens
        else:
            chunks = list(c.chat.completions.create(
                model="chat", messages=MSG, max_tokens=5 + i, stream=True,
                stream_options={"include_usage": True}))
            assert chunks[-1].usage is not None
            prompt += chunks[-1].usage.prompt_tokens
            completion += chunks[-1].usage.completion_tokens
    # Two clients leave a 400-token stream (2 s at the simulator's pace) after its first chunk.
    for _ in range(2):
        s = c.chat.completions.create(model="chat", messages=MSG, max_tokens=400, stream=True,
                                      stream_options={"include_usage": True})
        next(iter(s))
        s.close()
    until(lambda: len(stored(cfg, "dee-count")) == 14, 20, "the usage records")
    rows = stored(cfg, "dee-count")
    whole = [r for r in rows if not r.disconnected]
    left = [r for r in rows if r.disconnected]
    assert len(whole) == 12 and len(left) == 2
    assert sum(r.prompt_tokens for r in whole) == prompt
    assert sum(r.completion_tokens for r in whole) == completion
    # A disconnect counts what the engine generated before the client left: some, not all.
    assert all(0 < r.completion_tokens < 400 and r.stream for r in left)
    assert all(r.user_id is not None and r.status == 200 for r in rows)
    assert all(r.ttft_ms is not None and 0 <= r.ttft_ms <= r.latency_ms for r in rows)
    # The report adds up the same, by key and by user, as JSON and as CSV.
    by_key = {r["key_name"]: r for r in usage_rows(cfg, "key")}["dee-count"]
    assert by_key["requests"] == 14 and by_key["disconnected"] == 2
    assert by_key["total_tokens"] == sum(r.prompt_tokens + r.completion_tokens for r in rows)
    by_user = {r["user"]: r for r in usage_rows(cfg, "user")}
    assert by_user["dee"]["completion_tokens"] >= by_key["completion_tokens"]
    csv_out = cli(cfg, "usage", "--by", "day", "--format", "csv").splitlines()
    assert csv_out[0] == "day,requests,prompt_tokens,completion_tokens,total_tokens,disconnected"


def test_a_quota_is_insufficient_quota_and_survives_a_restart(setup: dict[str, Any]) -> None:
    key = setup["keys"]["ben"]
    refused = None
    with gateway(setup["cfg"], free_port()) as url:
        for _ in range(30):  # 120 tokens a day; each request counts at least 16 up front
            try:
                chat(url, key, max_tokens=16)
            except openai.RateLimitError as e:
                refused = e
                break
    assert refused is not None and refused.code == "insufficient_quota"
    assert "group 'budget'" in refused.message
    # A new gateway on the same store starts the day's counter from the usage records.
    with gateway(setup["cfg"], free_port()) as url:
        with pytest.raises(openai.RateLimitError) as e:
            chat(url, key, max_tokens=16)
        assert e.value.code == "insufficient_quota"
