"""End to end: `fleetgate serve` with a local-backend model (the simulator, min_replicas 0) and
the official `openai` client, which gets a completion with no manual step: the gateway answers
503 + Retry-After on the cold start, the client retries on its own, the replica is ready."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import openai
import pytest
from fleet_helpers import no_leaked_replicas, pid_running  # noqa: F401  (autouse guard)
from helpers import free_port, gateway

SIM = [sys.executable, "-c", "from fleetgate.cli.main import main; main()", "sim"]
TOKEN = "fleet-e2e-token-0123456789"


def test_openai_client_gets_a_completion_from_a_cold_model(tmp_path: Path) -> None:
    command = [*SIM, "--port", "{port}", "--model", "{served_name}", "--startup-delay-s", "0.5"]
    cfg = tmp_path / "gw.yaml"
    doc = {
        "auth": {"mode": "static", "tokens": [TOKEN]},
        "store": {"url": f"sqlite:///{tmp_path / 'fg.db'}"},
        "models": [
            {
                "name": "cold",
                "backend": {
                    "type": "local",
                    "command": command,
                    "log_dir": str(tmp_path / "logs"),
                    "start_timeout_s": 30,
                    "stop_grace_s": 3,
                },
            }
        ],
    }
    cfg.write_text(json.dumps(doc))  # JSON is YAML
    state = Path(".fleetgate/state/local")  # the default fleet.state_dir, relative to the cwd
    before = set(state.glob("*.json")) if state.is_dir() else set()
    with gateway(cfg, free_port()) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=TOKEN, max_retries=3, timeout=30)
        with pytest.raises(openai.APIStatusError) as e:
            client.with_options(max_retries=0).completions.create(model="cold", prompt="hi")
        assert e.value.status_code == 503 and e.value.response.headers["retry-after"]
        out = client.chat.completions.create(
            model="cold", messages=[{"role": "user", "content": "hello"}], max_tokens=4
        )
        assert out.choices[0].message.content
        records = set(state.glob("*.json")) - before
        assert len(records) == 1  # exactly one replica launched
        pid = json.loads(records.pop().read_text())["info"]["pid"]
        assert pid_running(pid)
    assert not pid_running(pid)  # the gateway stopped the replica it launched
