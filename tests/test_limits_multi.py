"""Limits across processes and gateways: real Redis, real PostgreSQL, real ``fleetgate serve``.

Two stacks, each in front of one ``fleetgate sim``:

- two gateway instances (``fleetgate serve`` twice, two ports) sharing one PostgreSQL store and
  one Redis;
- one ``fleetgate serve --workers 2`` on the same kind of store and Redis.

What a user relies on, seen through the official ``openai`` client: a group's 10 rpm lets
exactly 10 requests through however they are spread over the gateways or workers (the rest are
``RateLimitError`` with the ``x-ratelimit-*`` headers); a revoked key and a disabled user are
refused by every gateway and worker (waited for with a bound; about one 0.2 s poll when
measured); a token quota spent on both gateways ends
in ``insufficient_quota`` on both, and what it says is left is exact; a ``max_tokens`` cap is a
400 on both; a concurrency slot held by a stream on one gateway refuses a request on the other
until the stream ends, and the client's own retry (after ``Retry-After``) then gets through;
Redis gone is 503 ``limits_unavailable`` on a gateway that fails closed and uncounted answers on
one set to fail open, and both count together again when it is back.

The bucket refills one request every 6 s, so "exactly 10" holds for a burst sent within 6 s;
each burst is sent concurrently and the assertion allows one more per 6 s actually elapsed
(none, on any machine that isn't stalled), so it never passes by accident nor fails by it.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import openai
import pytest
from helpers import cli, free_port, gateway, new_key, sim, until
from openai.types.chat import ChatCompletionMessageParam
from redis_server import RedisServer, redis_server
from sqlalchemy import text

from fleetgate.store.db import open_engine

MSG: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello there"}]
POLL_S = 0.2  # auth.revocation_poll_s of both stacks
REFILL_S = 6.0  # one request's refill at 10 rpm


@dataclass
class Stack:
    cfg: Path
    urls: list[str]
    log: Path | None = None  # the --workers gateway's log (access lines carry the worker's pid)


def client(url: str, key: str) -> openai.OpenAI:
    """A fresh client: its own connection pool, so each request opens a new connection."""
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=20)


def chat(url: str, key: str, **kw: Any) -> Any:
    with client(url, key) as c:
        return c.chat.completions.create(model="chat", messages=MSG, **{"max_tokens": 4, **kw})


@pytest.fixture(scope="module")
def redis_srv() -> Iterator[RedisServer]:
    with redis_server() as srv:
        yield srv


def new_database(base_url: str) -> str:
    """A fresh database on the session's PostgreSQL; its URL."""
    name = "m_" + uuid.uuid4().hex[:12]
    admin = open_engine(base_url)
    try:
        with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
            c.execute(text(f"CREATE DATABASE {name}"))
    finally:
        admin.dispose()
    return base_url.rsplit("/", 1)[0] + "/" + name


def write_config(path: Path, store_url: str, redis_url: str, sim_url: str) -> Path:
    path.write_text(
        f"auth: {{mode: keys, revocation_poll_s: {POLL_S}}}\n"
        f"store: {{url: '{store_url}'}}\n"
        f"limits: {{backend: redis, redis_url: '{redis_url}'}}\n"
        "models:\n  - name: chat\n    served_name: engine\n"
        f"    backend: {{type: static, urls: ['{sim_url}']}}\n"
    )
    return path


