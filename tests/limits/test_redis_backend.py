"""The Redis backend against a real ``redis-server``: exact across processes, fail closed/open."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import threading
import uuid

import pytest
from redis_server import RedisServer, redis_server

from fleetgate.errors import GatewayError, LimitsUnavailable, RateLimited
from fleetgate.limits.backend import NO_LIMITS, resolve
from fleetgate.limits.redis_backend import RedisBackend
from fleetgate.limits.spec import Checks, Limits, Subject

ALICE, TEAM = Subject("user", "alice"), Subject("group", "team")
RPM10 = Checks.of([(ALICE, Limits(rpm=10)), (TEAM, Limits(rpm=1000))])


def prefix() -> str:
    return f"{{t{uuid.uuid4().hex[:8]}}}:"


async def _attempts(url: str, pfx: str, n: int) -> int:
    b = RedisBackend(url=url, prefix=pfx)
    await b.start()
    ok = 0
    try:
        results = await asyncio.gather(
            *(resolve(b.admit(RPM10, 1)) for _ in range(n)), return_exceptions=True
        )
        for r in results:
            if isinstance(r, RateLimited):
                continue
            if isinstance(r, BaseException):
                raise r
            ok += 1
    finally:
        await b.close()
    return ok


def test_ten_rpm_across_two_event_loops_in_two_threads(redis_srv: RedisServer) -> None:
    pfx = prefix()
    got: list[int] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            got.append(asyncio.run(_attempts(redis_srv.url, pfx, 15)))
        except BaseException as e:  # reported below, not lost in the thread
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert len(got) == 2 and sum(got) == 10, got


CHILD = """
import asyncio
from fleetgate.errors import RateLimited
from fleetgate.limits.backend import resolve
from fleetgate.limits.redis_backend import RedisBackend
from fleetgate.limits.spec import Checks, Limits, Subject

async def main():
    checks = Checks.of([(Subject("user", "alice"), Limits(rpm=10))])
    b = RedisBackend(url={url!r}, prefix={pfx!r})
    await b.start()
    ok = 0
    try:
        for r in await asyncio.gather(*(resolve(b.admit(checks, 1)) for _ in range(15)),
                                      return_exceptions=True):
            if isinstance(r, RateLimited):
                continue
            if isinstance(r, BaseException):
                raise r
            ok += 1
    finally:
        await b.close()
    print(ok)

