"""Cold starts end to end: `fleetgate serve` launching `fleetgate sim` replicas on demand, driven
with the official `openai` client. One launch however many requests arrive; `reject` mode
answered by the client's own retries, `wait` mode held (streams with SSE keep-alives); idle
scale-to-zero and back."""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai
from e2e import Fleet, sim_model, until
from fleet_helpers import pid_running
from openai.types.chat import ChatCompletionMessageParam

HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello"}]


def launches(fleet: Fleet, model: str) -> int:
    """Replica log files: one per replica the local launcher started (a restart appends)."""
    return len(list((fleet.log_dir / model).glob("*.log")))


def test_fifty_cold_requests_one_launch_all_answered_by_client_retries(fleet: Fleet) -> None:
    doc = fleet.config(
        [
            sim_model(
                fleet.tmp,
                "m",
                "--startup-delay-s",
                "1",
                cold_start={"mode": "reject", "retry_after_s": 1},
            )
        ]
    )
    gw = fleet.gateway(doc)
    client = gw.client(max_retries=15)

    def one(_: int) -> tuple[int, str]:
        raw = client.chat.completions.with_raw_response.create(model="m", messages=HI, max_tokens=3)
        return raw.retries_taken, raw.parse().choices[0].message.content or ""

    with ThreadPoolExecutor(50) as pool:
        results = list(pool.map(one, range(50)))
    assert all(text for _, text in results)
    assert all(retries >= 1 for retries, _ in results)  # each was turned away with a 503 first
    assert launches(fleet, "m") == 1
    metrics = gw.metrics()
    assert 'fleetgate_launches_total{model="m"} 1' in metrics
    st = gw.status("m")
    assert st["launches"] == 1 and st["status"] == "healthy"
    assert [r["state"] for r in st["replicas"]] == ["ready"]
    assert st["replicas"][0]["served"] == 50


def test_wait_mode_holds_requests_and_keeps_streams_alive(fleet: Fleet) -> None:
    doc = fleet.config(
        [
            sim_model(
                fleet.tmp,
                "w",
                "--startup-delay-s",
                "1.5",
                cold_start={"mode": "wait", "wait_timeout_s": 30, "keepalive_s": 0.3},
            )
        ]
    )
    gw = fleet.gateway(doc)
    client = gw.client()  # no retries: a held request must simply succeed

    def plain(_: int) -> str:
        out = client.chat.completions.create(model="w", messages=HI, max_tokens=3)
        return out.choices[0].message.content or ""

    def raw_stream() -> list[tuple[float, str]]:
        return gw.sse_lines({"model": "w", "messages": HI, "max_tokens": 4, "stream": True})

    def sdk_stream() -> str:
        chunks = client.chat.completions.create(model="w", messages=HI, max_tokens=4, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    def queued() -> int:
        m = re.search(r'^fleetgate_model_queue_length\{model="w"\} (\d+)$', gw.metrics(), re.M)
        return int(m[1]) if m else 0

    with ThreadPoolExecutor(22) as pool:
        raw = pool.submit(raw_stream)
        sdk = pool.submit(sdk_stream)
        plain_results = pool.map(plain, range(20))
        until(lambda: queued() == 22, 5, "all 22 requests counted as waiting")
        plains = list(plain_results)
        lines, text = raw.result(), sdk.result()
    assert queued() == 0

    assert all(plains) and text
    comments = [(t, ln) for t, ln in lines if ln.startswith(":")]
    data = [(t, ln) for t, ln in lines if ln.startswith("data:")]
    assert len(comments) >= 3, lines
    assert comments[0][1] == ": waiting for the model to start"
    assert comments[0][0] < 1.0  # the first keep-alive comes long before the model is up
    assert comments[-1][0] < data[0][0]  # keep-alives while waiting, then the real stream
    assert data[-1][1] == "data: [DONE]" and len(data) >= 3
    assert launches(fleet, "w") == 1
    assert gw.status("w")["launches"] == 1


def test_idle_model_scales_to_zero_and_comes_back(fleet: Fleet) -> None:
    doc = fleet.config(
        [
            sim_model(
                fleet.tmp,
                "i",
                scaling={"min_replicas": 0, "idle_timeout_s": 1},
                cold_start={"mode": "wait", "wait_timeout_s": 30},
            )
        ]
    )
    gw = fleet.gateway(doc)
    client = gw.client()
    assert gw.status("i")["status"] == "stopped" and launches(fleet, "i") == 0
    assert gw.status("i")["context_length"] is None  # nothing has answered /v1/models yet
    assert client.completions.create(model="i", prompt="x", max_tokens=2).choices[0].text
    first = gw.replicas("i", "ready")[0]
    # Read off the engine's /v1/models (the simulator says max_model_len 8192, as vLLM would),
    # for everyone allowed the model: the portal shows it.
    assert gw.status("i")["context_length"] == 8192
    r = gw.get("/v1/fleet/status?model=i", gw.user_key)
    assert r.json()["models"][0]["context_length"] == 8192
    assert pid_running(first["pid"])

    def idle_stopped() -> dict[str, Any] | None:
        st = gw.status("i")
        return st if st["status"] == "stopped" else None

    st = until(idle_stopped, 10, "scaled to zero")
    rep = st["replicas"][0]
    assert rep["id"] == first["id"] and rep["state"] == "stopped"
    assert [e["state"] for e in rep["events"]][-2:] == ["draining", "stopped"]
    assert rep["reason"] == "idle for 1s: scale to zero"
    until(lambda: not pid_running(first["pid"]), 5, "the process is gone")
    assert 'fleetgate_replicas{model="i",state="ready"} 0' in gw.metrics()

    assert client.completions.create(model="i", prompt="x", max_tokens=2).choices[0].text
    assert launches(fleet, "i") == 2
    assert gw.status("i")["launches"] == 2


def test_wait_mode_gives_up_after_its_timeout_with_a_clear_error(fleet: Fleet) -> None:
    doc = fleet.config(
        [
            sim_model(
                fleet.tmp,
                "stuck",
                "--hang-on-start",
                cold_start={"mode": "wait", "wait_timeout_s": 1.5, "keepalive_s": 0.3},
            )
        ]
    )
    gw = fleet.gateway(doc)
    t0 = time.monotonic()
    try:
        gw.client().chat.completions.create(model="stuck", messages=HI, max_tokens=3)
        raise AssertionError("a model that never starts answered")
    except openai.APIStatusError as e:
        waited = time.monotonic() - t0
        assert e.status_code == 503
        assert e.response.headers.get("retry-after")
        assert e.response.json()["error"]["source"] == "gateway"
    assert 1.4 <= waited < 10, waited
    # A streaming client got its SSE head at once: the give-up is the stream's last event.
    lines = [ln for _, ln in gw.sse_lines(
        {"model": "stuck", "messages": HI, "max_tokens": 3, "stream": True})]
    assert lines[0].startswith(":")
    assert lines[-1].startswith("data: ") and '"error"' in lines[-1]
    assert "[DONE]" not in "".join(lines)
