"""The README's first command: `fleetgate demo` serves the labelled simulator with a new key,
and takes its simulator down with it however it is stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import openai
import pytest
from helpers import FLEETGATE, free_port, stop, wait_http


def _start_demo(tmp_path: Path) -> tuple[subprocess.Popen[str], int, int, list[str]]:
    port, sim_port = free_port(), free_port()
    proc = subprocess.Popen(
        [*FLEETGATE, "demo", "--port", str(port), "--sim-port", str(sim_port),
         "--dir", str(tmp_path / "state")],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True, text=True,
    )
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
    return proc, port, sim_port, lines


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rfind(")") + 2 :].split()[1]) == pid:
                out.append(int(d.name))
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] != "Z"


def test_demo_serves_the_simulator_with_a_printed_key(tmp_path):
    proc, port, _, lines = _start_demo(tmp_path)
    try:
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


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_demo_stopped_any_way_takes_its_simulator_with_it(tmp_path, sig):
    """SIGTERM is how `timeout` and service managers stop it; SIGKILL stands for a crash."""
    proc, port, sim_port, lines = _start_demo(tmp_path)
    sims: list[int] = []
    try:
        assert lines and lines[-1].startswith("fg-"), lines
        wait_http(f"http://127.0.0.1:{port}/ready", 30, None)
        sims = _children(proc.pid)
        assert sims, "the demo runs its simulator as a child process"
        os.kill(proc.pid, sig)  # the demo process alone, not its process group
        proc.wait(timeout=30)
        for _ in range(200):
            if not any(_alive(p) for p in sims):
                break
            time.sleep(0.05)
        assert not any(_alive(p) for p in sims), "the simulator outlived the demo"
    finally:
        stop(proc)
        for p in sims:  # don't leave it behind even when the test fails
            if _alive(p):
                os.kill(p, signal.SIGKILL)
