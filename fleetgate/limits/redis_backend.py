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

from fleetgate.clock import Clock
from fleetgate.errors import LimitsUnavailable
from fleetgate.limits import quotas
from fleetgate.limits.backend import NO_LIMITS, Backend, Failure, Grant, Outcome, refusal
from fleetgate.limits.headers import RateView, rate_head
from fleetgate.limits.redis_lua import ADMIT, SETTLE
from fleetgate.limits.resp import Resp, RespError, bulk, encode
from fleetgate.limits.spec import Checks, Quota, Subject

log = logging.getLogger("fleetgate.limits")

# The clocks this module reads; tests move them (see fleetgate/clock.py).
clock: Clock = time

_QUOTA_GRACE_S = 2 * 86400
_PLAN_LIMIT = 50_000  # compiled checks kept; past it the cache starts again


def _sid(s: Subject) -> str:
    return f"{s.kind}:{s.id}"


def _bulk(value: int) -> bytes:
    """One integer as a RESP bulk string (what :func:`fleetgate.limits.resp.encode` writes)."""
    return bulk(b"%d" % value)


class _Plan:
    """One :class:`Checks` compiled for this backend, for the quota periods that hold now: the
    keys, the script arguments, and both scripts' commands already encoded, but for the
    request's cost (admit) and its refund and settle id (settle). ``admit`` joins the admit
    command's pieces with the cost; nothing else is formatted per request."""

    __slots__ = (
        "checks", "valid_from", "valid_until", "buckets", "cidx", "wall", "admit_parts",
        "tcaps", "nq", "nc", "settle_head", "settle_tail",
    )

    def __init__(self, b: RedisBackend, checks: Checks, wall: float) -> None:
        p = b.prefix
        self.checks = checks
        self.buckets: list[tuple[int, Failure, int]] = []  # (limit index, kind, capacity)
        bkeys: list[str] = []
        args: list[Any] = [_COST, b.process_id, b._alive_prefix, 0]
        for i, (subject, lim) in enumerate(checks.limits):
            if lim.rpm is not None:
                self.buckets.append((i, "rpm", lim.rpm))
                bkeys.append(f"{p}b:r:{_sid(subject)}")
                args += [lim.rpm, 1]
            if lim.tpm is not None:
                self.buckets.append((i, "tpm", lim.tpm))
                bkeys.append(f"{p}b:t:{_sid(subject)}")
                args += [lim.tpm, _COST]
        args[3] = len(self.buckets)
        qkeys: list[str] = []
        args.append(len(checks.quotas))
        self.valid_from, self.valid_until = -math.inf, math.inf
        for subject, quota in checks.quotas:
            pk, start, end = b._periods_now.span(quota.period, wall)
            self.valid_from, self.valid_until = max(self.valid_from, start), min(self.valid_until, end)
            qkeys.append(f"{p}q:{_sid(subject)}:{pk}")
            args += [quota.tokens, int(end) + _QUOTA_GRACE_S]
        ckeys = [f"{p}c:{_sid(s)}" for s, lim in checks.limits if lim.max_concurrent is not None]
        self.cidx = [i for i, (_, lim) in enumerate(checks.limits) if lim.max_concurrent is not None]
        args.append(len(ckeys))
        args += [lim.max_concurrent for _, lim in checks.limits if lim.max_concurrent is not None]
        keys = bkeys + qkeys + ckeys
        # The admit command, cut where the cost goes (at a marker no UTF-8 key can hold).
        marker = b"\xff\xfecost\xff"
        whole = encode(("EVALSHA", b._admit, len(keys), *keys,
                        *(marker if a is _COST else a for a in args)))
        self.admit_parts = whole.split(bulk(marker))
        # The settle command: KEYS tpm buckets, quotas, concurrency hashes, then the settle id;
        # ARGV refund, process id, the tpm capacities, nq, nc. The id and the refund are the
        # request's own, one after the other.
        tkeys = [k for k, (_, kind, _) in zip(bkeys, self.buckets, strict=True) if kind == "tpm"]
        self.tcaps = [c for _, kind, c in self.buckets if kind == "tpm"]
        self.nq, self.nc = len(qkeys), len(ckeys)
        skeys = tkeys + qkeys + ckeys
        head = encode(("EVALSHA", b._settle, len(skeys) + 1, *skeys))
        tail = encode((b.process_id, len(self.tcaps), *self.tcaps, self.nq, self.nc))
        # encode() writes the array length first: fix both halves' counts into one array.
        n = 3 + len(skeys) + 1 + 1 + 2 + len(self.tcaps) + 2
        self.settle_head = b"*%d\r\n" % n + head.split(b"\r\n", 1)[1]
        self.settle_tail = tail.split(b"\r\n", 1)[1]

    def current(self, checks: Checks, wall: float) -> bool:
        return self.checks is checks and self.valid_from <= wall < self.valid_until


