"""A cold start through SLURM's queue: the job waits while the node is full, and every caller
allowed the model sees why (503 message, Retry-After, status, ``up --wait``); then it runs,
reports its address, passes the gateway's own probe, and the official client streams."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

import httpx
import openai
import pytest
from cluster import Cluster
from e2e import FLEETGATE, Fleet, until
from slurm_helpers import block_node, gateway_doc, scancel, slurm_model


def test_cold_start_waits_in_the_queue_with_its_reason_then_streams(
    fleet: Fleet, cluster: Cluster, tmp_path: Path
) -> None:
    blocker = block_node(tmp_path)
    try:
        gw = fleet.gateway(gateway_doc(fleet, [slurm_model(tmp_path, "m")]))
        # The first request launches a job; the node is full, so it waits with a reason.
        with httpx.Client(timeout=10) as http:
            r = http.post(f"{gw.url}/v1/fleet/up", json={"model": "m"},
                          headers={"authorization": f"Bearer {gw.user_key}"})
            assert r.status_code == 200, r.text

        def queued() -> dict | None:
            reps = gw.replicas("m")
            return reps[0] if reps and reps[0].get("pending_reason") else None

        rep = until(queued, 30, "the job queued with a reason")
        assert rep["state"] == "starting" and rep["slurm_state"] == "PENDING"
        assert rep["pending_reason"] == "Resources" and rep["job_id"]
        assert [j["state"] for j in cluster.jobs() if j["job_id"] == rep["job_id"]] == ["PENDING"]

        # A plain user sees the reason, not the job id or node.
        r = gw.get("/v1/fleet/status?model=m", gw.user_key)
        user_rep = r.json()["models"][0]["replicas"][0]
        assert user_rep["pending_reason"] == "Resources" and "queued in SLURM" in user_rep["note"]
        assert "job_id" not in user_rep and "node" not in user_rep

        # The official client gets a clear 503 with the reason and a Retry-After.
        with pytest.raises(openai.APIStatusError) as e:
            gw.client().chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert e.value.status_code == 503
        assert "queued in SLURM: Resources" in e.value.message
        assert rep["job_id"] not in e.value.message
        assert 1 <= int(e.value.response.headers["retry-after"]) <= 300

        # `fleetgate up --wait` shows it queued with the reason, then starting, then healthy.
        env = {**fleet.env, "FLEETGATE_URL": gw.url, "FLEETGATE_API_KEY": gw.admin_key}
        watcher = subprocess.Popen(
            [*FLEETGATE, "up", "m", "--wait", "--timeout", "90"], env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        lines: list[str] = []
        reader = threading.Thread(
            target=lambda: lines.extend(iter(watcher.stdout.readline, "")),  # type: ignore[union-attr]
            daemon=True,
        )
        reader.start()
        until(lambda: any("queued (Resources)" in ln for ln in lines), 60, "up --wait: queued")
        scancel(blocker)  # room on the node: the job runs
        assert watcher.wait(timeout=120) == 0, "".join(lines)
        reader.join(timeout=10)
        out = "".join(lines)
        lines = out.splitlines()
        queued_at = next(i for i, ln in enumerate(lines) if "queued (Resources)" in ln)
        healthy_at = next(i for i, ln in enumerate(lines) if ": healthy" in ln)
        assert queued_at < healthy_at, out
        print("\n".join(lines))

        # The official client streams from the job.
        stream = gw.client().chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=8, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert text.strip()
        st = gw.status("m")
        ready = [r for r in st["replicas"] if r["state"] == "ready"][0]
        assert ready["slurm_state"] == "RUNNING" and ready["node"] == cluster.host
    finally:
        subprocess.run(["scancel", blocker], check=False, timeout=30)


def test_a_job_pending_too_long_is_cancelled_and_reported(
    fleet: Fleet, cluster: Cluster, tmp_path: Path
) -> None:
    blocker = block_node(tmp_path)
    try:
        m = slurm_model(
            tmp_path, "m", backend={"pending_timeout_s": 3, "pending_timeout_action": "cancel"},
            restart={"max_restarts": 0},
        )
        gw = fleet.gateway(gateway_doc(fleet, [m]))
        httpx.post(f"{gw.url}/v1/fleet/up", json={"model": "m"},
                   headers={"authorization": f"Bearer {gw.admin_key}"}, timeout=10)
        until(lambda: gw.status("m")["status"] == "failed", 40, "held failed")
        assert "over pending_timeout_s" in gw.status("m")["last_failure"]
        ours = [j for j in cluster.jobs() if j["name"].startswith("fleetgate.")]
        assert not ours, ours  # cancelled, not left waiting in the queue
    finally:
        subprocess.run(["scancel", blocker], check=False, timeout=30)


def test_idle_to_zero_cancels_the_job_and_a_request_brings_it_back(
    fleet: Fleet, cluster: Cluster, tmp_path: Path
) -> None:
    m = slurm_model(tmp_path, "m", scaling={"idle_timeout_s": 3}, cold_start={"mode": "wait"})
    gw = fleet.gateway(gateway_doc(fleet, [m]))
    ask = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    assert gw.client().chat.completions.create(**ask).choices[0].message.content  # type: ignore[call-overload]
    assert cluster.jobs()
    until(lambda: not cluster.jobs(), 40, "the idle job cancelled")
    assert gw.status("m")["status"] == "stopped"
    assert gw.client().chat.completions.create(**ask).choices[0].message.content  # type: ignore[call-overload]
