"""Real vLLM (CPU) launched on demand by the gateway's ``local`` launcher: a cold start measured.

The model has ``min_replicas: 0`` and ``cold_start: wait``, so the first streaming request both
launches vLLM and waits for it. The test splits the wait into what vLLM itself takes and what
the gateway adds:

- vLLM's start-up: from the spawn (``started_at`` in the replica's state record, written by the
  launcher right after ``Popen``) to the first ``/health`` 200, which the test watches itself
  every 50 ms, independently of the gateway's probes.
- vLLM's time to first token for that very request: from vLLM's own ``/metrics``
  (``vllm:time_to_first_token_seconds``).
- Everything else (noticing the demand, spawning, the readiness polling, relaying) is the
  gateway's overhead, and must stay under about a second.

It starts one vLLM server besides the session's shared one, and stops it (through the
gateway's shutdown) before it returns.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from vllm_offline import OFFLINE_ENV

from fleetgate.fleet.launchers.local import processes

pytestmark = pytest.mark.real

REPO = Path(__file__).resolve().parents[2]
FLEETGATE = [sys.executable, "-c", "from fleetgate.cli.main import main; main()"]
PUBLIC = "tiny-fleet"
OVERHEAD_LIMIT_S = 1.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _group_alive(pgid: int) -> bool:
    return any(pgrp == pgid and state != "Z" for _, state, _, pgrp in processes())


def _config(work: Path, port: int, vllm_python: Path, model_dir: Path) -> dict[str, Any]:
    command = [
        str(vllm_python),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        "{model_path}",
        "--port",
        "{port}",
        "--host",
        "127.0.0.1",
        "--dtype",
        "bfloat16",
        "--max-model-len",
        "512",
        "--served-model-name",
        "{served_name}",
        "--enforce-eager",
    ]
    return {
        "server": {"host": "127.0.0.1", "port": port, "shutdown_grace_s": 10},
        "auth": {"mode": "keys"},
        "store": {"url": f"sqlite:///{work / 'fg.db'}"},
        "fleet": {"state_dir": str(work / "state")},
        "models": [
            {
                "name": PUBLIC,
                "served_name": "tiny",
                "backend": {
                    "type": "local",
                    "command": command,
                    "model_path": str(model_dir),
                    "env": dict(OFFLINE_ENV),
                    "log_dir": str(work / "logs"),
                    "start_timeout_s": 600,
                    "stop_grace_s": 30,
                },
                "scaling": {"min_replicas": 0, "max_replicas": 1},
                "cold_start": {"mode": "wait", "wait_timeout_s": 600},
            }
        ],
    }


def _vllm_ttft(base: str) -> float:
    """Seconds vLLM itself took to the first token, summed over its requests (one here)."""
    text = httpx.get(f"{base}/metrics", timeout=10).text
    m = re.search(r"^vllm:time_to_first_token_seconds_sum\{[^}]*\} (\S+)$", text, re.M)
    assert m, "vLLM's /metrics has no time_to_first_token_seconds"
    return float(m[1])


def test_cold_start_through_the_gateway_adds_under_a_second(
    vllm_python: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    port = _free_port()
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(json.dumps(_config(tmp_path, port, vllm_python, tiny_model_dir)))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    made = subprocess.run(
        [*FLEETGATE, "keys", "create", "--config", str(cfg), "--name", "ops", "--admin"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=env,
    )
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip().splitlines()[-1]
    base = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "gateway.log", "wb")  # noqa: SIM115 - closed below
    gw = subprocess.Popen(
        [*FLEETGATE, "serve", "--config", str(cfg)],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
        env=env,
        start_new_session=True,
    )
    pgid = 0
    try:
        for _ in range(600):
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/ready", timeout=1).status_code == 200:
                    break
            assert gw.poll() is None, (tmp_path / "gateway.log").read_text()[-3000:]
            time.sleep(0.1)

        # The first request: it launches vLLM and is held until vLLM answers.
        client = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=600)
        result: dict[str, Any] = {}

        def first_request() -> None:
            try:
                result["sent"] = time.time()
                stream = client.chat.completions.create(
                    model=PUBLIC,
                    messages=[{"role": "user", "content": "Say hello to the fleet."}],
                    max_tokens=4,
                    stream=True,
                    extra_body={"ignore_eos": True},
                )
                for chunk in stream:
                    if chunk.choices and "first_token" not in result:
                        result["first_token"] = time.time()
                        result["model"] = chunk.model
            except Exception as e:  # reported by the main thread
                result["error"] = e

        t = threading.Thread(target=first_request)
        t.start()

        # Meanwhile: find the replica's record, and watch its /health ourselves.
        records = tmp_path / "state" / "local"
        rec = None
        for _ in range(200):
            found = list(records.glob("*.json")) if records.is_dir() else []
            if found:
                rec = json.loads(found[0].read_text())
                break
            time.sleep(0.05)
        assert rec is not None, "no replica was launched"
        info = rec["info"]
        pgid = int(info["pgid"])
        first_200 = None
        deadline = time.time() + 600
        while first_200 is None and time.time() < deadline and t.is_alive():
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{rec['url']}/health", timeout=1).status_code == 200:
                    first_200 = time.time()
                    break
            time.sleep(0.05)
        t.join(600)
        assert "error" not in result, result.get("error")
        assert first_200 is not None and "first_token" in result
        assert result["model"] == PUBLIC

        status = httpx.get(
            f"{base}/v1/fleet/status?model={PUBLIC}",
            headers={"authorization": f"Bearer {key}"},
            timeout=10,
        ).json()["models"][0]
        (rep,) = status["replicas"]
        ready_at = next(e["at"] for e in rep["events"] if e["state"] == "ready")
        assert status["launches"] == 1

        total = result["first_token"] - result["sent"]
        vllm_start = first_200 - info["started_at"]
        vllm_ttft = _vllm_ttft(rec["url"])
        launch_delay = info["started_at"] - result["sent"]
        ready_lag = ready_at - first_200
        overhead = total - vllm_start - vllm_ttft
        print(
            f"\ncold start through the gateway: {total:.2f}s to the first token; "
            f"vLLM start-up {vllm_start:.2f}s (spawn to first /health 200), "
            f"vLLM time to first token {vllm_ttft:.3f}s; gateway overhead {overhead:.2f}s "
            f"(request to spawn {launch_delay:.3f}s, /health 200 to routable {ready_lag:.2f}s, "
            f"gateway's own cold-start metric {status['last_cold_start_s']}s)"
        )
        assert overhead <= OVERHEAD_LIMIT_S
        assert ready_lag <= OVERHEAD_LIMIT_S
    finally:
        if gw.poll() is None:
            gw.send_signal(signal.SIGTERM)  # the gateway stops the vLLM it launched
        try:
            gw.wait(timeout=90)
        except subprocess.TimeoutExpired:
            gw.kill()
            gw.wait(timeout=10)
        log.close()
        leaked = pgid > 0 and _group_alive(pgid)
        if leaked:
            os.killpg(pgid, signal.SIGKILL)
    assert not leaked, "the gateway left vLLM running"
    assert "Application shutdown complete." in (tmp_path / "gateway.log").read_text()