asyncio.run(main())
"""


def test_ten_rpm_across_two_processes(redis_srv: RedisServer) -> None:
    pfx = prefix()
    code = CHILD.format(url=redis_srv.url, pfx=pfx)
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=60)
        assert p.returncode == 0
        outs.append(json.loads(out.strip().splitlines()[-1]))
    assert sum(outs) == 10, outs


async def test_redis_killed_fails_closed_then_open(caplog: pytest.LogCaptureFixture) -> None:
    with redis_server() as srv:
        closed = RedisBackend(url=srv.url, prefix=prefix(), timeout_s=0.5)
        opened = RedisBackend(url=srv.url, prefix=prefix(), timeout_s=0.5, fail_open=True)
        await closed.start()
        await opened.start()
        try:
            assert (await resolve(closed.admit(RPM10, 1))).headers
            assert (await resolve(opened.admit(RPM10, 1))).headers
            srv.kill()
            with pytest.raises(LimitsUnavailable) as e:
                await resolve(closed.admit(RPM10, 1))
            assert e.value.status == 503
            assert e.value.body()["error"]["code"] == "limits_unavailable"  # type: ignore[index]
            assert int(e.value.headers["retry-after"]) >= 1
            caplog.clear()
            with caplog.at_level(logging.ERROR, logger="fleetgate.limits"):
                for _ in range(20):  # far beyond the 10 rpm: nothing is counted
                    assert await resolve(opened.admit(RPM10, 1)) is NO_LIMITS
            loud = [r for r in caplog.records if "UNCOUNTED" in r.getMessage()]
            assert len(loud) == 1  # loud, but once per interval, not once per request
        finally:
            await closed.close()
            await opened.close()


async def test_a_dead_process_gives_its_slots_back(redis_srv: RedisServer) -> None:
    pfx = prefix()
    checks = Checks.of([(TEAM, Limits(max_concurrent=2))])
    a = RedisBackend(url=redis_srv.url, prefix=pfx)
    b = RedisBackend(url=redis_srv.url, prefix=pfx)
    await a.start()
    await b.start()
    try:
        await resolve(a.admit(checks, 1))
        await resolve(a.admit(checks, 1))
        with pytest.raises(RateLimited):
            await resolve(b.admit(checks, 1))  # a is alive: its two slots count
        # a is SIGKILLed: its heartbeat stops and its liveness key runs out.
        a._stopping.set()
        await asyncio.wait(a._tasks[:1], timeout=5)
        client = b._connect()
        await client.call("DEL", f"{pfx}p:{a.process_id}")
        g = await resolve(b.admit(checks, 1))
        assert await b.in_flight(TEAM) == 1
        g.settle(0, 0)
        await b.flush()
        assert await b.in_flight(TEAM) == 0
    finally:
        await a.close()
        await b.close()


async def test_a_settle_resent_after_a_broken_batch_applies_once(redis_srv: RedisServer) -> None:
    b = RedisBackend(url=redis_srv.url, prefix=prefix())  # not started: no sender, we send
    checks = Checks.of([(TEAM, Limits(max_concurrent=5))])
    try:
        await resolve(b.admit(checks, 1))
        g = await resolve(b.admit(checks, 1))
        g.settle(0, 0)
        assert len(b._pending) == 1
        b._pending.append(b._pending[0])
        await b.flush()
        assert await b.in_flight(TEAM) == 1  # released once, not twice
    finally:
        await b.close()


async def test_close_flushes_pending_settles(redis_srv: RedisServer) -> None:
    pfx = prefix()
    b = RedisBackend(url=redis_srv.url, prefix=pfx)
    watcher = RedisBackend(url=redis_srv.url, prefix=pfx)
    await b.start()
    checks = Checks.of([(ALICE, Limits(max_concurrent=3))])
    grants = [await resolve(b.admit(checks, 1)) for _ in range(3)]
    for g in grants:
        g.settle(1, 1)
    await b.close()
    try:
        assert await watcher.in_flight(ALICE) == 0
    finally:
        await watcher.close()


async def test_unreachable_from_the_start_fails_closed() -> None:
    from helpers import free_port

    b = RedisBackend(url=f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.5)
    await b.start()  # starting doesn't fail: the gateway comes up and refuses until Redis is back
    try:
        with pytest.raises(GatewayError) as e:
            await resolve(b.admit(RPM10, 1))
        assert e.value.status == 503
    finally:
        await b.close()


async def test_redis_back_after_an_outage_counts_again_and_pending_settles_go_out() -> None:
    b: RedisBackend | None = None
    try:
        with redis_server() as first:
            port = first.port
            b = RedisBackend(url=first.url, prefix=prefix(), timeout_s=0.5)
            await b.start()
            checks = Checks.of([(ALICE, Limits(rpm=10, max_concurrent=5))])
            g = await resolve(b.admit(checks, 1))
            first.kill()
            g.settle(1, 1)  # can't be sent now: it waits in the queue
            with pytest.raises(LimitsUnavailable):
                await resolve(b.admit(checks, 1))
        with redis_server(port) as second:
            assert second.port == port
            for _ in range(100):  # the sender retries with a backoff of at most 2 s
                if not b._pending:
                    break
                await asyncio.sleep(0.1)
            assert not b._pending
            g2 = await resolve(b.admit(checks, 1))  # reconnected; a fresh Redis starts full
            assert g2.headers["x-ratelimit-remaining-requests"] == "9"
    finally:
        if b is not None:
            await b.close()


async def test_a_day_quota_rolls_over_at_midnight_with_the_same_checks(
    redis_srv: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The compiled checks name the period's quota key; a request after midnight must count
    against the new day, and a grant from before midnight settles into the day it was charged."""
    import datetime as dt

    from fleetgate.errors import QuotaExceeded
    from fleetgate.limits import redis_backend
    from fleetgate.limits.spec import Quota

    now = [dt.datetime(2026, 11, 24, 23, 59, 0, tzinfo=dt.UTC).timestamp()]

    class Clock:
        @staticmethod
        def time() -> float:
            return now[0]

    monkeypatch.setattr(redis_backend, "clock", Clock)
    q = Quota(1000, "day")
    checks = Checks.of([(ALICE, Limits(tpm=10_000))], [(ALICE, q)])
    b = RedisBackend(url=redis_srv.url, prefix=prefix())
    try:
        late = await resolve(b.admit(checks, 600))
        with pytest.raises(QuotaExceeded):
            await resolve(b.admit(checks, 600))  # 600 + 600 > 1000 today
        now[0] += 120  # 00:01 the next day
        early = await resolve(b.admit(checks, 600))  # a new day's counter
        assert await b.quota_used(ALICE, q) == 600
        late.settle(50, 50)  # used 100 of the 600 it was charged, yesterday
        early.settle(300, 0)
        await b.flush()
        assert await b.quota_used(ALICE, q) == 300  # today: only the second request
        now[0] -= 120
        assert await b.quota_used(ALICE, q) == 100  # yesterday: the first, settled
    finally:
        await b.close()


async def test_settles_pre_encoded_for_several_subjects_refund_each(
    redis_srv: RedisServer,
) -> None:
    """Two tpm buckets, a concurrency cap and a quota in one compiled settle command: the refund
    reaches every one of them and the slot is released."""
    from fleetgate.limits.spec import Quota

    pfx = prefix()
    checks = Checks.of([(ALICE, Limits(tpm=1000, max_concurrent=2)), (TEAM, Limits(tpm=5000))],
                       [(TEAM, Quota(10_000, "month"))])
    b = RedisBackend(url=redis_srv.url, prefix=pfx)
    try:
        g = await resolve(b.admit(checks, 900))
        assert g.headers["x-ratelimit-remaining-tokens"] == "100"  # ALICE's: the tighter one
        assert await b.in_flight(ALICE) == 1
        g.settle(100, 0)  # 800 back to both buckets and the quota
        await b.flush()
        assert await b.in_flight(ALICE) == 0
        assert await b.quota_used(TEAM, Quota(10_000, "month")) == 100
        g2 = await resolve(b.admit(checks, 900))  # fits only if ALICE's bucket got 800 back
        assert int(g2.headers["x-ratelimit-remaining-tokens"]) >= 0
    finally:
        await b.close()
