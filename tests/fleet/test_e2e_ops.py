"""What an operator does and sees, end to end against real `fleetgate serve` processes: restarts
that adopt or clean up replicas, `fleetgate up/status/down`, `/metrics`, and a graceful
shutdown that lets a stream finish before it stops the replicas."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from typing import Any

import openai
import pytest
from e2e import FLEETGATE, Fleet, Gateway, sim_model, until
from fleet_helpers import pid_running
from openai.types.chat import ChatCompletionMessageParam

HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello"}]
WAIT = {"mode": "wait", "wait_timeout_s": 30}


def records(fleet: Fleet) -> list[str]:
    return sorted(p.name for p in (fleet.state_dir / "local").glob("*.json"))


def ask(gw: Gateway, model: str = "m") -> None:
    out = gw.client().completions.create(model=model, prompt="x", max_tokens=2)
    assert out.choices[0].text


def test_restart_adopts_kept_replicas_and_on_leftover_stop_cleans_them_up(fleet: Fleet) -> None:
    model = sim_model(fleet.tmp, "m", backend={"keep_on_shutdown": True}, cold_start=WAIT)
    doc = fleet.config([model])
    first = fleet.gateway(doc)
    ask(first)
    (rep,) = first.replicas("m", "ready")
    assert first.terminate() == "clean"
    assert pid_running(rep["pid"])  # kept running through a clean shutdown
    assert records(fleet) == [f"{rep['id']}.json"]

    second = fleet.gateway(doc)  # same config: adopt it
    ask(second)
    st = second.status("m")
    (adopted,) = st["replicas"]
    assert (adopted["id"], adopted["pid"], adopted["state"]) == (rep["id"], rep["pid"], "ready")
    assert adopted["events"][1]["reason"] == "adopted from a previous gateway run"
    assert st["launches"] == 0 and st["last_cold_start_s"] is None
    assert len(list((fleet.log_dir / "m").glob("*.log"))) == 1
    assert second.terminate() == "clean"
    assert pid_running(rep["pid"])

    third = fleet.gateway(fleet.config([model], fleet={"on_leftover": "stop"}))
    until(lambda: not pid_running(rep["pid"]), 10, "the leftover is stopped")
    assert third.status("m")["replicas"] == [] and records(fleet) == []
    assert f"stopping leftover replica {rep['id']} of m: fleet.on_leftover is 'stop'" in third.log()
    assert third.terminate() == "clean"


def test_a_crashed_gateway_leaks_nothing_the_next_one_adopts_and_stops(fleet: Fleet) -> None:
    doc = fleet.config([sim_model(fleet.tmp, "m", scaling={"min_replicas": 1})])
    first = fleet.gateway(doc)
    (rep,) = until(lambda: first.replicas("m", "ready"), 15, "min_replicas up")
    first.kill()  # SIGKILL: no clean-up at all
    assert pid_running(rep["pid"]) and records(fleet) == [f"{rep['id']}.json"]

    second = fleet.gateway(doc)
    (adopted,) = until(lambda: second.replicas("m", "ready"), 10, "adopted")
    assert adopted["pid"] == rep["pid"] and second.status("m")["launches"] == 0
    ask(second)
    assert second.terminate() == "clean"  # not keep_on_shutdown: it stops what it adopted
    assert not pid_running(rep["pid"]) and records(fleet) == []


def cli(gw: Gateway, *args: str, key: str | None = None) -> subprocess.CompletedProcess[str]:
    """The real `fleetgate` command, pointed at ``gw`` through its environment variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETGATE_")}
    env |= {"FLEETGATE_URL": gw.url, "FLEETGATE_API_KEY": key or gw.admin_key}
    out = subprocess.run([*FLEETGATE, *args], capture_output=True, text=True, timeout=60, env=env)
    print(f"$ fleetgate {' '.join(args)}\n{out.stdout}{out.stderr}")  # shown when a test fails
    return out


def test_cli_up_wait_status_and_down_against_a_real_gateway(fleet: Fleet) -> None:
    doc = fleet.config([sim_model(fleet.tmp, "m", "--startup-delay-s", "1.5")])
    gw = fleet.gateway(doc)

    out = cli(gw, "status")
    assert out.returncode == 0, out.stderr
    head, row = out.stdout.splitlines()
    assert head.split() == [
        "MODEL",
        "STATUS",
        "REPLICA",
        "STATE",
        "INFLIGHT",
        "IDLE",
        "AGE",
        "REASON",
    ]
    assert row.split()[:5] == ["m", "stopped", "-", "-", "0"]

    t0 = time.monotonic()
    out = cli(gw, "up", "m", "--wait", "--timeout", "30")
    took = time.monotonic() - t0
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "m: pending"
    progress = [ln for ln in lines[1:] if re.match(r"\[\s*\d+\.\ds\] m: ", ln)]
    assert progress == lines[1:] and len(progress) >= 2
    starting = [ln for ln in progress if "m: starting (replicas: starting)" in ln]
    assert starting and "| === fleetgate" in starting[0]  # the replica log's last line
    assert "m: healthy (replicas: ready)" in lines[-1]
    assert "fleetgate sim: listening on" in lines[-1]
    assert took < 15

    out = cli(gw, "status")
    (row,) = out.stdout.splitlines()[1:]
    cells = row.split()
    (rep,) = gw.replicas("m")
    assert cells[:5] == ["m", "healthy", rep["id"], "ready", "0"]
    assert row.rstrip().endswith("health check passed")
    doc_json = json.loads(cli(gw, "status", "--json", "--model", "m").stdout)
    assert doc_json["models"][0]["replicas"][0]["pid"] == rep["pid"]

    out = cli(gw, "up", "m", key=gw.user_key)  # fleet.up_access: model_users
    assert out.returncode == 0 and out.stdout == "m: healthy\n"
    out = cli(gw, "down", "m", key=gw.user_key)
    assert out.returncode == 1 and "403: Only an admin key may stop a model." in out.stderr
    out = cli(gw, "down", "m")
    assert out.returncode == 0 and out.stdout.strip() == "m: stopping"
    until(lambda: gw.status("m")["status"] == "stopped", 10, "stopped")
    assert not pid_running(rep["pid"])
    (row,) = cli(gw, "status").stdout.splitlines()[1:]
    assert row.split()[:4] == ["m", "stopped", rep["id"], "stopped"]
    assert row.rstrip().endswith("fleet down")
    out = cli(gw, "status", key="fg-not-a-key")
    assert out.returncode == 1 and "401" in out.stderr


