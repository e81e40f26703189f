"""The ``redis`` backend: counters in one Redis, exact across processes and gateway instances.

Every admission is ONE round trip: a Lua script that reads every bucket, quota and concurrency
counter the request's checks name, decides, and takes from all of them or from none, atomically
(Redis runs a script alone). Time is Redis's own (``TIME``), so gateways with skewed clocks share
buckets correctly; only the quota period's name (which UTC day or month) comes from this host.

Settling is one more script per request, sent by one background task that pipelines whatever is
pending (no task per request, never on the request path): ``Grant.settle`` only appends to a
bounded queue. :meth:`RedisBackend.close` flushes it.

Concurrency counters are a hash per subject, one field per gateway process, so that a process
killed without releasing its slots (SIGKILL) loses them for everyone within ``process_ttl_s``:
each process keeps a liveness key alive while it runs, and the admit script drops the fields of
processes whose key has expired. Bucket keys expire once they would be full again; quota keys
two days after their period ends.

If Redis can't be reached within ``timeout_s``, admission fails closed (503
``limits_unavailable``), or with ``fail_open=True`` lets the request through uncounted and logs
it loudly, at most once per ``log_every_s``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import math
import os
import time
import uuid
from collections.abc import Awaitable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from fleetgate.errors import LimitsUnavailable
from fleetgate.limits import quotas
from fleetgate.limits.backend import NO_LIMITS, Backend, Failure, Grant, Outcome, refusal
from fleetgate.limits.headers import RateView
from fleetgate.limits.spec import Checks, Quota, Subject

log = logging.getLogger("fleetgate.limits")

# Shared by both scripts: Redis's clock, a bucket's level now (refilled, capped; absent = full),
# and writing a level back with a lifetime that ends once the bucket would be full again.
_LUA_BUCKETS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local function level(key, cap)
  local h = redis.call('HMGET', key, 'l', 't')
  if not h[1] then return cap end
  local lvl = tonumber(h[1])
  local ts = tonumber(h[2])
  if now > ts then lvl = lvl + (now - ts) * cap / 60 end
  if lvl > cap then lvl = cap end
  return lvl
end
local function store(key, lvl, cap)
  redis.call('HSET', key, 'l', string.format('%.6f', lvl), 't', string.format('%.6f', now))
  redis.call('PEXPIRE', key, math.ceil((cap - lvl) * 60000 / cap) + 1000)
end
"""

# KEYS: buckets (nb), quotas (nq), concurrency hashes (nc).
# ARGV: cost, process id, liveness-key prefix, nb, [capacity, need]*nb, nq, [limit, expireat]*nq,
#       nc, [max]*nc.
# Returns {ok, failure, index, wait_s, quota_used, level_1 .. level_nb}: levels after the take
# when ok, as they are when refused. Numbers that may be fractional travel as strings (a Lua
# number in a reply is truncated to an integer).
ADMIT = _LUA_BUCKETS + """
local cost = tonumber(ARGV[1])
local proc = ARGV[2]
local alive = ARGV[3]
local nb = tonumber(ARGV[4])
local a, k = 5, 1
local levels, caps, needs = {}, {}, {}
local rfail, ridx, rwait = 0, 0, 0
for i = 1, nb do
  local cap, need = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  a = a + 2
  local lvl = level(KEYS[k], cap)
  levels[i], caps[i], needs[i] = lvl, cap, need
  if lvl < need then
    local w = (need - lvl) * 60 / cap
    if rfail == 0 or w > rwait then rfail, ridx, rwait = 1, i, w end
  end
  k = k + 1
end
local nq = tonumber(ARGV[a])
a = a + 1
local qstart = k
local qfail, qidx, qused = 0, 0, 0
for i = 1, nq do
  local lim = tonumber(ARGV[a])
  a = a + 2
  local used = tonumber(redis.call('GET', KEYS[k]) or '0')
  if qfail == 0 and used + cost > lim then qfail, qidx, qused = 1, i, used end
  k = k + 1
end
local nc = tonumber(ARGV[a])
a = a + 1
local cstart = k
local cfail, cidx = 0, 0
for i = 1, nc do
  local max = tonumber(ARGV[a])
  a = a + 1
  local h = redis.call('HGETALL', KEYS[k])
  local total = 0
  for j = 1, #h, 2 do
    local f = h[j]
    if f == proc or redis.call('EXISTS', alive .. f) == 1 then
      total = total + tonumber(h[j + 1])
    else
      redis.call('HDEL', KEYS[k], f)  -- a process that died holding slots
    end
  end
  if cfail == 0 and total >= max then cfail, cidx = 1, i end
  k = k + 1
end
local function reply(ok, failure, idx, wait, used)
  local r = {ok, failure, idx, string.format('%.6f', wait), used}
  for i = 1, nb do r[#r + 1] = string.format('%.6f', levels[i]) end
  return r
end
if qfail == 1 then return reply(0, 'quota', qidx, 0, qused) end
if rfail == 1 then return reply(0, 'rate', ridx, rwait, 0) end
if cfail == 1 then return reply(0, 'concurrency', cidx, 1, 0) end
for i = 1, nb do
  levels[i] = levels[i] - needs[i]
  store(KEYS[i], levels[i], caps[i])
end
a = 5 + 2 * nb + 1
for i = 0, nq - 1 do
  redis.call('INCRBY', KEYS[qstart + i], cost)
  redis.call('EXPIREAT', KEYS[qstart + i], ARGV[a + 2 * i + 1])
end
for i = 0, nc - 1 do
  redis.call('HINCRBY', KEYS[cstart + i], proc, 1)
end
return reply(1, '', 0, 0, 0)
"""

