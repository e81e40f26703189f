"""The README's first command: `fleetgate demo` serves the labelled simulator with a new key."""

from __future__ import annotations

import subprocess
import time

import openai
from helpers import FLEETGATE, free_port, stop, wait_http


def test_demo_serves_the_simulator_with_a_printed_key(tmp_path):
    port, sim_port = free_port(), free_port()
    proc = subprocess.Popen(
        [*FLEETGATE, "demo", "--port", str(port), "--sim-port", str(sim_port),
         "--dir", str(tmp_path / "state")],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True, text=True,
    )
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line.rstrip("\n"))
            if line.startswith("fg-"):
                break
        key = lines[-1]
        assert key.startswith("fg-"), lines
        assert any("SIMULATOR" in ln for ln in lines)
        wait_http(f"http://127.0.0.1:{port}/ready", 30, None)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key)
        models = c.models.list().data
        assert [m.id for m in models] == ["demo"]
        assert "simulator" in (models[0].model_extra or {}).get("label", "").lower()
        r = c.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}],
                                      max_tokens=3)
        assert r.choices[0].message.content
    finally:
        stop(proc)
