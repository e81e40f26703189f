"""Helpers for the fleet tests: the simulator as a local launcher's engine, settings builders,
and a guard that no test leaves a replica process behind."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fleetgate import config
from fleetgate.fleet.launchers.local import processes

SIM = (sys.executable, "-c", "from fleetgate.cli.main import main; main()", "sim")


def sim_command(*extra: str) -> list[str]:
    return [
        *SIM,
        "--port",
        "{port}",
        "--model",
        "{served_name}",
        "--ttft-ms",
        "0",
        "--tokens-per-s",
        "0",
        *extra,
    ]


def local_backend(tmp: Path, *sim_args: str, **over: Any) -> dict[str, Any]:
    b: dict[str, Any] = {
        "type": "local",
        "command": sim_command(*sim_args),
        "log_dir": str(tmp / "logs"),
        "start_timeout_s": 20,
        "stop_grace_s": 3,
        "health_interval_s": 0.5,
    }
    b.update(over)
    return b


def make_settings(models: list[dict[str, Any]], fleet: dict[str, Any]) -> config.Settings:
    return config.parse({"models": models, "fleet": fleet})


def fleet_dict(tmp: Path, **over: Any) -> dict[str, Any]:
    return {"state_dir": str(tmp / "state"), "control_interval_s": 0.2, **over}


def pid_running(pid: int) -> bool:
    """Alive and not a zombie."""
    st = [s for p, s, _, _ in processes() if p == pid]
    return bool(st) and st[0] != "Z"


def _children_groups() -> set[int]:
    """Process groups led by our descendants (replicas run in their own sessions)."""
    me = os.getpid()
    return {pid for pid, st, ppid, pgrp in processes() if ppid == me and pgrp == pid and st != "Z"}


@pytest.fixture(autouse=True)
def no_leaked_replicas() -> Iterator[None]:
    """Fail a test that leaves a replica running, after killing it so others aren't hurt."""
    before = _children_groups()
    yield
    leaked = _children_groups() - before
    for pgid in leaked:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
    assert not leaked, f"replica process groups left running: {sorted(leaked)}"
