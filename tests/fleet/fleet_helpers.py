"""Helpers for the fleet tests: the simulator as a local launcher's engine, settings builders,
and a guard that no test leaves a replica process behind."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import TypeAdapter

from fleetgate import config
from fleetgate.errors import ConfigError
from fleetgate.fleet.launchers.local import processes
from fleetgate.fleet.spec import (
    Backend,
    BalancerPolicy,
    ColdStartPolicy,
    FleetSettings,
    RestartPolicy,
    ScalingPolicy,
)

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


POLICY_TYPES = {
    "scaling": ScalingPolicy,
    "cold_start": ColdStartPolicy,
    "balancer": BalancerPolicy,
    "restart": RestartPolicy,
}


def make_settings(models: list[dict[str, Any]], fleet: dict[str, Any]) -> Any:
    """Settings through ``config.parse`` once it knows the fleet fields; until then an
    equivalent stand-in (the pool reads them with defaults, see ``spec.policy_of``)."""
    try:
        return config.parse({"models": models, "fleet": fleet})
    except ConfigError as e:
        if "unknown key" not in str(e):
            raise
    ms = []
    for m in models:
        m = dict(m)
        ns = types.SimpleNamespace(
            name=m.pop("name"),
            backend=TypeAdapter(Backend).validate_python(m.pop("backend")),
            api_key=m.pop("api_key", None),
        )
        ns.upstream_name = m.pop("served_name", None) or ns.name
        for k, t in POLICY_TYPES.items():
            setattr(ns, k, t.model_validate(m.pop(k, {})))
        assert not m, m
        ms.append(ns)
    return types.SimpleNamespace(models=tuple(ms), fleet=FleetSettings.model_validate(fleet))


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
