"""Python load generators for what wrk can't do: a fixed-rate open loop, and timed streams.

Both sit on :class:`HttpConn`, a minimal HTTP/1.1 keep-alive client on an asyncio Protocol
(content-length and chunked bodies, no pipelining). It is used instead of aiohttp because its
cost per request is a few microseconds, so the generator takes little of the CPU that the path
under test needs on a 2-core box, and the arrival of every body chunk is timed where it lands.

- :func:`open_loop` sends at a fixed rate whatever the responses do (a new connection when none
  is idle), so a slow path can't slow the load down (no coordinated omission). Latency is taken
  from the moment a request is written; ``lag`` reports how late the writes were against the
  schedule, which shows whether the generator itself kept up.
- :func:`stream_load` runs ``concurrency`` workers, each posting a streamed request and timing
  the first SSE event (TTFT) and the gaps between arrivals.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

_now = time.perf_counter


@dataclass(slots=True)
class Target:
    host: str
    port: int
    path: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)

    def request_bytes(self) -> bytes:
        lines = [f"POST {self.path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        hs = {"Content-Type": "application/json", **self.headers}
        lines += [f"{k}: {v}" for k, v in hs.items()]
        lines.append(f"Content-Length: {len(self.body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + self.body


@dataclass(slots=True)
class Response:
    status: int = 0
    sent_at: float = 0.0
    ended_at: float = 0.0
    first_event_at: float | None = None
    arrivals: list[float] = field(default_factory=list)
    saw_done: bool = False
    body_bytes: int = 0


class HttpConn(asyncio.Protocol):
    """One keep-alive connection; one request in flight at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._buf = bytearray()
        self._fut: asyncio.Future[Response] | None = None
        self._resp = Response()
        self._track = False
        self._phase = "idle"  # idle | head | length | chunked
        self._left = 0  # body bytes left (length) or bytes left in this chunk, CRLF included
        self._reuse = True

    @classmethod
    async def open(cls, host: str, port: int) -> HttpConn:
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_connection(cls, host, port)
        return proto

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._fut is not None and not self._fut.done():
            self._fut.set_exception(ConnectionError("connection closed mid-response"))

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def request(self, data: bytes, *, track_events: bool = False) -> asyncio.Future[Response]:
        assert self._phase == "idle" and self.transport is not None
        self._fut = asyncio.get_running_loop().create_future()
        self._resp = Response(sent_at=_now())
        self._track = track_events
        self._phase = "head"
        self._buf.clear()
        self.transport.write(data)
        return self._fut

    # -- parsing ------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        t = _now()
        self._buf += data
        if self._phase == "head":
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self._buf[:end]).lower()
            del self._buf[: end + 4]
            first, *hdrs = head.split(b"\r\n")
            self._resp.status = int(first.split(b" ", 2)[1])
            self._phase, self._left = "length", 0
            for h in hdrs:
                name, _, value = h.partition(b":")
                name, value = name.strip(), value.strip()
                if name == b"content-length":
                    self._left = int(value)
                elif name == b"transfer-encoding" and b"chunked" in value:
                    self._phase = "chunked"
                elif name == b"connection" and value == b"close":
                    self._reuse = False
            if self._phase == "length" and self._left == 0:
                self._finish(t)
                return
        if self._phase == "length":
            take = min(self._left, len(self._buf))
            self._body(bytes(self._buf[:take]), t)
            del self._buf[:take]
            self._left -= take
            if self._left == 0:
                self._finish(t)
        elif self._phase == "chunked":
            self._chunked(t)

    def _chunked(self, t: float) -> None:
        buf = self._buf
        while True:
            if self._left == 0:
                nl = buf.find(b"\r\n")
                if nl < 0:
                    return
                size = int(bytes(buf[:nl]).split(b";")[0], 16)
                if size == 0:
                    if buf.find(b"\r\n", nl + 2) < 0:  # the last CRLF (no trailers expected)
                        return
                    buf.clear()
                    self._finish(t)
                    return
                del buf[: nl + 2]
                self._left = size + 2
            if not buf:
                return
            take = min(self._left, len(buf))
            payload = take if self._left - take >= 2 else max(0, self._left - 2)
            self._body(bytes(buf[:payload]), t)
            del buf[:take]
            self._left -= take

    def _body(self, piece: bytes, t: float) -> None:
        if not piece:
            return
        r = self._resp
        r.body_bytes += len(piece)
        if self._track and b"data:" in piece:
            if r.first_event_at is None:
                r.first_event_at = t
            r.arrivals.append(t)
            if b"[DONE]" in piece:
                r.saw_done = True

    def _finish(self, t: float) -> None:
        self._phase = "idle"
        self._resp.ended_at = t
        fut, self._fut = self._fut, None
        if not self._reuse:
            self.close()
        if fut is not None and not fut.done():
            fut.set_result(self._resp)


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100); NaN for no values."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(p / 100 * len(s)) - 1))
    return s[k]


# -- open loop -----------------------------------------------------------------------------------


@dataclass
class OpenLoopResult:
    rate: float
    sent: int
    ok: int
    errors: int
    achieved_rps: float
    latencies_ms: list[float]
    lag_p99_ms: float
    connections: int

    def summary(self) -> dict[str, float]:
        lat = self.latencies_ms
        return {
            "target_rps": self.rate,
            "achieved_rps": round(self.achieved_rps, 1),
            "sent": self.sent,
            "ok": self.ok,
            "errors": self.errors,
            "p50_ms": percentile(lat, 50),
            "p90_ms": percentile(lat, 90),
            "p99_ms": percentile(lat, 99),
            "p999_ms": percentile(lat, 99.9),
            "max_ms": max(lat) if lat else float("nan"),
            "lag_p99_ms": self.lag_p99_ms,
            "connections": self.connections,
        }