SAMPLE = re.compile(r'^[a-z_]+(\{([a-z]+="([^"\\]|\\.)*",?)*\})? -?[0-9.e+]+$')
CRASH = ["sh", "-c", "echo boom; exit 7", "{port}"]


def test_metrics_tell_the_truth_and_only_to_admins(fleet: Fleet) -> None:
    doc = fleet.config(
        [
            sim_model(fleet.tmp, "m", "--tokens-per-s", "20", scaling={"min_replicas": 1}),
            sim_model(fleet.tmp, "bad", backend={"command": CRASH}, restart={"max_restarts": 0}),
        ]
    )
    gw = fleet.gateway(doc)
    (rep,) = until(lambda: gw.replicas("m", "ready"), 15, "m up")
    up = gw.client()._client.post(
        f"{gw.url}/v1/fleet/up",
        json={"model": "bad"},
        headers={"authorization": f"Bearer {gw.admin_key}"},
    )
    assert up.status_code == 200 and up.json()["model"] == "bad"
    until(lambda: gw.status("bad")["status"] == "failed", 10, "bad failed")

    stream = gw.client().chat.completions.create(model="m", messages=HI, max_tokens=40, stream=True)
    next(iter(stream))
    r = gw.get("/metrics", gw.admin_key)
    stream.close()
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    text = r.text
    rid = rep["id"]
    for line in (
        f'fleetgate_replica_state{{model="m",replica="{rid}",state="ready"}} 1',
        f'fleetgate_replica_routable{{model="m",replica="{rid}"}} 1',
        f'fleetgate_replica_inflight{{model="m",replica="{rid}"}} 1',
        'fleetgate_replicas{model="m",state="ready"} 1',
        'fleetgate_model_inflight{model="m"} 1',
        'fleetgate_model_queue_length{model="m"} 0',
        'fleetgate_launches_total{model="m"} 1',
        'fleetgate_cold_start_seconds_count{model="m"} 1',
        'fleetgate_cold_start_seconds_bucket{model="m",le="+Inf"} 1',
        'fleetgate_replicas{model="bad",state="failed"} 1',
        'fleetgate_launches_total{model="bad"} 1',
        'fleetgate_replica_failures_total{model="bad",kind="exited"} 1',
        'fleetgate_replica_failures_total{model="bad",kind="crash_loop"} 1',
        'fleetgate_cold_start_seconds_count{model="bad"} 0',
    ):
        assert line in text.splitlines(), line
    cold = float(re.search(r'^fleetgate_cold_start_seconds_sum\{model="m"\} (\S+)$', text, re.M)[1])  # type: ignore[index]
    assert 0 < cold < 10
    for line in text.splitlines():
        assert line.startswith("# ") or SAMPLE.match(line), line

    denied = gw.get("/metrics", gw.user_key)
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "admin_required"
    assert gw.get("/metrics").status_code == 401
    assert gw.get("/metrics", "fg-wrong").status_code == 401


def test_sigterm_lets_a_stream_finish_then_stops_the_replicas(fleet: Fleet) -> None:
    doc = fleet.config(
        [sim_model(fleet.tmp, "m", "--tokens-per-s", "20", scaling={"min_replicas": 1})]
    )
    gw = fleet.gateway(doc)
    (rep,) = until(lambda: gw.replicas("m", "ready"), 15, "m up")
    client = gw.client()
    stream = client.chat.completions.create(model="m", messages=HI, max_tokens=40, stream=True)
    chunks = iter(stream)
    got: list[Any] = [next(chunks)]
    sent = time.monotonic()
    gw.proc.send_signal(signal.SIGTERM)

    done = threading.Event()

    def drain() -> None:
        got.extend(chunks)
        done.set()

    reader = threading.Thread(target=drain)
    reader.start()
    time.sleep(0.5)
    with pytest.raises(openai.APIConnectionError):  # no new requests once shutting down
        gw.client().completions.create(model="m", prompt="x", max_tokens=1)
    assert pid_running(rep["pid"])  # the replica serves the stream until it ends
    reader.join(20)
    assert done.is_set()
    assert got[-1].choices[0].finish_reason == "length"
    text = "".join(c.choices[0].delta.content or "" for c in got if c.choices)
    assert len(text.split()) == 40  # every token arrived
    assert gw.exit_status(gw.proc.wait(20)) == "clean"
    assert time.monotonic() - sent < 12
    assert not pid_running(rep["pid"]) and records(fleet) == []
    assert "gateway shutting down" in gw.log(200)
