"""examples/local.yaml loads (once config.py carries the fleet's policy fields)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleetgate import config
from fleetgate.errors import ConfigError
from fleetgate.fleet.spec import LocalBackend, policy_of

EXAMPLE = Path(__file__).parents[2] / "examples" / "local.yaml"
POLICY_KEYS = ("scaling", "cold_start", "balancer", "restart", "fleet")


def test_local_example_loads() -> None:
    try:
        s = config.load(EXAMPLE)
    except ConfigError as e:
        if all("unknown key" in p and any(k in p for k in POLICY_KEYS) for p in e.problems):
            pytest.skip(f"config.py doesn't carry the fleet fields yet: {e.problems}")
        raise
    demo = s.model("demo")
    assert demo is not None and isinstance(demo.backend, LocalBackend)
    p = policy_of(demo)
    assert p.scaling.min_replicas == 0 and p.cold_start.mode == "wait"
