"""Real vLLM (CPU) as a SLURM job behind the gateway, on the real single-node cluster of the
SLURM tier (``tests/slurm/cluster.py``).

``fleetgate up --wait`` submits the job and shows it queued, starting, then healthy; the job
reports its node and port with its one-time token; the gateway probes vLLM's ``/health`` and
``/v1/models`` itself; then the official ``openai`` client streams a completion through the
gateway. At the end the gateway's shutdown cancels the job and the queue is empty.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "fleet"))
sys.path.insert(0, str(Path(__file__).parents[1] / "slurm"))

from cluster import Cluster, missing  # noqa: E402
from e2e import FLEETGATE, Fleet  # noqa: E402
from vllm_offline import OFFLINE_ENV  # noqa: E402

pytestmark = pytest.mark.real


@pytest.fixture
def slurm(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    why = missing()
    if why:
        pytest.fail(f"the SLURM job test needs a SLURM install: {why}", pytrace=False)
    c = Cluster(tmp_path_factory.mktemp("slurm"))
    monkeypatch.setenv("SLURM_CONF", str(c.conf))
    try:
        c.start()
        yield c
    finally:
        c.stop()


def _model(tmp: Path, vllm_python: Path, model_dir: Path) -> dict[str, Any]:
    command = [
        str(vllm_python), "-m", "vllm.entrypoints.openai.api_server",
        "--model", "{model_path}", "--served-model-name", "{served_name}",
        "--host", "{host}", "--port", "{port}",
        "--dtype", "bfloat16", "--max-model-len", "512", "--enforce-eager",
    ]
    return {
        "name": "tiny-slurm",
        "served_name": "tiny",
        "backend": {
            "type": "slurm",
            "command": command,
            "model_path": str(model_dir),
            "callback_url": "http://127.0.0.1:1",  # set below, once the port is known
            "env": dict(OFFLINE_ENV),
            "cpus_per_task": 1,
            "mem": "6000M",
            "time_limit": "00:30:00",
            "log_dir": str(tmp / "joblogs"),
            "poll_interval_s": 2,
            "start_timeout_s": 600,
            "stop_grace_s": 30,
        },
        "scaling": {"min_replicas": 0, "max_replicas": 1},
        "cold_start": {"mode": "wait", "wait_timeout_s": 600},
    }


def test_vllm_as_a_slurm_job_streams_through_the_gateway(
    slurm: Cluster, vllm_python: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    fleet = Fleet(tmp_path)
    try:
        doc = fleet.config([_model(tmp_path, vllm_python, tiny_model_dir)])
        doc["models"][0]["backend"]["callback_url"] = f"http://127.0.0.1:{doc['server']['port']}"
        gw = fleet.gateway(doc)
        env = {**fleet.env, "FLEETGATE_URL": gw.url, "FLEETGATE_API_KEY": gw.admin_key}
        t0 = time.monotonic()
        up = subprocess.run(
            [*FLEETGATE, "up", "tiny-slurm", "--wait", "--timeout", "600"],
            env=env, capture_output=True, text=True, timeout=660,
        )
        took = time.monotonic() - t0
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-2000:] + gw.log()
        print(f"\nup --wait ({took:.1f}s):\n{up.stdout[-2000:]}")
        assert ": healthy" in up.stdout
        rep = gw.replicas("tiny-slurm", "ready")[0]
        assert rep["slurm_state"] == "RUNNING" and rep["node"] == slurm.host
        assert rep["job_id"] in {j["job_id"] for j in slurm.jobs()}

        stream = gw.client(timeout=120).chat.completions.create(
            model="tiny-slurm",
            messages=[{"role": "user", "content": "Say hello"}],
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
        )
        pieces, usage = [], None
        for chunk in stream:
            if chunk.choices:
                pieces.append(chunk.choices[0].delta.content or "")
            if chunk.usage is not None:
                usage = chunk.usage
        assert len([p for p in pieces if p]) >= 2 and usage is not None
        assert usage.completion_tokens > 0
        assert gw.terminate(timeout_s=90) == "clean"
        assert slurm.wait_empty(60), slurm.jobs()
    finally:
        slurm.cancel_all()
        leaked = fleet.close()
        assert not leaked, leaked
