"""The local launcher on real processes: start, observe, stop the whole group, GPUs, ports,
state files and adoption. Engines here are tiny shell/Python commands; the simulator is used
where an HTTP engine is needed (see test_pool.py)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import pytest
from fleet_helpers import (
    no_leaked_replicas,  # noqa: F401  (autouse: no process outlives a test)
    pid_running,
)
from pydantic import TypeAdapter

from fleetgate.fleet.launchers.base import LaunchError, LaunchSpec
from fleetgate.fleet.launchers.local import LocalLauncher
from fleetgate.fleet.spec import Backend, FleetSettings, LocalBackend

pytestmark = pytest.mark.asyncio


def backend(tmp: Path, command: list[str] | str, **over: Any) -> LocalBackend:
    doc = {"type": "local", "command": command, "log_dir": str(tmp / "logs"), "stop_grace_s": 2}
    b: object = TypeAdapter(Backend).validate_python({**doc, **over})
    assert isinstance(b, LocalBackend)
    return b


def spec(b: LocalBackend, rid: str = "m-1") -> LaunchSpec:
    return LaunchSpec(model="m", replica_id=rid, backend=b, served_name="m")


def launcher(tmp: Path) -> LocalLauncher:
    return LocalLauncher(FleetSettings(state_dir=str(tmp / "state")))


async def eventually(pred: Any, timeout_s: float = 5.0) -> None:
    for _ in range(int(timeout_s / 0.05)):
        if pred():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met in time")


def text(path: str | Path) -> str:
    return Path(path).read_text()


SLEEPER = ["sh", "-c", "echo started on {port}; exec sleep 30"]


async def test_exit_code_and_log_tail_are_reported(tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        "-c",
        "import sys; print('loading...'); print('boom: no weights'); sys.exit(7)",
        "{port}",
    ]
    la = launcher(tmp_path)
    h = await la.start(spec(backend(tmp_path, cmd)))
    try:
        await eventually(
            lambda: h.replica_id not in la._procs or la._procs[h.replica_id].poll() is not None
        )
        obs = await la.poll(h)
        assert not obs.running and obs.exit_code == 7 and obs.kind == "exited"
        assert "exited with code 7" in obs.detail and "boom: no weights" in obs.detail
    finally:
        await la.stop(h)
    assert text(h.info["log"]).splitlines()[1:] == ["loading...", "boom: no weights"]


async def test_port_taken_is_named(tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        "-c",
        "print('OSError: [Errno 98] Address already in use'); exit(1)",
        "{port}",
    ]
    la = launcher(tmp_path)
    h = await la.start(spec(backend(tmp_path, cmd)))
    try:
        await eventually(lambda: la._procs[h.replica_id].poll() is not None)
        obs = await la.poll(h)
        assert obs.kind == "port_taken" and f"port taken ({h.info['port']})" in obs.detail
    finally:
        await la.stop(h)


async def test_busy_port_range_refuses_to_launch(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        la = launcher(tmp_path)
        with pytest.raises(LaunchError) as e:
            await la.start(spec(backend(tmp_path, SLEEPER, port_range=[port, port])))
        assert e.value.kind == "port_taken"


async def test_sigkill_is_observed(tmp_path: Path) -> None:
    la = launcher(tmp_path)
    h = await la.start(spec(backend(tmp_path, SLEEPER)))
    try:
        assert (await la.poll(h)).running
        os.kill(h.info["pid"], signal.SIGKILL)
        await eventually(lambda: la._procs[h.replica_id].poll() is not None)
        obs = await la.poll(h)
        assert obs.kind == "killed" and obs.exit_code == -9 and "killed by SIGKILL" in obs.detail
    finally:
        await la.stop(h)


async def test_stop_kills_the_whole_group_even_if_it_ignores_sigterm(tmp_path: Path) -> None:
    cmd = ["sh", "-c", "trap '' TERM; sleep 30 & echo child $!; sleep 30 # {port}"]
    la = launcher(tmp_path)
    h = await la.start(spec(backend(tmp_path, cmd, stop_grace_s=0.3)))
    log = Path(h.info["log"])
    try:
        await eventually(lambda: "\nchild " in log.read_text())
        child = int(text(log).split("\nchild ")[1].split()[0])
        assert pid_running(child)
        state_file = la.state_dir / "m-1.json"
        assert state_file.exists()
    finally:
        await la.stop(h)
    assert not pid_running(h.info["pid"]) and not pid_running(child)
    assert not state_file.exists()


async def test_gpus_are_never_shared_unless_told(tmp_path: Path) -> None:
    cmd = ["sh", "-c", "echo CVD=$CUDA_VISIBLE_DEVICES slot={gpus}; exec sleep 30 # {port}"]
    la = launcher(tmp_path)
    b = backend(tmp_path, cmd, gpus=[0, 1, 2], gpus_per_replica=1)
    h1 = await la.start(spec(b, "m-1"))
    h2 = await la.start(spec(b, "m-2"))
    h3 = await la.start(spec(b, "m-3"))
    try:
        with pytest.raises(LaunchError, match="no free GPU"):
            await la.start(spec(b, "m-4"))
        got = [h.info["gpus"] for h in (h1, h2, h3)]
        assert sorted(g for gs in got for g in gs) == ["0", "1", "2"]
        log = Path(h2.info["log"])
        await eventually(lambda: "CVD=" in log.read_text())
        assert f"CVD={got[1][0]} slot={got[1][0]}" in text(log)
        await la.stop(h2)
        h4 = await la.start(spec(b, "m-4"))
        assert h4.info["gpus"] == got[1]
        await la.stop(h4)
    finally:
        for h in (h1, h3):
            await la.stop(h)


async def test_shared_gpus_spread_evenly(tmp_path: Path) -> None:
    la = launcher(tmp_path)
    b = backend(tmp_path, SLEEPER, gpus=["a", "b"], gpus_per_replica=1, share_gpus=True)
    hs = [await la.start(spec(b, f"m-{i}")) for i in range(3)]
    try:
        assert sorted(h.info["gpus"][0] for h in hs) == ["a", "a", "b"]
    finally:
        for h in hs:
            await la.stop(h)


async def test_a_restarted_gateway_adopts_live_replicas_and_drops_dead_ones(tmp_path: Path) -> None:
    first = launcher(tmp_path)
    b = backend(tmp_path, SLEEPER, gpus=["0"], gpus_per_replica=1)
    live = await first.start(spec(b, "m-live"))
    dead = await first.start(spec(backend(tmp_path, SLEEPER), "m-dead"))
    os.kill(dead.info["pid"], signal.SIGKILL)
    first._procs[dead.replica_id].wait(5)
    # The first gateway "dies" without stopping anything; a new one reads the state files.
    second = launcher(tmp_path)
    found = await second.adopt()
    try:
        assert [h.replica_id for h in found] == ["m-live"]
        h = found[0]
        assert h.adopted and h.info["pid"] == live.info["pid"] and h.url == live.url
        assert (await second.poll(h)).running
        assert not (second.state_dir / "m-dead.json").exists()
        with pytest.raises(LaunchError, match="no free GPU"):  # the adopted one holds GPU 0
            await second.start(spec(b, "m-new"))
    finally:
        for h in found:
            await second.stop(h)
        first._procs.clear()
    assert not pid_running(live.info["pid"])
    assert list(second.state_dir.glob("*.json")) == []


async def test_a_reused_pid_is_not_adopted(tmp_path: Path) -> None:
    la = launcher(tmp_path)
    la.state_dir.mkdir(parents=True)
    rec = {
        "replica_id": "m-x",
        "model": "m",
        "url": "http://127.0.0.1:1",
        "info": {"pid": os.getpid(), "pgid": 0, "start_time": "1", "gateway_pid": 0},
    }
    (la.state_dir / "m-x.json").write_text(json.dumps(rec))
    assert await la.adopt() == []
    assert not (la.state_dir / "m-x.json").exists()


async def test_command_template_is_validated() -> None:
    with pytest.raises(ValueError, match="port"):
        TypeAdapter(Backend).validate_python({"type": "local", "command": "vllm serve x"})
    with pytest.raises(ValueError, match="unknown template slot"):
        TypeAdapter(Backend).validate_python({"type": "local", "command": "x {port} {nope}"})
    with pytest.raises(ValueError, match="model_path"):
        TypeAdapter(Backend).validate_python({"type": "local", "command": "x {port} {model_path}"})
    with pytest.raises(ValueError, match="gpus_per_replica"):
        TypeAdapter(Backend).validate_python(
            {"type": "local", "command": "x {port}", "gpus": [0], "gpus_per_replica": 2}
        )


def _mode(path: str | Path) -> int:
    return os.stat(path).st_mode & 0o777


async def test_an_api_key_in_the_command_stays_out_of_the_state_file_and_the_tail(
    tmp_path: Path,
) -> None:
    """The engine prints its own arguments (vLLM does); FleetGate repeats none of it."""
    secret = "sk-engine-secret-4f9a1c"
    cmd = ["sh", "-c", 'echo "engine args: --api-key $3"; exit 3', "engine", "{port}",
           "--api-key", secret]
    la = launcher(tmp_path)
    old = os.umask(0o022)
    try:
        h = await la.start(spec(backend(tmp_path, cmd)))
    finally:
        os.umask(old)
    state = next((tmp_path / "state" / "local").glob("*.json"))
    assert secret not in state.read_text()
    assert json.loads(state.read_text())["info"]["argv"][-1] == "***"
    obs = None
    for _ in range(100):
        obs = await la.poll(h)
        if not obs.running:
            break
        await asyncio.sleep(0.05)
    assert obs is not None and not obs.running
    assert "engine args: --api-key ***" in obs.detail and secret not in obs.detail
    assert secret not in la.log_tail(h, 5)
    assert secret in text(h.info["log"])  # the engine's own words: its file is private instead
    assert (_mode(h.info["log"]), _mode(state)) == (0o600, 0o600)
    await la.stop(h)