_COST = object()  # where the request's cost goes in a plan's admit arguments


class _RedisGrant(Grant):
    __slots__ = ("_backend", "_plan")

    def __init__(self, head: bytes, cost: int, backend: RedisBackend, plan: _Plan) -> None:
        super().__init__(head, cost)
        self._backend = backend
        self._plan = plan

    def _settle(self, actual: int) -> None:
        refund = self.cost - actual
        plan = self._plan
        if refund == 0 and not plan.nc:
            return
        b = self._backend
        settle_id = f"{b.prefix}s:{b.process_id}:{next(b.settle_ids)}".encode()
        b.enqueue_settle(
            plan.settle_head + bulk(settle_id) + _bulk(refund) + plan.settle_tail)


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
        max_in_flight: int = 100_000,
    ) -> None:
        self.url = url
        self.max_in_flight = max_in_flight
        self.fail_open = fail_open
        self.timeout_s = timeout_s
        self.prefix = prefix
        self.process_ttl_s = process_ttl_s
        self.log_every_s = log_every_s
        # Unique per backend instance: the field this process's slots are counted under.
        self.process_id = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self._alive_prefix = f"{prefix}p:"
        self._client: Resp | None = None
        self._admit = b""  # the scripts' SHA1s, once registered
        self._settle = b""
        self._pending: collections.deque[bytes] = collections.deque()  # settle commands
        self._plans: dict[int, _Plan] = {}
        self._max_pending = max_pending_settles
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._flush_lock: asyncio.Lock | None = None
        self.settle_ids = itertools.count()
        self._periods_now = quotas.PeriodKeys()
        self._tasks: list[asyncio.Task[None]] = []
        # kind of trouble -> (when last logged, how many since): each kind rate-limited alone.
        self._logged: dict[str, tuple[float, int]] = {}
        self._closed = False

    # -- connection and the tasks beside the data plane -----------------------------------------

    def _connect(self) -> Resp:
        if self._client is None:
            # One pipelined connection (fleetgate.limits.resp): every command has a deadline of
            # timeout_s, after which requests fail closed (or open), and commands in flight are
            # bounded.
            self._client = Resp(self.url, timeout_s=self.timeout_s,
                                max_pending=self.max_in_flight)
            self._admit = self._client.script(ADMIT)
            self._settle = self._client.script(SETTLE)
        return self._client

    async def start(self) -> None:
        self._connect()
        with contextlib.suppress(RespError, OSError):
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
        with contextlib.suppress(RespError, OSError):
            await self.flush()
        with contextlib.suppress(RespError, OSError):
            await client.call("DEL", self._alive_prefix + self.process_id)

    async def _heartbeat_once(self) -> None:
        client = self._connect()
        await client.call(
            "SET", self._alive_prefix + self.process_id, b"1", "PX", int(self.process_ttl_s * 1000)
        )

    async def _heartbeat(self) -> None:
        while not self._stopping.is_set():
            try:
                await self._heartbeat_once()
            except (RespError, OSError) as e:
                self._loud("heartbeat", f"cannot refresh this process's liveness key in Redis: {e}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.process_ttl_s / 3)

    def enqueue_settle(self, command: bytes) -> None:
        if len(self._pending) >= self._max_pending:
            # Bounded: with Redis gone for long, its counters are wrong anyway (fail closed
            # refuses everything; fail open counts nothing).
            self._loud("dropped", "too many settles pending (Redis unreachable?): dropping this one")
            return
        self._pending.append(command)
        self._wake.set()

    async def flush(self) -> None:
        """Send every settle pending now (pipelined, 256 a round trip). Raises if Redis fails."""
        if self._flush_lock is None:
            self._flush_lock = asyncio.Lock()
        async with self._flush_lock:
            while self._pending:
                batch = [self._pending[i] for i in range(min(256, len(self._pending)))]
                replies = await self._connect().evalsha_encoded(self._settle, batch)
                for r in replies:
                    if isinstance(r, RespError):
                        raise r
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
            except (RespError, OSError) as e:
                self._loud("settle", f"cannot settle {len(self._pending)} requests in Redis yet: {e}")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), backoff)
                backoff = min(2.0, backoff * 2)
                self._wake.set()

    def _loud(self, kind: str, message: str) -> None:
        now = clock.monotonic()
        last, since = self._logged.get(kind, (-math.inf, 0))
        if now - last >= self.log_every_s:
            extra = f" ({since} more like it since the last report)" if since else ""
            log.error("limits (redis %s): %s%s", self.process_id, message, extra)
            self._logged[kind] = (now, 0)
        else:
            self._logged[kind] = (last, since + 1)

    # -- admission ------------------------------------------------------------------------------

    def admit(self, checks: Checks, cost: int) -> Awaitable[Grant]:
        return self._admit_async(checks, cost)

    async def _admit_async(self, checks: Checks, cost: int) -> Grant:
        client = self._connect()  # (registers the scripts a plan's commands name)
        wall = clock.time()
        plan = self._plans.get(id(checks))
        if plan is None or not plan.current(checks, wall):
            if len(self._plans) >= _PLAN_LIMIT:
                self._plans.clear()
            plan = self._plans[id(checks)] = _Plan(self, checks, wall)
        try:
            r = await client.evalsha_one(self._admit, _bulk(cost).join(plan.admit_parts))
        except (RespError, OSError) as e:
            if self.fail_open:
                self._loud("admit", f"Redis unreachable, letting requests through UNCOUNTED: {e}")
                return NO_LIMITS
            self._loud("admit", f"Redis unreachable, refusing requests (fail closed): {e}")
            raise LimitsUnavailable(
                "The gateway can't reach its limits store; try again shortly.", retry_after=2
            ) from None
        buckets = plan.buckets
        levels = [float(x) for x in r[5:]]
        if not int(r[0]):
            failure, index, wait, used = _s(r[1]), int(r[2]), float(r[3]), int(r[4])
            reqs = [RateView.of(c, lv) for (_, kind, c), lv in zip(buckets, levels, strict=True)
                    if kind == "rpm"]
            toks = [RateView.of(c, lv) for (_, kind, c), lv in zip(buckets, levels, strict=True)
                    if kind == "tpm"]
            out = Outcome("", 0, wait, reqs, toks, used)
            if failure == "quota":
                out.failed, out.index = "quota", index - 1
            elif failure == "rate":
                li, kind, _ = buckets[index - 1]
                out.failed, out.index = kind, li
            else:
                out.failed, out.index = "concurrency", plan.cidx[index - 1]
            raise refusal(out, checks, cost, wall)
        # The most restrictive of each kind (fewest remaining, then the smaller limit), as
        # most_restrictive() picks it; an admitted request leaves no bucket below zero.
        r_best: tuple[float, int] | None = None
        t_best: tuple[float, int] | None = None
        for (_, kind, c), lv in zip(buckets, levels, strict=True):
            if kind == "rpm":
                if r_best is None or (lv // 1, c) < (r_best[0] // 1, r_best[1]):
                    r_best = (lv, c)
            elif t_best is None or (lv // 1, c) < (t_best[0] // 1, t_best[1]):
                t_best = (lv, c)
        headers = rate_head(
            None if r_best is None else r_best[1], 0.0 if r_best is None else r_best[0],
            None if t_best is None else t_best[1], 0.0 if t_best is None else t_best[0],
        )
        return _RedisGrant(headers, cost, self, plan)

    # -- reading, for reports and tests ---------------------------------------------------------

    async def quota_used(self, subject: Subject, quota: Quota) -> int:
        key = f"{self.prefix}q:{_sid(subject)}:{quotas.period_key(clock.time(), quota.period)}"
        v = await self._connect().call("GET", key)
        return int(v or 0)

    async def in_flight(self, subject: Subject) -> int:
        h = await self._connect().call("HGETALL", f"{self.prefix}c:{_sid(subject)}")
        return sum(int(v) for v in h[1::2])

    async def seed_quota(self, subject: Subject, quota: Quota, used: int, now_wall: float) -> None:
        """Redis keeps quotas across restarts; seed only a counter that doesn't exist (SET NX)."""
        pk = quotas.period_key(now_wall, quota.period)
        end = int(quotas.period_end(now_wall, quota.period).timestamp()) + _QUOTA_GRACE_S
        client = self._connect()
        key = f"{self.prefix}q:{_sid(subject)}:{pk}"
        if await client.call("SET", key, used, "NX") is not None:
            await client.call("EXPIREAT", key, end)


async def _bounded(tasks: list[asyncio.Task[None]], timeout_s: float) -> None:
    """Wait for tasks to end, at most ``timeout_s``; cancel (without waiting on) the rest."""
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=timeout_s)
    for t in pending:
        t.cancel()


def _s(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v
