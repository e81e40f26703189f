"""Load and failures end to end, through `fleetgate serve` and the official `openai` client:
scaling up under load and back down without a failed request, a replica SIGKILLed mid-load, a
crash loop, and a static URL that is down and then comes up.

Every load loop is bounded in requests and in time.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import openai
import pytest
from e2e import Fleet, sim_model, until
from helpers import free_port
from openai.types.chat import ChatCompletionMessageParam

HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello"}]
LOAD_LIMIT_S = 30.0  # no load loop runs longer, whatever happens
PER_WORKER = 400  # nor sends more requests than this per worker


@dataclass
class Load:
    """Workers sending requests in a loop until told to stop; every outcome is kept."""

    call: Callable[[], None]
    results: list[tuple[float, float, str]] = field(default_factory=list)  # start, end, error
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def worker(self, keep_going: Callable[[], bool] = lambda: True) -> None:
        deadline = time.monotonic() + LOAD_LIMIT_S
        for _ in range(PER_WORKER):
            if self.stop.is_set() or not keep_going() or time.monotonic() > deadline:
                return
            t0 = time.monotonic()
            err = ""
            try:
                self.call()
            except openai.APIError as e:
                err = f"{type(e).__name__}: {e}"
            with self.lock:
                self.results.append((t0, time.monotonic(), err))

    def failures(self, started_after: float = 0.0) -> list[str]:
        with self.lock:
            return [e for t0, _, e in self.results if e and t0 >= started_after]


def test_scales_up_under_load_and_back_down_without_a_failed_request(fleet: Fleet) -> None:
    scaling = {
        "min_replicas": 1,
        "max_replicas": 2,
        "target_inflight": 2,
        "scale_up_window_s": 0.5,
        "scale_down_window_s": 1,
        "scale_down_cooldown_s": 1,
        "idle_timeout_s": None,
        "drain_timeout_s": 10,
    }
    doc = fleet.config([sim_model(fleet.tmp, "m", "--ttft-ms", "300", scaling=scaling)])
    gw = fleet.gateway(doc)
    client = gw.client()  # no retries: any error counts
    until(lambda: gw.status("m")["status"] == "healthy", 15, "min_replicas up")

    load = Load(lambda: _complete(client, "m"))
    busy = threading.Event()
    busy.set()
    with ThreadPoolExecutor(8) as pool:
        pool.submit(load.worker)  # the trickle, through both phases
        for _ in range(7):
            pool.submit(load.worker, busy.is_set)
        try:

            def both_serving() -> list[dict[str, Any]] | None:
                rs = gw.replicas("m", "ready")
                return rs if len(rs) == 2 and all(r["served"] > 0 for r in rs) else None

            both = until(both_serving, 20, "scaled up to two replicas, both serving")
            busy.clear()  # 8 in flight -> 1: fits in one replica
            st = until(
                lambda: (
                    (s := gw.status("m"))["ready"] == 1
                    and any(r["state"] == "stopped" for r in s["replicas"])
                    and s
                ),
                15,
                "scaled back down to one",
            )
            time.sleep(0.5)  # the trickle goes on a little on the one that stays
        finally:
            load.stop.set()
    assert load.failures() == []
    assert len(load.results) >= 30
    stopped = next(r for r in st["replicas"] if r["state"] == "stopped")
    assert stopped["id"] in {r["id"] for r in both}
    assert [e["state"] for e in stopped["events"]] == [
        "pending",
        "starting",
        "ready",
        "draining",
        "stopped",
    ]
    assert "scale down one" in stopped["reason"]
    assert "drain timed out" not in stopped["reason"]
    assert gw.status("m")["launches"] == 2


def _complete(client: openai.OpenAI, model: str) -> None:
    out = client.chat.completions.create(model=model, messages=HI, max_tokens=2)
    assert out.choices[0].message.content


def test_sigkilled_replica_mid_load_loses_no_request_that_had_not_started(fleet: Fleet) -> None:
    doc = fleet.config(
        [
            sim_model(
                fleet.tmp,
                "m",
                "--ttft-ms",
                "150",
                "--tokens-per-s",
                "20",
                scaling={"min_replicas": 2, "max_replicas": 2},
                restart={"backoff_initial_s": 0.2},
            )
        ]
    )
    gw = fleet.gateway(doc)
    client = gw.client()
    until(lambda: len(gw.replicas("m", "ready")) == 2, 15, "two replicas ready")

    # A long stream, alone on one replica: that is the one we kill.
    stream = client.chat.completions.create(model="m", messages=HI, max_tokens=80, stream=True)
    chunks = iter(stream)
    assert next(chunks).choices
    victim = next(r for r in gw.replicas("m", "ready") if r["inflight"] == 1)

    load = Load(lambda: _complete(client, "m"))
    with ThreadPoolExecutor(6) as pool:
        for _ in range(6):
            pool.submit(load.worker)
        try:
            time.sleep(1.0)
            killed_at = time.monotonic()
            os.kill(victim["pid"], signal.SIGKILL)
            with pytest.raises(openai.APIError, match="broke the stream mid-way"):
                for _ in chunks:  # the cut stream ends with an error event, not a hang
                    pass
            until(lambda: len(gw.replicas("m", "ready")) == 2, 15, "the replica is back")
            time.sleep(0.5)
        finally:
            load.stop.set()

    after = [r for r in load.results if r[0] >= killed_at]
    assert len(after) >= 10
    assert load.failures(started_after=killed_at) == []  # nothing lost that hadn't started
    # Those in flight on the victim hadn't sent a byte back yet either: retried elsewhere.
    assert load.failures() == []
    rep = next(r for r in gw.replicas("m") if r["id"] == victim["id"])
    assert rep["restarts"] == 1 and rep["pid"] != victim["pid"]
    assert any("killed by SIGKILL" in e["reason"] for e in rep["events"])
    metrics = gw.metrics()
    assert 'fleetgate_replica_failures_total{model="m",kind="killed"} 1' in metrics
    assert 'fleetgate_restarts_total{model="m"} 1' in metrics


CRASH = [sys.executable, "-c", "import sys; print('CUDA out of memory'); sys.exit(3)", "{port}"]


def test_crash_loop_ends_failed_with_reason_and_a_clear_503(fleet: Fleet) -> None:
    restart = {"max_restarts": 2, "backoff_initial_s": 0.1, "backoff_max_s": 0.2}
    doc = fleet.config(
        [
            sim_model(fleet.tmp, "crashy", backend={"command": CRASH}, restart=restart),
            sim_model(
                fleet.tmp,
                "crashy-wait",
                backend={"command": CRASH},
                restart=restart,
                cold_start={"mode": "wait", "wait_timeout_s": 60},
            ),
        ]
    )
    gw = fleet.gateway(doc)
    client = gw.client()
    with pytest.raises(openai.APIStatusError) as first:
        client.completions.create(model="crashy", prompt="x")
    assert first.value.status_code == 503 and "is starting" in first.value.message

    st = until(lambda: (s := gw.status("crashy"))["status"] == "failed" and s, 15, "failed")
    assert st["last_failure"].startswith("crash loop: 3 failures in 600s")
    assert "exited with code 3" in st["last_failure"]
    assert "CUDA out of memory" in st["last_failure"]  # the log tail, for the admin
    (rep,) = st["replicas"]
    assert rep["state"] == "failed" and rep["restarts"] == 2
    assert st["launches"] == 3

    with pytest.raises(openai.APIStatusError) as later:
        client.completions.create(model="crashy", prompt="x")
    e = later.value
    assert e.status_code == 503 and e.response.headers["retry-after"]
    # A user learns that it failed, not how: reasons can hold URLs and probe errors.
    assert e.body["message"] == (  # type: ignore[index]
        "The model 'crashy' failed to start; an admin can see why in the fleet status."
    )
    assert "CUDA" not in e.response.text and "exited" not in e.response.text
    with pytest.raises(openai.APIStatusError) as as_admin:
        gw.client(gw.admin_key).completions.create(model="crashy", prompt="x")
    assert as_admin.value.status_code == 503
    assert "Reason: crash loop: 3 failures in 600s; last: process exited with code 3" in (
        as_admin.value.message
    )
    assert "CUDA" not in as_admin.value.response.text  # the log tail stays in the status
    r = gw.get("/v1/fleet/status?model=crashy", gw.user_key)
    assert r.json()["models"][0]["status"] == "failed" and "CUDA" not in r.text
    assert 'fleetgate_replica_failures_total{model="crashy",kind="crash_loop"} 1' in gw.metrics()

    # Requests held in wait mode get their answer when the loop ends, not at wait_timeout_s: a
    # 503, or for a stream (whose 200 and SSE head went out at once) a final error event.
    def held_stream() -> str:
        stream = client.completions.create(model="crashy-wait", prompt="x", stream=True)
        with pytest.raises(openai.APIError) as cut:
            list(stream)
        return cut.value.message

    t0 = time.monotonic()
    with ThreadPoolExecutor(1) as pool:
        streamed = pool.submit(held_stream)
        with pytest.raises(openai.APIStatusError, match="failed to start") as held:
            client.completions.create(model="crashy-wait", prompt="x")
        assert streamed.result(30).startswith("The model 'crashy-wait' failed to start")
    assert held.value.status_code == 503 and time.monotonic() - t0 < 20


def test_static_url_down_gets_503_then_the_client_retry_succeeds(fleet: Fleet) -> None:
    port = free_port()
    doc = fleet.config(
        [
            {
                "name": "st",
                "backend": {
                    "type": "static",
                    "urls": [f"http://127.0.0.1:{port}"],
                    "health_interval_s": 0.5,
                },
                "cold_start": {"retry_after_s": 1},
            }
        ]
    )
    gw = fleet.gateway(doc)
    client = gw.client()
    # Nobody has probed it yet: the first request finds it down (a 502, nothing to retry on).
    with pytest.raises(openai.APIStatusError) as first:
        client.completions.create(model="st", prompt="x")
    assert first.value.status_code in (502, 503)
    until(lambda: gw.replicas("st", "starting"), 10, "probed out of routing")
    with pytest.raises(openai.APIStatusError) as down:
        client.completions.create(model="st", prompt="x")
    e = down.value
    assert e.status_code == 503 and e.response.headers["retry-after"] == "1"
    assert "no backend answering its health check" in e.message

    fleet.sim(port, "st", "--ttft-ms", "0")  # the URL's owner brings it up
    raw = gw.client(max_retries=20).completions.with_raw_response.create(
        model="st", prompt="x", max_tokens=2
    )
    assert raw.parse().choices[0].text
    assert raw.retries_taken >= 1  # turned away while it came up; the client's retry got through
    assert gw.status("st")["launches"] == 0  # static: never launched, only probed


def test_in_wait_mode_a_replica_lost_at_connect_is_waited_for_not_a_502(fleet: Fleet) -> None:
    """The only replica dies between routing and connecting (a SLURM job cancelled, a static
    engine restarting): a model in wait mode waits for it to come back instead of failing."""
    port = free_port()
    doc = fleet.config([{
        "name": "st",
        "backend": {"type": "static", "urls": [f"http://127.0.0.1:{port}"],
                    "health_interval_s": 30},  # the probe won't notice: the request will
        "cold_start": {"mode": "wait", "wait_timeout_s": 30},
    }])
    engine = fleet.sim(port, "st", "--ttft-ms", "0")
    gw = fleet.gateway(doc)
    client = gw.client(max_retries=0, timeout=60)
    until(lambda: gw.replicas("st", "ready"), 15, "the static replica ready")
    assert client.completions.create(model="st", prompt="x", max_tokens=2).choices[0].text
    engine.terminate()
    engine.wait(10)

    def bring_back() -> None:
        time.sleep(1.5)
        fleet.sim(port, "st", "--ttft-ms", "0")

    with ThreadPoolExecutor(1) as pool:
        pool.submit(bring_back)
        t0 = time.monotonic()
        r = client.completions.create(model="st", prompt="x", max_tokens=2)
    assert r.choices[0].text and time.monotonic() - t0 >= 1.0
