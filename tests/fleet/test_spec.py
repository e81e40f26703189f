"""The fleet's config models as policy: what `policy_of` derives and the Retry-After estimate
(pure functions, tables of cases)."""

from __future__ import annotations

from typing import Any

import pytest

from fleetgate import config
from fleetgate.fleet.spec import ColdStartPolicy, policy_of, retry_after_estimate

LOCAL: dict[str, Any] = {"type": "local", "command": "engine --port {port}"}


def scaling_of(backend: dict[str, Any], scaling: dict[str, Any]) -> tuple[int, int, Any]:
    s = config.parse({"models": [{"name": "m", "backend": backend, "scaling": scaling}]})
    m = s.model("m")
    assert m is not None
    p = policy_of(m).scaling
    return p.min_replicas, p.max_replicas, p.idle_timeout_s


POLICY = [
    # (name, backend, scaling, (min, max, idle_timeout_s))
    ("local as configured", LOCAL, {"min_replicas": 1, "max_replicas": 3}, (1, 3, 900)),
    (
        "static: one replica per URL, never idle",
        {"type": "static", "urls": ["http://a:1", "http://b:1"]},
        {"min_replicas": 0, "max_replicas": 5},
        (2, 2, None),
    ),
    (
        "GPUs cap max_replicas",
        {**LOCAL, "gpus": [0, 1, 2], "gpus_per_replica": 2},
        {"min_replicas": 2, "max_replicas": 4},
        (1, 1, 900),
    ),
    (
        "shared GPUs don't cap",
        {**LOCAL, "gpus": [0], "gpus_per_replica": 1, "share_gpus": True},
        {"max_replicas": 4},
        (0, 4, 900),
    ),
]


@pytest.mark.parametrize(("name", "backend", "scaling", "want"), POLICY, ids=[c[0] for c in POLICY])
def test_policy_of(name: str, backend: dict[str, Any], scaling: dict[str, Any], want: Any) -> None:
    assert scaling_of(backend, scaling) == want


RETRY_AFTER = [
    # (name, retry_after_s setting, seconds left of the last cold start, Retry-After)
    ("fixed setting wins", 7, 100.0, 7),
    ("unknown: a guess", None, None, 5),
    ("what is left, rounded up", None, 2.2, 3),
    ("at least one second", None, 0.0, 1),
    ("at most thirty", None, 400.0, 30),
]


@pytest.mark.parametrize(
    ("name", "fixed", "left", "want"), RETRY_AFTER, ids=[c[0] for c in RETRY_AFTER]
)
def test_retry_after_estimate(name: str, fixed: int | None, left: float | None, want: int) -> None:
    assert retry_after_estimate(ColdStartPolicy(retry_after_s=fixed), left) == want