async def open_loop(
    target: Target,
    rate: float,
    duration_s: float,
    *,
    warmup_s: float = 1.0,
    prewarm_connections: int = 8,
    max_connections: int = 1024,
    timeout_s: float = 10.0,
) -> OpenLoopResult:
    """Send ``rate`` requests/s for ``warmup_s + duration_s``; measure those after the warm-up."""
    req = target.request_bytes()
    idle = [await HttpConn.open(target.host, target.port) for _ in range(prewarm_connections)]
    opened = len(idle)
    latencies: list[float] = []
    lags: list[float] = []
    ok = errors = 0
    n_warm = int(rate * warmup_s)
    total = n_warm + int(rate * duration_s)
    tasks: set[asyncio.Task[None]] = set()

    async def one(i: int, due: float) -> None:
        nonlocal ok, errors, opened
        conn = None
        while idle and conn is None:
            c = idle.pop()
            conn = None if c.closed else c
        try:
            if conn is None:
                if opened >= max_connections:
                    raise ConnectionError("connection cap reached")
                opened += 1
                conn = await HttpConn.open(target.host, target.port)
            resp = await asyncio.wait_for(conn.request(req), timeout_s)
        except (OSError, TimeoutError):
            if i >= n_warm:
                errors += 1
            if conn is not None:
                conn.close()
            return
        if not conn.closed:
            idle.append(conn)
        if i >= n_warm:
            if resp.status == 200:
                ok += 1
                latencies.append((resp.ended_at - resp.sent_at) * 1000)
                lags.append((resp.sent_at - due) * 1000)
            else:
                errors += 1

    start = _now() + 0.01
    i = 0
    measured_from = start + n_warm / rate
    while i < total:
        now = _now()
        due = start + i / rate
        if due > now:
            await asyncio.sleep(due - now)
            continue
        t = asyncio.create_task(one(i, due))
        tasks.add(t)
        t.add_done_callback(tasks.discard)
        i += 1
    sent_end = _now()
    if tasks:
        await asyncio.wait(list(tasks), timeout=timeout_s + 1)
    for c in idle:
        c.close()
    span = max(1e-9, sent_end - measured_from)
    return OpenLoopResult(
        rate=rate,
        sent=total - n_warm,
        ok=ok,
        errors=errors,
        achieved_rps=ok / span,
        latencies_ms=latencies,
        lag_p99_ms=percentile(lags, 99),
        connections=opened,
    )


# -- streams -------------------------------------------------------------------------------------


@dataclass
class StreamResult:
    started: int = 0
    completed: int = 0
    failed: int = 0
    peak_in_flight: int = 0
    ttft_ms: list[float] = field(default_factory=list)
    gaps_ms: list[float] = field(default_factory=list)
    durations_ms: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict[str, float]:
        return {
            "started": self.started,
            "completed": self.completed,
            "failed": self.failed,
            "peak_in_flight": self.peak_in_flight,
            "ttft_p50_ms": percentile(self.ttft_ms, 50),
            "ttft_p99_ms": percentile(self.ttft_ms, 99),
            "gap_p50_ms": percentile(self.gaps_ms, 50),
            "gap_p99_ms": percentile(self.gaps_ms, 99),
            "duration_p50_ms": percentile(self.durations_ms, 50),
        }


async def stream_load(
    target: Target,
    concurrency: int,
    *,
    duration_s: float | None = None,
    streams_per_worker: int | None = None,
    ramp_s: float = 0.0,
    timeout_s: float = 120.0,
) -> StreamResult:
    """``concurrency`` workers post streamed requests until ``duration_s`` or their count is done."""
    assert duration_s is not None or streams_per_worker is not None
    req = target.request_bytes()
    res = StreamResult()
    in_flight = 0
    deadline = _now() + ramp_s + (duration_s if duration_s is not None else 1e9)

    def fail(kind: str) -> None:
        res.failed += 1
        res.errors[kind] = res.errors.get(kind, 0) + 1

    async def worker(w: int) -> None:
        nonlocal in_flight
        if ramp_s:
            await asyncio.sleep(ramp_s * w / concurrency)
        conn: HttpConn | None = None
        done = 0
        while _now() < deadline and (streams_per_worker is None or done < streams_per_worker):
            done += 1
            res.started += 1
            in_flight += 1
            res.peak_in_flight = max(res.peak_in_flight, in_flight)
            try:
                if conn is None or conn.closed:
                    conn = await HttpConn.open(target.host, target.port)
                r = await asyncio.wait_for(conn.request(req, track_events=True), timeout_s)
            except (OSError, TimeoutError) as e:
                fail(type(e).__name__)
                if conn is not None:
                    conn.close()
                conn = None
                continue
            finally:
                in_flight -= 1
            if r.status != 200 or not r.saw_done or r.first_event_at is None:
                fail(f"status {r.status}" if r.status != 200 else "incomplete")
                continue
            res.completed += 1
            res.ttft_ms.append((r.first_event_at - r.sent_at) * 1000)
            res.durations_ms.append((r.ended_at - r.sent_at) * 1000)
            a = r.arrivals
            res.gaps_ms.extend((a[k] - a[k - 1]) * 1000 for k in range(1, len(a)))
        if conn is not None:
            conn.close()

    workers = [asyncio.create_task(worker(w)) for w in range(concurrency)]
    try:
        await asyncio.gather(*workers)
    finally:
        for t in workers:
            t.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.gather(*workers, return_exceptions=True)
    return res
