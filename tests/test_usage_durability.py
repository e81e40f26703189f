"""Usage accounting across the two ways a gateway goes down, with real processes under load.

A ``fleetgate sim`` upstream, a ``fleetgate serve`` on SQLite, one key from the CLI, six client
threads sending non-streamed and streamed chats. Then:

- **SIGTERM** while the load runs: the store ends up with a usage row for every response a
  client received complete (a 200 with a whole JSON body, or a stream that reached ``[DONE]``),
  and at most one more per request that was still unfinished (in flight at the signal).
- **SIGKILL** of the gateway's process group: what is lost is the usage writer's last batch at
  most, so ``received - rows`` is between 0 and the completions clients saw in the last 0.5 s
  before the kill (the writer writes every 0.1 s). The test prints the numbers (``-s``);
  ``docs/limits.md`` ("What a SIGKILL can lose") quotes a run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import orjson
import pytest
from helpers import FLEETGATE, create_key, free_port, sim, stop, wait_http
from sqlalchemy import create_engine, func, select

from fleetgate.store.tables import usage_events

THREADS = 6
MAX_PER_THREAD = 500  # the load is bounded in count as well as in time
LOAD_S = 2.5  # no thread sends after this long, signal or not
SIGNAL_AFTER_S = 1.5
KILL_WINDOW_S = 0.5


@dataclass
class Load:
    """What the clients saw: when each complete response arrived, and how many requests ended
    any other way (each thread stops at its first such request, so this is at most THREADS)."""

    completed_at: list[float] = field(default_factory=list)
    unfinished: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


@pytest.fixture(scope="module")
def sim_url() -> Iterator[str]:
    # 200 tokens/s: a 4-token answer takes ~20 ms, a 20-token stream ~0.1 s, so some are in
    # flight at any instant.
    with sim("upstream-name", "--ttft-ms", "0", "--tokens-per-s", "200") as url:
        yield url


@pytest.fixture
def cfg(tmp_path: Path, sim_url: str) -> Path:
    c = tmp_path / "gw.yaml"
    c.write_text(
        "auth: {mode: keys}\n"
        f"store: {{url: 'sqlite:///{tmp_path / 'fg.db'}'}}\n"
        "server: {shutdown_grace_s: 10}\n"
        "models:\n"
        "  - name: chat\n"
        "    served_name: upstream-name\n"
        f"    backend: {{type: static, urls: ['{sim_url}']}}\n"
    )
    return c


@contextlib.contextmanager
def serving(cfg: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    port = free_port()
    log = (cfg.parent / "gw.log").open("wb")
    p = subprocess.Popen([*FLEETGATE, "serve", "--config", str(cfg), "--port", str(port)],
                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/ready", 60, p)
        yield p, f"http://127.0.0.1:{port}"
    finally:
        stop(p)
        log.close()


def _one(client: httpx.Client, stream: bool) -> bool:
    """One chat; True when the answer arrived complete."""
    body = {"model": "chat", "messages": [{"role": "user", "content": "x"}],
            "max_tokens": 20 if stream else 4, "stream": stream}
    if not stream:
        r = client.post("/v1/chat/completions", json=body)
        return r.status_code == 200 and orjson.loads(r.content)["usage"]["completion_tokens"] == 4
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            return False
        last = ""
        for line in r.iter_lines():
            if line:
                last = line
        return last == "data: [DONE]"


def _client(base: str, key: str, n: int, load: Load, start: threading.Barrier) -> None:
    """One client thread: a first request (connections, the gateway's first-request costs),
    then the timed load once every thread has had its first answer."""
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"},
                      timeout=15) as client:
        deadline = 0.0
        for i in range(MAX_PER_THREAD):
            if i == 1:
                start.wait(timeout=30)
                deadline = time.monotonic() + LOAD_S
            elif i > 1 and time.monotonic() >= deadline:
                return
            try:
                ok = _one(client, stream=(n == 0 or i % 5 == 4))
            except httpx.HTTPError:
                ok = False
            with load.lock:
                if ok:
                    load.completed_at.append(time.monotonic())
                else:
                    load.unfinished += 1
            if not ok:
                if i == 0:
                    start.abort()  # the main thread fails at once instead of waiting
                return


def _under_load(base: str, key: str, signal_it: object) -> tuple[Load, float]:
    """Run the clients, call ``signal_it()`` SIGNAL_AFTER_S into the timed load; returns what
    they saw and the monotonic time of the signal."""
    load = Load()
    start = threading.Barrier(THREADS + 1)
    threads = [threading.Thread(target=_client, args=(base, key, n, load, start), daemon=True)
               for n in range(THREADS)]
    for t in threads:
        t.start()
    start.wait(timeout=30)
    time.sleep(SIGNAL_AFTER_S)
    at = time.monotonic()
    signal_it()  # type: ignore[operator]
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads), "a client thread hung"
    return load, at


def _rows(cfg: Path) -> int:
    engine = create_engine(f"sqlite:///{cfg.parent / 'fg.db'}")
    try:
        with engine.connect() as c:
            return int(c.execute(select(func.count()).select_from(usage_events)).scalar_one())
    finally:
        engine.dispose()


def _children(pid: int) -> list[int]:
    with contextlib.suppress(OSError):
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return []


def test_sigterm_under_load_keeps_every_answered_requests_usage(cfg: Path) -> None:
    key = create_key(cfg, "alice")
    with serving(cfg) as (p, base):
        load, _ = _under_load(base, key, lambda: p.send_signal(signal.SIGTERM))
        assert p.wait(timeout=30) == 0
    received = len(load.completed_at)
    rows = _rows(cfg)
    print(f"\nSIGTERM under load: {received} answered complete, {load.unfinished} unfinished, "
          f"{rows} usage rows")
    assert received > 50, "the load never got going"
    assert load.unfinished <= THREADS
    assert rows >= received, f"{received - rows} answered requests have no usage row"
    assert rows <= received + load.unfinished
    log = (cfg.parent / "gw.log").read_text()
    assert "usage flush at shutdown failed" not in log
    assert log.rstrip().endswith("Application shutdown complete.")


def test_sigkill_under_load_loses_at_most_the_last_batch(cfg: Path) -> None:
    key = create_key(cfg, "alice")
    with serving(cfg) as (p, base):
        # The static backend starts nothing, so the process group is the gateway alone; the
        # kill below takes nothing else down with it.
        assert _children(p.pid) == []
        load, at = _under_load(base, key, lambda: os.killpg(p.pid, signal.SIGKILL))
        assert p.wait(timeout=10) == -signal.SIGKILL
    received = len(load.completed_at)
    late = sum(1 for t in load.completed_at if t >= at - KILL_WINDOW_S)
    rows = _rows(cfg)
    lost = received - rows
    print(f"\nSIGKILL under load: {received} answered complete, {rows} usage rows, {lost} lost; "
          f"{late} answered in the last {KILL_WINDOW_S} s (the bound), "
          f"{sum(t >= at - SIGNAL_AFTER_S for t in load.completed_at) / SIGNAL_AFTER_S:.0f} "
          "answers/s before it")
    assert received > 50, "the load never got going"
    assert lost >= 0, "more rows than answers: a request was counted that no client saw end"
    assert lost <= late, f"{lost} rows lost, more than the last {KILL_WINDOW_S} s's {late}"