@pytest.fixture(scope="module")
def engine_url() -> Iterator[str]:
    # 200 tokens/s: a 2000-token stream holds its slot for 10 s, the rest answer in ~20 ms.
    with sim("engine", "--ttft-ms", "0", "--tokens-per-s", "200") as url:
        yield url


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory, postgres_url: str,  # noqa: F811
        redis_srv: RedisServer, engine_url: str) -> Iterator[Stack]:
    """Two ``fleetgate serve`` instances on one PostgreSQL database and Redis db 0."""
    tmp = tmp_path_factory.mktemp("two")
    cfg = write_config(tmp / "gw.yaml", new_database(postgres_url), redis_srv.url, engine_url)
    cli(cfg, "groups", "list")  # brings the schema to head before both gateways start
    with gateway(cfg, free_port()) as a, gateway(cfg, free_port()) as b:
        yield Stack(cfg, [a, b])


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory, postgres_url: str,  # noqa: F811
            redis_srv: RedisServer, engine_url: str) -> Iterator[Stack]:
    """One ``fleetgate serve --workers 2 --access-log``, on its own database and Redis db 1."""
    tmp = tmp_path_factory.mktemp("workers")
    redis_url = redis_srv.url.rsplit("/", 1)[0] + "/1"
    cfg = write_config(tmp / "gw.yaml", new_database(postgres_url), redis_url, engine_url)
    # A limit in the store before it starts: the memory backend would be refused here.
    cli(cfg, "groups", "create", "ten", "--models", "*", "--rpm", "10")
    port = free_port()
    with gateway(cfg, port, "--workers", "2", "--access-log") as url:
        log = tmp / f"gateway-{port}.log"
        until(lambda: len(re.findall(r"fleetgate\.server\[\d+\]: listening", log.read_text()))
              == 2, 30, "both workers listening")
        yield Stack(cfg, [url], log)


def answered_by(log: Path, status: int) -> Counter[str]:
    """How many chat completions each worker (by pid) answered with ``status``, per its log."""
    return Counter(re.findall(
        rf'fleetgate\.access\[(\d+)\]: .*"POST /v1/chat/completions HTTP/1\.1" {status}$',
        log.read_text("utf-8"), re.MULTILINE))


def user_with_key(cfg: Path, user: str, *user_flags: str) -> str:
    cli(cfg, "users", "create", user, *user_flags)
    return new_key(cfg, f"{user}-key", "--user", user)


