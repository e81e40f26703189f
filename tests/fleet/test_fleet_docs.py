"""docs/fleet.md names every fleet setting, command and metric."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from fleetgate.fleet.pool import Pool
from fleetgate.fleet.spec import (
    BalancerPolicy,
    ColdStartPolicy,
    FleetSettings,
    LocalBackend,
    RestartPolicy,
    ScalingPolicy,
)
from fleetgate.metrics import render

DOC = (Path(__file__).parents[2] / "docs" / "fleet.md").read_text()

SECTIONS: list[tuple[str, type[BaseModel]]] = [
    ("models[].backend", LocalBackend),
    ("models[].scaling", ScalingPolicy),
    ("models[].cold_start", ColdStartPolicy),
    ("models[].balancer", BalancerPolicy),
    ("models[].restart", RestartPolicy),
    ("fleet", FleetSettings),
]


@pytest.mark.parametrize(("prefix", "model"), SECTIONS, ids=[s[0] for s in SECTIONS])
def test_every_setting_is_documented(prefix: str, model: type[BaseModel]) -> None:
    missing = [f"{prefix}.{f}" for f in model.model_fields if f"`{prefix}.{f}`" not in DOC]
    assert not missing


def test_every_command_and_metric_is_documented(tmp_path: Path) -> None:
    from fleet_helpers import fleet_dict, local_backend, make_settings

    for cmd in ("fleetgate up", "fleetgate down", "fleetgate status"):
        assert f"`{cmd}" in DOC
    pool = Pool(
        make_settings([{"name": "m", "backend": local_backend(tmp_path)}], fleet_dict(tmp_path))
    )
    families = re.findall(r"^# TYPE (\S+)", render(pool), re.M)
    assert families and all(f"`{f}`" in DOC for f in families)