# KEYS: tpm buckets (nb), quotas (nq), concurrency hashes (nc), then the settle's own marker.
# ARGV: refund (charged - actual, may be negative), process id, nb, [capacity]*nb, nq, nc.
# The marker makes a settle idempotent: a batch resent after a connection broke mid-way (some of
# it applied, some not) applies each settle once. It lives a minute (the sender resends within
# seconds of Redis answering again): at 1,000 requests a second, some 60,000 small keys.
SETTLE = """
if redis.call('SET', KEYS[#KEYS], '1', 'NX', 'PX', 60000) == false then return 0 end
""" + _LUA_BUCKETS + """
local refund = tonumber(ARGV[1])
local proc = ARGV[2]
local nb = tonumber(ARGV[3])
local k = 1
for i = 1, nb do
  local cap = tonumber(ARGV[3 + i])
  if refund ~= 0 then
    local lvl = level(KEYS[k], cap) + refund
    if lvl > cap then lvl = cap end
    store(KEYS[k], lvl, cap)
  end
  k = k + 1
end
local nq = tonumber(ARGV[4 + nb])
local nc = tonumber(ARGV[5 + nb])
for i = 1, nq do
  -- A counter that expired (its period is long over) is not brought back.
  if refund ~= 0 and redis.call('EXISTS', KEYS[k]) == 1 then
    redis.call('DECRBY', KEYS[k], refund)
  end
  k = k + 1
end
for i = 1, nc do
  if redis.call('HINCRBY', KEYS[k], proc, -1) <= 0 then redis.call('HDEL', KEYS[k], proc) end
  k = k + 1
end
return 1
"""

_QUOTA_GRACE_S = 2 * 86400


def _sid(s: Subject) -> str:
    return f"{s.kind}:{s.id}"


class _RedisGrant(Grant):
    __slots__ = ("_backend", "_keys", "_caps", "_nq", "_nc")

    def __init__(
        self,
        headers: dict[str, str],
        cost: int,
        backend: RedisBackend,
        keys: list[str],
        caps: list[int],
        nq: int,
        nc: int,
    ) -> None:
        super().__init__(headers, cost)
        self._backend = backend
        self._keys = keys
        self._caps = caps
        self._nq = nq
        self._nc = nc

    def _settle(self, actual: int) -> None:
        refund = self.cost - actual
        if refund == 0 and not self._nc:
            return
        b = self._backend
        args: list[Any] = [refund, b.process_id, len(self._caps), *self._caps, self._nq, self._nc]
        b.enqueue_settle([*self._keys, f"{b.prefix}s:{b.process_id}:{next(b.settle_ids)}"], args)