def burst(urls: list[str], keys: list[str], n: int, first: int = 4) -> tuple[
        list[Any], list[openai.RateLimitError], float]:
    """``first`` requests one by one, then ``n`` at once, each on a fresh connection; request
    ``i`` uses ``keys[i % len(keys)]`` and the URLs in turn after every key had one.

    The one-by-one requests make sure every URL admits some (in a burst alone, the gateway
    that loads a new key first could take the whole bucket). Returns the admitted raw
    responses, the refusals, and the seconds from the first send to the last answer. Anything
    other than an answer or a 429 fails the test.
    """
    def one(i: int) -> Any:
        with client(urls[i // len(keys) % len(urls)], keys[i % len(keys)]) as c:
            try:
                return c.chat.completions.with_raw_response.create(
                    model="chat", messages=MSG, max_tokens=4)
            except openai.RateLimitError as e:
                return e

    t0 = time.monotonic()
    results = [one(i) for i in range(first)]
    with ThreadPoolExecutor(max_workers=n) as pool:
        results += pool.map(one, range(n))
    elapsed = time.monotonic() - t0
    ok = [r for r in results if not isinstance(r, openai.RateLimitError)]
    return ok, [r for r in results if isinstance(r, openai.RateLimitError)], elapsed


def assert_exactly_ten(ok: list[Any], refused: list[openai.RateLimitError],
                       elapsed: float) -> None:
    extra = int(elapsed // REFILL_S)  # 0 unless the machine stalled for 6 s
    assert 10 <= len(ok) <= 10 + extra, (len(ok), elapsed)
    for r in ok:
        assert r.headers["x-ratelimit-limit-requests"] == "10"
    if extra == 0:
        # Each admission took one from the same bucket, atomically: nine left, then eight, ...
        assert sorted(int(r.headers["x-ratelimit-remaining-requests"]) for r in ok) == list(
            range(10))
    for e in refused:
        h = e.response.headers
        assert e.status_code == 429 and e.code == "rate_limit_exceeded"
        assert "group 'ten'" in e.message
        assert h["x-ratelimit-limit-requests"] == "10"
        assert h["x-ratelimit-remaining-requests"] == "0"
        assert h["x-ratelimit-reset-requests"] and int(h["retry-after"]) >= 1


def test_ten_rpm_is_exactly_ten_across_two_gateways(two: Stack) -> None:
    cli(two.cfg, "groups", "create", "ten", "--models", "*", "--rpm", "10")
    # Two members: a group's limit is one counter for all of them together.
    keys = [user_with_key(two.cfg, u, "--group", "ten") for u in ("ana", "abe")]
    ok, refused, elapsed = burst(two.urls, keys, 20)
    assert_exactly_ten(ok, refused, elapsed)
    # Both gateways admitted some and refused some (each got 10 of the burst, and at most 6
    # were left): the bucket is one, not one per gateway.
    served = {str(r.http_request.url).split("/v1")[0] for r in ok}
    turned = {str(e.request.url).split("/v1")[0] for e in refused}
    assert served == turned == set(two.urls)
    # The four one-by-one requests were each member's on each gateway.
    assert {(str(r.http_request.url).split("/v1")[0], r.http_request.headers["authorization"])
            for r in ok[:4]} == {(u, f"Bearer {k}") for u in two.urls for k in keys}


def test_ten_rpm_is_exactly_ten_across_two_workers(workers: Stack) -> None:
    assert workers.log is not None
    key = user_with_key(workers.cfg, "ana", "--group", "ten")
    ok, refused, elapsed = burst(workers.urls, [key], 20)
    assert_exactly_ten(ok, refused, elapsed)
    # Each request came on its own connection; the kernel spread them over both workers.
    log = workers.log
    until(lambda: sum((answered_by(log, 200) + answered_by(log, 429)).values()) == 24, 10,
          "the access lines")
    assert len(answered_by(log, 200) + answered_by(log, 429)) == 2


def refused_401(url: str, key: str) -> bool:
    try:
        chat(url, key)
        return False
    except openai.AuthenticationError as e:
        assert e.code == "invalid_api_key"
        return True


def key_id(cfg: Path, name: str) -> str:
    for line in cli(cfg, "keys", "list").splitlines()[1:]:
        cols = line.split()
        if cols[2] == name:
            return cols[0]
    raise AssertionError(f"no key {name!r} in keys list")


def test_a_revoked_key_and_a_disabled_user_fail_on_both_gateways(two: Stack) -> None:
    cli(two.cfg, "groups", "create", "plain", "--models", "*")
    kept = user_with_key(two.cfg, "gil", "--group", "plain")
    revoked = new_key(two.cfg, "gil-revoked", "--user", "gil")
    disabled = user_with_key(two.cfg, "hal", "--group", "plain")
    for url in two.urls:  # every key works, and is cached, on both gateways first
        for key in (kept, revoked, disabled):
            assert chat(url, key).choices

    cli(two.cfg, "keys", "revoke", key_id(two.cfg, "gil-revoked"))
    cli(two.cfg, "users", "disable", "hal")
    t0 = time.monotonic()
    for url in two.urls:
        until(partial(refused_401, url, revoked), 10, f"the revocation at {url}")
        until(partial(refused_401, url, disabled), 10, f"the disabled user at {url}")
    took = time.monotonic() - t0
    print(f"revocation and disable reached both gateways in {took:.2f} s (poll {POLL_S} s)")
    for url in two.urls:  # and nothing else was touched
        assert chat(url, kept).choices
    cli(two.cfg, "users", "enable", "hal")
    for url in two.urls:
        until(partial(_admitted, url, disabled), 10, f"re-enabled at {url}")
        assert refused_401(url, revoked)


def until_both_workers(log: Path, status: int, send: Callable[[], bool], what: str) -> None:
    """Call ``send`` (one request on a fresh connection) until it is true and both workers
    have answered ``status`` to such a request since the first call."""
    before = answered_by(log, status)
    until(lambda: send() and len(answered_by(log, status) - before) == 2, 10, what)


def test_a_revoked_key_and_a_disabled_user_fail_on_both_workers(workers: Stack) -> None:
    assert workers.log is not None
    log, url = workers.log, workers.urls[0]
    revoked = new_key(workers.cfg, "short-lived")
    cli(workers.cfg, "groups", "create", "plain", "--models", "*")
    disabled = user_with_key(workers.cfg, "ida", "--group", "plain")
    # Both workers load and cache both keys first.
    for key in (revoked, disabled):
        until_both_workers(log, 200, partial(_admitted, url, key), "both workers to admit")
    cli(workers.cfg, "keys", "revoke", key_id(workers.cfg, "short-lived"))
    cli(workers.cfg, "users", "disable", "ida")
    # Each worker has its own key cache; once each has refused a key (a revocation or a
    # disable, once seen, stays), every request with it is refused.
    for key in (revoked, disabled):
        until_both_workers(log, 401, partial(refused_401, url, key), "both workers to refuse")
        assert all(refused_401(url, key) for _ in range(8))


LEFT = re.compile(r"has (\d+) tokens left")


def test_a_quota_spent_on_both_gateways_runs_out_on_both(two: Stack) -> None:
    quota = 300
    cli(two.cfg, "groups", "create", "budget", "--models", "*", "--quota-tokens", str(quota),
        "--quota-period", "day")
    key = user_with_key(two.cfg, "ben", "--group", "budget", "--max-tokens", "40")
    used = 0
    served: set[str] = set()
    lefts: dict[str, int] = {}
    # Alternate gateways until both refuse in a row and say exactly what the upstream's usage
    # leaves. Each request counts ~45 tokens up front (20 + the prompt estimate) and settles to
    # ~25, so a dozen fit; a refusal that came before an earlier settle landed may be followed
    # by an admission, which is counted like any other.
    for i in range(60):
        url = two.urls[i % 2]
        try:
            r = chat(url, key, max_tokens=20)
        except openai.RateLimitError as e:
            assert e.code == "insufficient_quota" and "group 'budget'" in e.message
            assert e.response.headers.get("x-should-retry") == "false"
            m = LEFT.search(e.message)
            assert m is not None, e.message
            lefts[url] = int(m.group(1))
            if len(lefts) == 2 and set(lefts.values()) == {quota - used}:
                break
            time.sleep(0.1)  # let pending settles land
            continue
        lefts.clear()
        used += r.usage.total_tokens
        served.add(url)
    assert served == set(two.urls) and 0 < used <= quota, (served, used)
    assert lefts == {u: quota - used for u in two.urls}, (lefts, quota - used)
    # The cap on the same user is a 400 on both, before any quota is counted.
    for url in two.urls:
        with pytest.raises(openai.BadRequestError) as bad:
            chat(url, key, max_tokens=41)
        assert bad.value.code == "max_tokens_above_cap" and "user 'ben'" in bad.value.message


def test_a_concurrency_slot_held_on_one_gateway_refuses_on_the_other(two: Stack) -> None:
    cli(two.cfg, "groups", "create", "solo", "--models", "*", "--max-concurrent", "1")
    key = user_with_key(two.cfg, "cat", "--group", "solo")
    a, b = two.urls
    with client(a, key) as c:
        stream = c.chat.completions.create(model="chat", messages=MSG, max_tokens=2000,
                                           stream=True)
        next(iter(stream))  # admitted on A, and generating for ~10 s
        with pytest.raises(openai.RateLimitError) as e:
            chat(b, key)
        assert e.value.code == "rate_limit_exceeded" and "group 'solo'" in e.value.message
        assert e.value.response.headers["retry-after"] == "1"
        stream.close()  # the client leaves: A gives the slot back
    until(lambda: _admitted(b, key), 10, "the slot released on A to be free on B")


def test_the_clients_own_retry_gets_a_slot_freed_on_the_other_gateway(two: Stack) -> None:
    cli(two.cfg, "groups", "create", "pair", "--models", "*", "--max-concurrent", "1")
    key = user_with_key(two.cfg, "dan", "--group", "pair")
    a, b = two.urls
    refused_once = threading.Event()
    statuses: list[int] = []

    def on_response(response: Any) -> None:
        statuses.append(response.status_code)
        if response.status_code == 429:
            refused_once.set()

    with client(a, key) as c:
        stream = c.chat.completions.create(model="chat", messages=MSG, max_tokens=2000,
                                           stream=True)
        next(iter(stream))  # A holds the group's one slot
        # A leaves once B has been refused, so B's first try is refused and a retry isn't.
        leave = threading.Thread(target=lambda: refused_once.wait(20) and stream.close())
        leave.start()
        try:
            hooks = {"response": [on_response]}
            with openai.OpenAI(base_url=b + "/v1", api_key=key, max_retries=5, timeout=20,
                               http_client=openai.DefaultHttpxClient(event_hooks=hooks)) as cb:
                r = cb.chat.completions.with_raw_response.create(model="chat", messages=MSG,
                                                                 max_tokens=4)
        finally:
            refused_once.set()  # let the thread go, whatever happened
            leave.join(timeout=20)
    assert statuses[0] == 429 and statuses[-1] == 200, statuses
    assert r.retries_taken == len(statuses) - 1 >= 1 and r.parse().choices


def _admitted(url: str, key: str) -> bool:
    try:
        return bool(chat(url, key).choices)
    except (openai.RateLimitError, openai.AuthenticationError):
        return False


def test_redis_down_fails_closed_on_one_gateway_and_open_on_the_other(
        tmp_path: Path, postgres_url: str, engine_url: str) -> None:  # noqa: F811
    """Its own Redis (killed here) and two gateways, one with ``limits.redis_fail_open``."""
    store = new_database(postgres_url)
    with redis_server() as srv:
        closed = write_config(tmp_path / "closed.yaml", store, srv.url, engine_url)
        opened = write_config(tmp_path / "open.yaml", store, srv.url, engine_url)
        opened.write_text(opened.read_text().replace(
            "limits: {", "limits: {redis_fail_open: true, "))
        cli(closed, "groups", "create", "three", "--models", "*", "--rpm", "3")
        key = user_with_key(closed, "eve", "--group", "three")
        b_port = free_port()
        with gateway(closed, free_port()) as a, gateway(opened, b_port) as b:
            assert chat(a, key).choices and chat(b, key).choices
            srv.kill()
            with pytest.raises(openai.APIStatusError) as e:
                chat(a, key)
            assert e.value.status_code == 503 and e.value.code == "limits_unavailable"
            assert e.value.response.headers["retry-after"] == "2"
            for _ in range(3):  # more than the 3 rpm: nothing is counted while Redis is gone
                assert chat(b, key).choices
            log = (tmp_path / f"gateway-{b_port}.log").read_text("utf-8")
            assert "ERROR" in log and "letting requests through UNCOUNTED" in log
            with redis_server(port=srv.port):  # back, empty: both count again, together
                until(partial(_admitted_again, a, key), 20, "gateway A to admit again")
                results = [_admitted(u, key) for u in (a, b, a, b, a)]
                assert results.count(True) == 2, results  # 3 a minute, one taken by the until


def _admitted_again(url: str, key: str) -> bool:
    """Admitted; ``False`` while the gateway still finds Redis unreachable (503)."""
    try:
        return bool(chat(url, key).choices)
    except openai.InternalServerError as e:
        assert e.status_code == 503 and e.code == "limits_unavailable"
        return False
