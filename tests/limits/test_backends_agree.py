"""The memory backend (Python) and the Redis backend (Lua) decide alike, step for step.

A seeded random sequence of admissions and settles over overlapping limits (a shared group's
concurrency and quota, users' and a model's buckets) runs on both; every outcome and every
remaining count must match. The buckets refill one unit per 10 s, so the real clock Redis uses
can't change an outcome during the test's fraction of a second.
"""

from __future__ import annotations

import random
import uuid

from limits_fakes import FakeClock
from redis_server import RedisServer

from fleetgate.errors import GatewayError
from fleetgate.limits.backend import Backend, Grant, resolve
from fleetgate.limits.memory import MemoryBackend
from fleetgate.limits.redis_backend import RedisBackend
from fleetgate.limits.spec import Checks, Limits, Quota, Subject

TEAM = Subject("group", "team")
SHARED = (TEAM, Limits(max_concurrent=3))
QUOTA = (TEAM, Quota(12, "day"))
VARIANTS = [
    Checks.of([(Subject("user", "alice"), Limits(rpm=6, tpm=6)), SHARED], [QUOTA]),
    Checks.of([(Subject("user", "bob"), Limits(rpm=6)), SHARED], [QUOTA]),
    Checks.of([(Subject("model", "m"), Limits(rpm=6, tpm=12))]),
]


async def outcome(b: Backend, checks: Checks, cost: int) -> tuple[str, Grant | None]:
    try:
        g = await resolve(b.admit(checks, cost))
    except GatewayError as e:
        return f"{e.status} {e.error_code} {e.message.split(':')[0]}", None
    return "ok " + " ".join(f"{k}={v}" for k, v in sorted(g.headers.items())
                            if "-remaining-" in k or "-limit-" in k), g


async def test_memory_and_redis_agree(redis_srv: RedisServer) -> None:
    mem = MemoryBackend(clock=FakeClock())
    red = RedisBackend(url=redis_srv.url, prefix=f"{{t{uuid.uuid4().hex[:8]}}}:")
    rng = random.Random(11)
    held: list[tuple[Grant, Grant]] = []
    seen: set[str] = set()
    try:
        for step in range(300):
            if held and rng.random() < 0.4:
                gm, gr = held.pop(rng.randrange(len(held)))
                p, c = rng.randint(0, 2), rng.randint(0, 2)
                gm.settle(p, c)
                gr.settle(p, c)
                await red.flush()
                continue
            checks, cost = rng.choice(VARIANTS), rng.randint(1, 3)
            om, gm2 = await outcome(mem, checks, cost)
            orr, gr2 = await outcome(red, checks, cost)
            assert om == orr, f"step {step}: memory {om!r} but redis {orr!r}"
            seen.add(om)
            if gm2 is not None and gr2 is not None:
                held.append((gm2, gr2))
    finally:
        await red.close()
    # The sequence exercised admissions and each kind of refusal.
    for kind in ("ok ", "Rate limit reached", "Too many concurrent", "insufficient_quota"):
        assert any(kind in o for o in seen), (kind, seen)
