"""The contract every limits backend keeps, run against ``memory`` and a real ``redis``.

Buckets here are slow (10 rpm refills one request every 6 s) so that the few milliseconds a
test takes can't change an outcome on the Redis side, whose clock is Redis's own.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import AsyncIterator

import pytest
from limits_fakes import FakeClock
from redis_server import RedisServer

from fleetgate.errors import GatewayError, QuotaExceeded, RateLimited
from fleetgate.limits.backend import Backend, Grant, admit, create, resolve
from fleetgate.limits.memory import MemoryBackend
from fleetgate.limits.redis_backend import RedisBackend
from fleetgate.limits.spec import Checks, Limits, Quota, Subject

ALICE, BOB = Subject("user", "alice"), Subject("user", "bob")
TEAM, MODEL = Subject("group", "team"), Subject("model", "m")


@pytest.fixture(params=["memory", "redis"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    if request.param == "memory":
        yield MemoryBackend(clock=FakeClock())
        return
    srv: RedisServer = request.getfixturevalue("redis_srv")
    b = create("redis", url=srv.url, prefix=f"{{t{uuid.uuid4().hex[:8]}}}:")
    await b.start()
    try:
        yield b
    finally:
        await b.close()


async def take(b: Backend, checks: Checks, cost: int) -> Grant:
    return await resolve(b.admit(checks, cost))


async def refused(b: Backend, checks: Checks, cost: int) -> GatewayError:
    with pytest.raises(GatewayError) as e:
        await take(b, checks, cost)
    return e.value


async def flushed(b: Backend) -> None:
    """Redis settles from a background sender: wait until it has sent what is pending."""
    if isinstance(b, RedisBackend):
        await b.flush()


async def test_rpm_lets_exactly_the_limit_through(backend: Backend) -> None:
    checks = Checks.of([(ALICE, Limits(rpm=10))])
    for i in range(10):
        g = await take(backend, checks, 1)
        assert g.headers["x-ratelimit-limit-requests"] == "10"
        assert g.headers["x-ratelimit-remaining-requests"] == str(9 - i)
    err = await refused(backend, checks, 1)
    assert isinstance(err, RateLimited) and err.status == 429
    assert err.body()["error"]["code"] == "rate_limit_exceeded"  # type: ignore[index]
    assert "user 'alice'" in err.message and "10 requests per minute" in err.message
    # A 10-rpm bucket refills one request every 6 s.
    assert err.headers["retry-after"] in ("5", "6")
    assert 5000 <= int(err.headers["retry-after-ms"]) <= 6000
    assert err.headers["x-ratelimit-remaining-requests"] == "0"
    assert re.fullmatch(r"(59(\.\d+)?s|1m0s)", err.headers["x-ratelimit-reset-requests"])


async def test_success_headers_report_the_most_restrictive(backend: Backend) -> None:
    checks = Checks.of([(ALICE, Limits(rpm=100, tpm=100_000)), (TEAM, Limits(rpm=5, tpm=2000))])
    g = await take(backend, checks, 500)
    assert g.headers["x-ratelimit-limit-requests"] == "5"
    assert g.headers["x-ratelimit-remaining-requests"] == "4"
    # 12 s and 15 s to full; Redis's clock has moved on a little since the take.
    assert re.fullmatch(r"1[0-2](\.\d+)?s", g.headers["x-ratelimit-reset-requests"])
    assert g.headers["x-ratelimit-limit-tokens"] == "2000"
    assert g.headers["x-ratelimit-remaining-tokens"] == "1500"
    assert re.fullmatch(r"1[3-5](\.\d+)?s", g.headers["x-ratelimit-reset-tokens"])


async def test_tpm_settles_to_real_usage(backend: Backend) -> None:
    checks = Checks.of([(ALICE, Limits(tpm=1000))])
    g = await take(backend, checks, 600)
    err = await refused(backend, checks, 600)
    assert isinstance(err, RateLimited) and "1000 tokens per minute" in err.message
    g.settle(60, 40)  # it really used 100: 500 come back
    g.settle(60, 40)  # a second settle changes nothing
    await flushed(backend)
    g2 = await take(backend, checks, 600)
    # 1000 - 600 + 500 - 600, plus what refilled meanwhile on Redis's clock (17 a second).
    assert 300 <= int(g2.headers["x-ratelimit-remaining-tokens"]) <= 320


async def test_all_or_nothing(backend: Backend) -> None:
    """A refusal by one limit takes nothing from the others."""
    checks = Checks.of([(ALICE, Limits(rpm=10)), (MODEL, Limits(rpm=1))])
    await take(backend, checks, 1)
    for _ in range(3):
        await refused(backend, checks, 1)
    g = await take(backend, Checks.of([(ALICE, Limits(rpm=10))]), 1)
    assert g.headers["x-ratelimit-remaining-requests"] == "8"


async def test_group_limit_is_shared_by_its_members(backend: Backend) -> None:
    def checks(user: Subject) -> Checks:
        return Checks.of([(user, Limits(rpm=10)), (TEAM, Limits(rpm=3))])

    await take(backend, checks(ALICE), 1)
    await take(backend, checks(BOB), 1)
    await take(backend, checks(ALICE), 1)
    err = await refused(backend, checks(BOB), 1)
    assert "group 'team'" in err.message


async def test_concurrency_acquired_and_released_once(backend: Backend) -> None:
    checks = Checks.of([(ALICE, Limits(max_concurrent=2))])
    a = await take(backend, checks, 1)
    await take(backend, checks, 1)
    err = await refused(backend, checks, 1)
    assert isinstance(err, RateLimited) and "concurrent" in err.message
    assert err.headers["retry-after"] == "1"
    a.settle(0, 0)
    a.settle(0, 0)  # released exactly once: still only one slot free
    await flushed(backend)
    await take(backend, checks, 1)
    await refused(backend, checks, 1)


async def test_quota_counts_then_settles(backend: Backend) -> None:
    checks = Checks.of([], [(ALICE, Quota(1000, "day"))])
    g = await take(backend, checks, 600)
    err = await refused(backend, checks, 600)
    assert isinstance(err, QuotaExceeded) and err.status == 429
    assert err.body()["error"]["code"] == "insufficient_quota"  # type: ignore[index]
    assert "400 tokens left" in err.message and "resets at" in err.message
    g.settle(30, 70)
    await flushed(backend)
    await take(backend, checks, 900)  # 100 + 900 = 1000: exactly fits
    err = await refused(backend, checks, 1)
    assert "0 tokens left" in err.message


async def test_quota_refusal_wins_over_a_rate_refusal(backend: Backend) -> None:
    checks = Checks.of([(ALICE, Limits(rpm=1))], [(TEAM, Quota(10, "month"))])
    await take(backend, checks, 5)
    err = await refused(backend, checks, 6)
    assert isinstance(err, QuotaExceeded) and "group 'team'" in err.message


async def test_admit_applies_caps_and_cost_first(backend: Backend) -> None:
    checks = Checks.of([(ALICE, Limits(tpm=5000, max_tokens=1000))])
    with pytest.raises(GatewayError) as e:
        await resolve(admit(backend, checks, body_bytes=40, max_tokens=1001))
    assert e.value.status == 400 and e.value.param == "max_tokens"
    # 4000 bytes of prompt (1000 tokens) + 1024 default: 2024 of 5000
    g = await resolve(admit(backend, checks, body_bytes=4000, max_tokens=None))
    assert g.cost == 2024
    # Above the tpm limit itself: no wait would ever admit it, so a 400, not a 429.
    with pytest.raises(GatewayError) as e:
        await resolve(admit(backend, checks, body_bytes=40, max_tokens=1000, n=6))
    assert e.value.status == 400 and "5000 tokens per minute" in e.value.message


async def test_seed_quota_only_where_no_counter_exists(backend: Backend) -> None:
    q = Quota(1000, "month")
    checks = Checks.of([], [(TEAM, q)])
    await backend.seed_quota(TEAM, q, 950, time.time())
    await backend.seed_quota(TEAM, q, 0, time.time())  # never overwrites a counter
    with pytest.raises(QuotaExceeded, match="50 tokens left"):
        await take(backend, checks, 51)
    await take(backend, checks, 50)