class RedisBackend(Backend):
    name = "redis"

    def __init__(
        self,
        *,
        url: str = "redis://127.0.0.1:6379/0",
        fail_open: bool = False,
        timeout_s: float = 1.0,
        prefix: str = "{fg}:",
        process_ttl_s: float = 15.0,
        max_pending_settles: int = 100_000,
        log_every_s: float = 10.0,
        max_connections: int = 64,
    ) -> None:
        self.url = url
        self.max_connections = max_connections
        self.fail_open = fail_open
        self.timeout_s = timeout_s
        self.prefix = prefix
        self.process_ttl_s = process_ttl_s
        self.log_every_s = log_every_s
        # Unique per backend instance: the field this process's slots are counted under.
        self.process_id = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self._alive_prefix = f"{prefix}p:"
        self._client: aioredis.Redis | None = None
        self._admit: Any = None
        self._settle: Any = None
        self._pending: collections.deque[tuple[list[str], list[Any]]] = collections.deque()
        self._max_pending = max_pending_settles
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._flush_lock: asyncio.Lock | None = None
        self.settle_ids = itertools.count()
        self._periods_now = quotas.PeriodKeys()
        self._tasks: list[asyncio.Task[None]] = []
        self._last_log = -math.inf
        self._unlogged = 0
        self._closed = False

    # -- connection and the tasks beside the data plane -----------------------------------------

    def _connect(self) -> aioredis.Redis:
        if self._client is None:
            # Bounded: when Redis is slow, requests wait up to timeout_s for a connection and
            # then fail closed (or open), instead of opening one connection each.
            pool = aioredis.BlockingConnectionPool.from_url(
                self.url,
                max_connections=self.max_connections,
                timeout=self.timeout_s,
                socket_timeout=self.timeout_s,
                socket_connect_timeout=self.timeout_s,
            )
            self._client = aioredis.Redis(connection_pool=pool)
            self._admit = self._client.register_script(ADMIT)
            self._settle = self._client.register_script(SETTLE)
        return self._client

    async def start(self) -> None:
        self._connect()
        with contextlib.suppress(RedisError, OSError):
            await self._heartbeat_once()
        self._tasks = [
            asyncio.create_task(self._heartbeat(), name="limits-redis-heartbeat"),
            asyncio.create_task(self._sender(), name="limits-redis-settle"),
        ]

    async def close(self) -> None:
        """Stop the tasks, send what is pending (bounded wait), let go of this process's slots.

        The tasks are asked to stop rather than cancelled mid-command: a Redis command
        cancelled half-way can leave its connection unusable. Whatever doesn't finish within
        a few timeouts is cancelled and left behind.
        """
        if self._closed:
            return
        self._closed = True
        self._stopping.set()
        self._wake.set()
        await _bounded(self._tasks, 5 * self.timeout_s)
        if self._client is not None:
            final = asyncio.create_task(self._final(), name="limits-redis-close")
            await _bounded([final], 5 * self.timeout_s)
            await self._client.aclose()
            self._client = None

    async def _final(self) -> None:
        client = self._connect()
        with contextlib.suppress(RedisError, OSError):
            await self.flush()
        with contextlib.suppress(RedisError, OSError):
            await client.delete(self._alive_prefix + self.process_id)

    async def _heartbeat_once(self) -> None:
        client = self._connect()
        await client.set(
            self._alive_prefix + self.process_id, b"1", px=int(self.process_ttl_s * 1000)
        )

    async def _heartbeat(self) -> None:
        while not self._stopping.is_set():
            try:
                await self._heartbeat_once()
            except (RedisError, OSError) as e:
                self._loud(f"cannot refresh this process's liveness key in Redis: {e}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.process_ttl_s / 3)

    def enqueue_settle(self, keys: list[str], args: list[Any]) -> None:
        if len(self._pending) >= self._max_pending:
            # Bounded: with Redis gone for long, its counters are wrong anyway (fail closed
            # refuses everything; fail open counts nothing).
            self._loud("too many settles pending (Redis unreachable?): dropping this one")
            return
        self._pending.append((keys, args))
        self._wake.set()

    async def flush(self) -> None:
        """Send every settle pending now (pipelined, 256 a round trip). Raises if Redis fails."""
        if self._flush_lock is None:
            self._flush_lock = asyncio.Lock()
        async with self._flush_lock:
            while self._pending:
                batch = [self._pending[i] for i in range(min(256, len(self._pending)))]
                client = self._connect()
                async with client.pipeline(transaction=False) as pipe:
                    for keys, args in batch:
                        await self._settle(keys=keys, args=args, client=pipe)
                    await pipe.execute()
                for _ in batch:
                    self._pending.popleft()

    async def _sender(self) -> None:
        backoff = 0.05
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._closed:
                return  # close() sends the rest
            try:
                await self.flush()
                backoff = 0.05
            except (RedisError, OSError) as e:
                self._loud(f"cannot settle {len(self._pending)} requests in Redis yet: {e}")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), backoff)
                backoff = min(2.0, backoff * 2)
                self._wake.set()

    def _loud(self, message: str) -> None:
        now = time.monotonic()
        if now - self._last_log >= self.log_every_s:
            extra = f" ({self._unlogged} more like it since the last report)" if self._unlogged else ""
            log.error("limits (redis %s): %s%s", self.process_id, message, extra)
            self._last_log = now
            self._unlogged = 0
        else:
            self._unlogged += 1

    # -- admission ------------------------------------------------------------------------------

    def admit(self, checks: Checks, cost: int) -> Awaitable[Grant]:
        return self._admit_async(checks, cost)

    async def _admit_async(self, checks: Checks, cost: int) -> Grant:
        p = self.prefix
        buckets: list[tuple[int, Failure, int]] = []  # (limit index, kind, capacity)
        bkeys: list[str] = []
        args: list[Any] = [cost, self.process_id, self._alive_prefix, 0]
        for i, (subject, lim) in enumerate(checks.limits):
            if lim.rpm is not None:
                buckets.append((i, "rpm", lim.rpm))
                bkeys.append(f"{p}b:r:{_sid(subject)}")
                args += [lim.rpm, 1]
            if lim.tpm is not None:
                buckets.append((i, "tpm", lim.tpm))
                bkeys.append(f"{p}b:t:{_sid(subject)}")
                args += [lim.tpm, cost]
        args[3] = len(buckets)
        wall = time.time()
        qkeys: list[str] = []
        args.append(len(checks.quotas))
        for subject, quota in checks.quotas:
            pk, end = self._periods_now.get(quota.period, wall)
            qkeys.append(f"{p}q:{_sid(subject)}:{pk}")
            args += [quota.tokens, int(end) + _QUOTA_GRACE_S]
        ckeys = [f"{p}c:{_sid(s)}" for s, lim in checks.limits if lim.max_concurrent is not None]
        cidx = [i for i, (_, lim) in enumerate(checks.limits) if lim.max_concurrent is not None]
        args.append(len(ckeys))
        args += [lim.max_concurrent for _, lim in checks.limits if lim.max_concurrent is not None]
        try:
            self._connect()
            r = await self._admit(keys=bkeys + qkeys + ckeys, args=args)
        except (RedisError, OSError) as e:
            if self.fail_open:
                self._loud(f"Redis unreachable, letting requests through UNCOUNTED: {e}")
                return NO_LIMITS
            self._loud(f"Redis unreachable, refusing requests (fail closed): {e}")
            raise LimitsUnavailable(
                "The gateway can't reach its limits store; try again shortly.", retry_after=2
            ) from None
        ok, failure, index, wait, used = int(r[0]), _s(r[1]), int(r[2]), float(r[3]), int(r[4])
        levels = [float(x) for x in r[5:]]
        reqs = [RateView.of(c, lv) for (_, kind, c), lv in zip(buckets, levels, strict=True)
                if kind == "rpm"]
        toks = [RateView.of(c, lv) for (_, kind, c), lv in zip(buckets, levels, strict=True)
                if kind == "tpm"]
        if not ok:
            out = Outcome("", 0, wait, reqs, toks, used)
            if failure == "quota":
                out.failed, out.index = "quota", index - 1
            elif failure == "rate":
                li, kind, _ = buckets[index - 1]
                out.failed, out.index = kind, li
            else:
                out.failed, out.index = "concurrency", cidx[index - 1]
            raise refusal(out, checks, cost, wall)
        headers = Outcome("", 0, 0.0, reqs, toks).headers()
        tkeys = [k for k, (_, kind, _) in zip(bkeys, buckets, strict=True) if kind == "tpm"]
        tcaps = [c for _, kind, c in buckets if kind == "tpm"]
        return _RedisGrant(
            headers, cost, self, tkeys + qkeys + ckeys, tcaps, len(qkeys), len(ckeys)
        )

    # -- reading, for reports and tests ---------------------------------------------------------

    async def quota_used(self, subject: Subject, quota: Quota) -> int:
        key = f"{self.prefix}q:{_sid(subject)}:{quotas.period_key(time.time(), quota.period)}"
        v = await self._connect().get(key)
        return int(v or 0)

    async def in_flight(self, subject: Subject) -> int:
        h = await self._connect().hgetall(f"{self.prefix}c:{_sid(subject)}")
        return sum(int(v) for v in h.values())

    async def seed_quota(self, subject: Subject, quota: Quota, used: int, now_wall: float) -> None:
        """Redis keeps quotas across restarts; seed only a counter that doesn't exist (SET NX)."""
        pk = quotas.period_key(now_wall, quota.period)
        end = int(quotas.period_end(now_wall, quota.period).timestamp()) + _QUOTA_GRACE_S
        client = self._connect()
        key = f"{self.prefix}q:{_sid(subject)}:{pk}"
        if await client.set(key, used, nx=True):
            await client.expireat(key, end)


async def _bounded(tasks: list[asyncio.Task[None]], timeout_s: float) -> None:
    """Wait for tasks to end, at most ``timeout_s``; cancel (without waiting on) the rest."""
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=timeout_s)
    for t in pending:
        t.cancel()


def _s(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v
