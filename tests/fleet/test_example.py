"""examples/local.yaml loads, with the policy it promises."""

from __future__ import annotations

from pathlib import Path

from fleetgate import config
from fleetgate.fleet.spec import LocalBackend, policy_of

EXAMPLE = Path(__file__).parents[2] / "examples" / "local.yaml"


def test_local_example_loads() -> None:
    s = config.load(EXAMPLE)
    demo = s.model("demo")
    assert demo is not None and isinstance(demo.backend, LocalBackend)
    p = policy_of(demo)
    assert p.scaling.min_replicas == 0 and p.cold_start.mode == "wait"
