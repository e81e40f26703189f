"""Real vLLM (CPU) started on request from a template: the tiny model's directory matches a
``/…/*`` template, ``POST /up`` (Autoserve's route, a bearer key) starts it, polling ``/up``
reaches ``healthy``, and the official client chats with it under its path.

It starts one vLLM server besides the session's shared one and stops it (through the gateway's
shutdown) before it returns; it checks that vLLM's process group is gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from vllm_offline import OFFLINE_ENV

from fleetgate.fleet.launchers.local import processes
from fleetgate.localnet import free_port

pytestmark = pytest.mark.real

REPO = Path(__file__).resolve().parents[2]
FLEETGATE = [sys.executable, "-c", "from fleetgate.cli.main import main; main()"]


def _config(work: Path, port: int, vllm_python: Path, model_dir: Path) -> dict[str, Any]:
    command = [
        str(vllm_python), "-m", "vllm.entrypoints.openai.api_server",
        "--model", "{model_path}", "--served-model-name", "{served_name}",
        "--port", "{port}", "--host", "127.0.0.1",
        "--dtype", "bfloat16", "--max-model-len", "512", "--enforce-eager",
    ]
    return {
        "server": {"host": "127.0.0.1", "port": port, "shutdown_grace_s": 10},
        "auth": {"mode": "keys"},
        "store": {"url": f"sqlite:///{work / 'fg.db'}"},
        "fleet": {"state_dir": str(work / "state")},
        "templates": [
            {
                "name": "checkpoints",
                "match": [f"{model_dir.parent}/*"],
                "max_models": 1,
                "backend": {
                    "type": "local",
                    "command": command,
                    "env": dict(OFFLINE_ENV),
                    "log_dir": str(work / "logs"),
                    "start_timeout_s": 600,
                    "stop_grace_s": 30,
                },
                "cold_start": {"mode": "reject"},
            }
        ],
    }


def test_up_starts_the_tiny_model_from_a_template(
    vllm_python: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    path = str(tiny_model_dir)
    port = free_port()
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(json.dumps(_config(tmp_path, port, vllm_python, tiny_model_dir)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    made = subprocess.run(
        [*FLEETGATE, "keys", "create", "--config", str(cfg), "--name", "ops", "--admin"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env,
    )
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip().splitlines()[-1]
    base = f"http://127.0.0.1:{port}"
    auth = {"authorization": f"Bearer {key}"}
    log = open(tmp_path / "gateway.log", "wb")  # noqa: SIM115 - closed below
    gw = subprocess.Popen(
        [*FLEETGATE, "serve", "--config", str(cfg)],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        cwd=tmp_path, env=env, start_new_session=True,
    )
    pgid = 0
    try:
        for _ in range(600):
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/ready", timeout=1).status_code == 200:
                    break
            assert gw.poll() is None, (tmp_path / "gateway.log").read_text()[-3000:]
            time.sleep(0.1)

        first = httpx.post(f"{base}/up", json={"model_path": path}, headers=auth, timeout=10)
        assert first.status_code == 200 and first.json()["status"] == "pending", first.text
        started = time.monotonic()
        statuses = []
        while time.monotonic() - started < 600:
            doc = httpx.post(f"{base}/up", json={"model_path": path}, headers=auth, timeout=10).json()
            statuses.append(doc["status"])
            if doc["status"] in ("healthy", "failed"):
                break
            time.sleep(1)
        assert statuses[-1] == "healthy", (statuses[-5:], (tmp_path / "gateway.log").read_text()[-3000:])
        took = time.monotonic() - started
        (rec,) = [json.loads(p.read_text()) for p in (tmp_path / "state" / "local").glob("*.json")]
        pgid = int(rec["info"]["pgid"])
        argv = rec["info"]["argv"]
        assert argv[argv.index("--model") + 1] == path

        client = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=120)
        reply = client.chat.completions.create(
            model=path, messages=[{"role": "user", "content": "Hello"}], max_tokens=4,
            extra_body={"ignore_eos": True},
        )
        assert reply.model == path and reply.usage is not None
        assert reply.usage.completion_tokens == 4
        listed = {m.id: m.model_dump() for m in client.models.list().data}
        assert listed[path]["dynamic"] is True
        print(f"\n/up to healthy for real vLLM from a template: {took:.1f}s ({len(statuses)} polls)")
    finally:
        if gw.poll() is None:
            gw.terminate()
            try:
                gw.wait(timeout=90)
            except subprocess.TimeoutExpired:
                gw.kill()
                gw.wait(timeout=10)
        log.close()
        if pgid:
            alive = [p for p, st, _, g in processes() if g == pgid and st != "Z"]
            for p in alive:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, 9)
            assert not alive, f"vLLM's processes outlived the gateway: {alive}"
