"""Evidence for issue 9's bar "limits add no database round trip to the request path".

An in-process gateway (the real pipeline, a real simulator upstream, SQLite) with everything
admission can check on one caller: a user in a group with ``rpm`` and ``tpm``, a token quota on
the user, and a model ``rpm``. Every SQL statement the store's engine sends is seen by a
``before_cursor_execute`` listener and attributed to the ``fleetgate`` function that issued it
(the innermost one on the stack), so each count says who ran the query, not only how many.

- With the two control-plane tasks that touch the store parked (the usage writer's interval and
  the key poll set to an hour), N admitted requests and one refused by the quota run **zero**
  statements, for N = 50 and N = 200; the usage writer then writes all N rows in one batch: a
  statement per power of two in N (``repo._sqlite_sizes``: 50 rows are 32, 16 and 2).
- With them running at their usual pace (a batch every 0.1 s, a key poll every 0.2 s), every
  statement seen during the load comes from the usage writer or the key poll, and the writer's
  statements are bounded by its ticks, not by N.
- With ``limits.backend: redis`` (a real ``redis-server``), the commands Redis receives are read
  off its ``MONITOR`` (so whatever client the backend uses): one admission script per request,
  the settles sent beside the request path, and no SQL either.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import math
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import GW
from redis_server import RedisServer, redis_server
from sqlalchemy import Engine, event, func, select, update

from fleetgate import config
from fleetgate.app import create_app
from fleetgate.services import Context
from fleetgate.services import groups as group_svc
from fleetgate.services import users as user_svc
from fleetgate.store import repo
from fleetgate.store.tables import api_keys, usage_events

WRITER = "fleetgate.store.repo.insert_usage"
POLL = {"fleetgate.store.repo.changed_since", "fleetgate.store.repo.touch_last_used"}
QUOTA = 10**7


def _origin() -> str:
    """Who sent this statement: the outermost ``fleetgate.store.repo`` function on this thread's
    stack (``grant_by_digest``, not the helper it calls), else the innermost ``fleetgate`` one."""
    found = "?"
    f = sys._getframe(2)
    while f is not None:
        mod = f.f_globals.get("__name__", "")
        if mod == "fleetgate.store.repo" or (found == "?" and mod.startswith("fleetgate.")):
            found = f"{mod}.{f.f_code.co_name}"
        f = f.f_back  # type: ignore[assignment]
    return found


class Statements:
    """Every statement an engine executes, by origin, between :meth:`reset` and reading."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.seen: list[tuple[str, str]] = []
        event.listen(engine, "before_cursor_execute", self._on)

    def _on(self, conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        self.seen.append((_origin(), " ".join(statement.split())[:120]))

    def reset(self) -> None:
        self.seen = []

    def origins(self) -> Counter[str]:
        return Counter(o for o, _ in self.seen)

    def close(self) -> None:
        event.remove(self.engine, "before_cursor_execute", self._on)


def _settings(tmp: Path, upstream: str, *, poll_s: float, **top: Any) -> config.Settings:
    doc: dict[str, Any] = {
        "auth": {"mode": "keys", "revocation_poll_s": poll_s},
        "store": {"url": f"sqlite:///{tmp / 'fg.db'}"},
        "models": [{"name": "sim", "served_name": "upstream-name", "api_key": "upstream-secret-key",
                    "backend": {"type": "static", "urls": [upstream]},
                    "limits": {"rpm": 100_000, "tpm": 10**9}}],
        **top,
    }
    return config.parse(doc)


async def _started(s: config.Settings, *, writer_interval_s: float | None) -> GW:
    app = create_app(s)
    if writer_interval_s is not None:
        app.usage.interval_s = writer_interval_s  # read by the writer's loop, set before it runs
    await app.startup()
    return GW(app, httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw"))


async def _alice(gw: GW) -> dict[str, str]:
    """A user in a limited group, with a quota of her own; her key, loaded into the cache."""
    assert gw.app.engine is not None
    ctx = Context(gw.app.engine, gw.app.settings)
    group_svc.create_group(ctx, "research", models=["sim"],
                           limits={"rpm": 100_000, "tpm": 10**9})
    user_svc.create_user(ctx, "alice", groups=["research"], quota_tokens=QUOTA,
                         quota_period="day")
    key = gw.key("alice-1", user="alice")
    # The steady state: her key was made a while ago. A key changed in the last 2 s is in every
    # key poll's overlap window (auth/authn.py), evicted and so looked up again each time: a
    # store read per key change, on the request path, which is not what is measured here.
    with gw.app.engine.begin() as c:
        c.execute(update(api_keys).values(updated_at=repo.utcnow() - dt.timedelta(hours=1)))
    await gw.app.authn.reload()  # as at start-up: the request path finds her key in memory
    return {"Authorization": f"Bearer {key}"}


async def _load(gw: GW, h: dict[str, str], n: int) -> None:
    """``n`` admitted chats (every tenth streamed), then one that the quota refuses."""
    for i in range(n):
        body = {"model": "sim", "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 2, "stream": i % 10 == 9}
        r = await gw.client.post("/v1/chat/completions", json=body, headers=h)
        assert r.status_code == 200, r.text
        assert "x-ratelimit-limit-requests" in r.headers  # the limits were checked
    r = await gw.client.post("/v1/chat/completions", headers=h, json={
        "model": "sim", "messages": [{"role": "user", "content": "hi"}], "max_tokens": QUOTA})
    assert r.status_code == 429 and r.json()["error"]["code"] == "insufficient_quota", r.text


async def _settled(engine: Engine) -> None:
    """Wait until the control plane's start-up rounds (the first key poll) are over: 0.2 s
    without a statement, within 10 s. Only for a gateway whose periodic tasks are parked."""
    seen = Statements(engine)
    try:
        for _ in range(50):
            seen.reset()
            await asyncio.sleep(0.2)
            if not seen.seen:
                return
    finally:
        seen.close()
    raise AssertionError(f"the store never went quiet: {seen.seen[:5]}")


def _rows(engine: Engine) -> int:
    with engine.connect() as c:
        return int(c.execute(select(func.count()).select_from(usage_events)).scalar_one())


@pytest.fixture
async def parked(tmp_path: Path, sim_url: str) -> AsyncIterator[GW]:
    gw = await _started(_settings(tmp_path, sim_url, poll_s=3600), writer_interval_s=3600)
    yield gw
    await gw.client.aclose()
    await gw.app.shutdown()


@pytest.mark.parametrize("n", [50, 200])
async def test_admitted_requests_with_limits_and_a_quota_send_no_sql(parked: GW, n: int) -> None:
    h = await _alice(parked)
    assert parked.app.engine is not None
    await _settled(parked.app.engine)
    seen = Statements(parked.app.engine)
    try:
        await _load(parked, h, n)
        assert seen.seen == [], f"{len(seen.seen)} statements on the request path: {seen.seen[:5]}"
        # What the requests left for the control plane: one batch, n rows, a statement per
        # power of two in n (at most 10 below 1,024 rows).
        written = await parked.app.usage.write_batch()
        assert written >= n
        statements = len(repo._sqlite_sizes(written, repo._SQLITE_MAX_ROWS))
        assert statements == bin(written).count("1") <= 10
        assert seen.origins() == Counter({WRITER: statements}), seen.seen
        seen.reset()
    finally:
        seen.close()
    assert _rows(parked.app.engine) == written
    print(f"\nN={n}: 0 statements during {n + 1} requests; their {written} usage rows in "
          f"{statements}")


@pytest.fixture
async def live(tmp_path: Path, sim_url: str) -> AsyncIterator[GW]:
    gw = await _started(_settings(tmp_path, sim_url, poll_s=0.2), writer_interval_s=None)
    yield gw
    await gw.client.aclose()
    await gw.app.shutdown()


async def test_with_the_writer_and_poll_running_every_statement_is_theirs(live: GW) -> None:
    h = await _alice(live)
    assert live.app.engine is not None
    interval = live.app.usage.interval_s
    seen = Statements(live.app.engine)
    try:
        for n in (200, 800):
            seen.reset()
            t0 = time.monotonic()
            await _load(live, h, n)
            elapsed = time.monotonic() - t0
            got = seen.origins()
            assert set(got) <= {WRITER, *POLL}, f"statements from elsewhere: {seen.seen}"
            # A batch per tick at most, however many requests. SQLite: a statement per power
            # of two in its rows, at most 10 for a batch under 1,024 rows, one more per 512 rows.
            ticks = math.ceil(elapsed / interval) + 1
            assert got[WRITER] <= ticks * 10 + n // 512, (got, elapsed)
            print(f"\nN={n} in {elapsed:.2f} s: {dict(got)} "
                  f"({sum(got.values()) / n:.3f} statements per request, all background)")
    finally:
        seen.close()


# Found by this file: every key poll re-read the last 2 s of changes (its overlap window) and
# evicted those keys again, so a key changed once was looked up on the request path after each
# poll for ~2 s (11 lookups at revocation_poll_s 0.2). Now each change evicts once.
async def test_a_changed_key_is_looked_up_on_the_request_path_at_most_once(
    live: GW, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert live.app.engine is not None
    ctx = Context(live.app.engine, live.app.settings)
    group_svc.create_group(ctx, "staff", models=["sim"])
    user_svc.create_user(ctx, "bob", groups=["staff"])
    h = {"Authorization": f"Bearer {live.key('bob-1', user='bob')}"}
    lookups: list[float] = []
    real = repo.grant_by_digest

    def counted(engine: Engine, digest: str) -> repo.KeyGrant | None:
        lookups.append(time.monotonic())
        return real(engine, digest)

    monkeypatch.setattr(repo, "grant_by_digest", counted)
    t0 = time.monotonic()
    for _ in range(100):  # over 2 s (the overlap window), paced so that several polls happen
        r = await live.client.post("/v1/chat/completions", headers=h, json={
            "model": "sim", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert r.status_code == 200, r.text
        await asyncio.sleep(0.02)
    print(f"\na key made once, then 100 requests over {time.monotonic() - t0:.1f} s: "
          f"{len(lookups)} store lookups of it on the request path")
    assert len(lookups) <= 1  # the first request's: it was made after the last reload


# -- redis ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_srv() -> Iterator[RedisServer]:
    with redis_server() as srv:
        yield srv


class Monitor:
    """Redis's ``MONITOR``, read in a thread: every command Redis receives from a client (the
    commands a script runs, tagged ``lua``, are left out), whatever client library sent it.
    :meth:`commands` waits for a marker sent after everything else, so nothing is missed."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.marker = f"fg-monitor-{time.monotonic_ns()}"
        self.lines: list[str] = []
        self._sock = socket.create_connection(("127.0.0.1", port), timeout=15)
        self._sock.sendall(b"MONITOR\r\n")
        self._file = self._sock.makefile("rb")
        assert self._file.readline() == b"+OK\r\n"
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        with contextlib.suppress(OSError):
            for _ in range(1_000_000):
                line = self._file.readline().decode(errors="replace")
                if not line or self.marker in line:
                    break
                self.lines.append(line)
        self._done.set()

    def commands(self) -> list[tuple[str, str]]:
        """``(COMMAND, first argument)`` of each command clients sent, once all have arrived."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=15) as s:
            s.sendall(f"ECHO {self.marker}\r\n".encode())
            s.recv(256)
        assert self._done.wait(15), "MONITOR never showed the marker"
        self._sock.close()
        out = []
        for line in self.lines:  # +1732433551.123456 [0 127.0.0.1:43210] "EVALSHA" "ab12..." ...
            source, _, rest = line.partition("] ")
            if source.endswith(" lua"):
                continue
            words = rest.split('" "')
            out.append((words[0].strip('"\r\n').upper(),
                        words[1].strip('"\r\n') if len(words) > 1 else ""))
        return out


async def test_redis_backend_one_admission_script_per_request(
    tmp_path: Path, sim_url: str, redis_srv: RedisServer
) -> None:
    from fleetgate.limits.redis_lua import ADMIT, SETTLE

    def sha(src: str) -> str:
        return hashlib.sha1(src.encode()).hexdigest()

    scripts = {sha(ADMIT): "admit", ADMIT: "admit", sha(SETTLE): "settle", SETTLE: "settle"}
    s = _settings(tmp_path, sim_url, poll_s=3600,
                  limits={"backend": "redis", "redis_url": redis_srv.url})
    gw = await _started(s, writer_interval_s=3600)
    n = 200
    try:
        h = await _alice(gw)
        assert gw.app.engine is not None
        # A process's first admission may find the script not loaded yet (NOSCRIPT, SCRIPT
        # LOAD, again): once per process, or after Redis restarts.
        r = await gw.client.post("/v1/chat/completions", headers=h, json={
            "model": "sim", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert r.status_code == 200, r.text
        await _settled(gw.app.engine)
        await gw.app.limits.flush()  # type: ignore[attr-defined]  # the warm-up's settle
        monitor = await asyncio.to_thread(Monitor, redis_srv.port)
        seen = Statements(gw.app.engine)
        try:
            await _load(gw, h, n)
            assert seen.seen == [], seen.seen
        finally:
            seen.close()
        await gw.app.limits.flush()  # type: ignore[attr-defined]  # the settles still pending
        cmds = await asyncio.to_thread(monitor.commands)
    finally:
        await gw.client.aclose()
        await gw.app.shutdown()
    kinds = Counter(scripts.get(arg, cmd) if cmd in ("EVALSHA", "EVAL") else cmd
                    for cmd, arg in cmds)
    print(f"\nredis, N={n} (+1 refused), commands Redis received: {dict(kinds)}")
    # One admission script per request (the refused one included), and nothing else per request:
    # the settles go beside the request path, batched, at most one per request. (MONITOR leaves
    # out Redis's administrative commands: SCRIPT, HELLO, CLIENT, AUTH.)
    assert kinds["admit"] == n + 1, kinds
    settles = kinds["settle"]
    assert settles <= n, kinds
    others = sum(kinds.values()) - kinds["admit"] - settles
    assert others <= settles + 5, kinds
