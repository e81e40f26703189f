"""The scaling decision, as tables of cases (pure: no clock, no I/O)."""

from __future__ import annotations

import pytest

from fleetgate.fleet.autoscaler import Observed, decide, level, track
from fleetgate.fleet.spec import ScalingPolicy

P = ScalingPolicy(
    min_replicas=0,
    max_replicas=4,
    target_inflight=4,
    idle_timeout_s=300,
    scale_up_window_s=10,
    scale_down_window_s=30,
    scale_down_cooldown_s=60,
    scale_down_below=0.5,
)
P1 = P.model_copy(update={"min_replicas": 1})
NO_IDLE = P.model_copy(update={"idle_timeout_s": None})


def obs_(**kw: object) -> Observed:
    base: dict[str, object] = {"now": 1000.0, "current": 1, "ready": 1, "last_activity": 990.0}
    base.update(kw)
    return Observed(**base)  # type: ignore[arg-type]


DECIDE = [
    # (name, observed, policy, desired)
    ("idle at zero stays zero", obs_(current=0, ready=0), P, 0),
    ("demand at zero launches one", obs_(current=0, ready=0, demand=True), P, 1),
    ("queued at zero launches one", obs_(current=0, ready=0, queued=3), P, 1),
    ("big queue at zero launches enough", obs_(current=0, ready=0, queued=11), P, 3),
    ("queue beyond max is capped", obs_(current=0, ready=0, queued=100), P, 4),
    ("min_replicas at zero", obs_(current=0, ready=0), P1, 1),
    (
        "below min",
        obs_(current=1, ready=1),
        P.model_copy(update={"min_replicas": 2, "max_replicas": 4}),
        2,
    ),
    ("above max", obs_(current=5, ready=5, inflight=40), P, 4),
    ("steady", obs_(inflight=3), P, 1),
    ("high but not for the window", obs_(inflight=9, high_since=995.0), P, 1),
    ("high for the window scales up", obs_(inflight=9, high_since=990.0), P, 3),
    ("high scales up at least one", obs_(inflight=5, high_since=980.0), P, 2),
    ("high at max stays", obs_(current=4, ready=4, inflight=99, high_since=900.0), P, 4),
    (
        "high while one is still starting waits",
        obs_(current=2, ready=1, inflight=9, high_since=900.0),
        P,
        2,
    ),
    (
        "low for the window scales down one",
        obs_(current=3, ready=3, inflight=2, low_since=960.0),
        P,
        2,
    ),
    ("low but not for the window", obs_(current=3, ready=3, inflight=2, low_since=990.0), P, 3),
    (
        "low within cooldown stays",
        obs_(current=3, ready=3, inflight=2, low_since=900.0, last_change=950.0),
        P,
        3,
    ),
    (
        "low after cooldown scales down",
        obs_(current=3, ready=3, inflight=2, low_since=900.0, last_change=900.0),
        P,
        2,
    ),
    ("never below one by load", obs_(current=1, ready=1, inflight=0, low_since=0.0), P, 1),
    (
        "never below min by load",
        obs_(current=2, ready=2, low_since=0.0),
        P.model_copy(update={"min_replicas": 2}),
        2,
    ),
    ("idle past timeout scales to zero", obs_(current=2, ready=2, last_activity=600.0), P, 0),
    ("idle but not long enough", obs_(current=2, ready=2, last_activity=800.0), P, 2),
    ("idle while starting waits for ready", obs_(current=1, ready=0, last_activity=0.0), P, 1),
    ("idle with one of two starting", obs_(current=2, ready=1, last_activity=0.0), P, 2),
    ("idle timeout ignored with min 1", obs_(current=1, ready=1, last_activity=0.0), P1, 1),
    ("idle timeout off", obs_(current=1, ready=1, last_activity=0.0), NO_IDLE, 1),
    ("in flight is not idle", obs_(current=1, ready=1, inflight=1, last_activity=0.0), P, 1),
    ("waiting requests are not idle", obs_(current=1, ready=0, queued=1, last_activity=0.0), P, 1),
    (
        "min_replicas keeps replicas",
        obs_(current=2, ready=2, last_activity=0.0),
        P1.model_copy(update={"min_replicas": 2}),
        2,
    ),
    ("held down scales to zero", obs_(current=2, ready=2, held_down=True), P1, 0),
    (
        "held down relaunches on demand",
        obs_(current=0, ready=0, held_down=True, demand=True),
        P1,
        1,
    ),
]


@pytest.mark.parametrize(("name", "obs", "policy", "want"), DECIDE, ids=[c[0] for c in DECIDE])
def test_decide(name: str, obs: Observed, policy: ScalingPolicy, want: int) -> None:
    d = decide(obs, policy)
    assert d.desired == want, d.reason
    assert d.desired <= policy.max_replicas


LEVEL = [
    ("nothing running", obs_(current=0, ready=0, inflight=5), "ok"),
    ("above target", obs_(inflight=5), "high"),
    ("at target", obs_(inflight=4), "ok"),
    ("queue counts", obs_(inflight=2, queued=3), "high"),
    ("per ready replica", obs_(current=2, ready=2, inflight=8), "ok"),
    ("fits in one fewer at half target", obs_(current=2, ready=2, inflight=2), "low"),
    ("does not fit at half target", obs_(current=2, ready=2, inflight=3), "ok"),
    ("one replica is never low", obs_(current=1, ready=1, inflight=0), "ok"),
]


@pytest.mark.parametrize(("name", "obs", "want"), LEVEL, ids=[c[0] for c in LEVEL])
def test_level(name: str, obs: Observed, want: str) -> None:
    assert level(obs, P) == want


def test_hysteresis_over_time() -> None:
    """A load that flaps around the target never scales; a sustained one does, once."""
    obs = obs_(current=1, ready=1)
    desired = []
    for t, inflight in enumerate([5, 3, 5, 3, 5, 3, 5, 3, 5, 3, 5, 3]):
        obs = Observed(
            now=1000.0 + t * 2,
            current=1,
            ready=1,
            inflight=inflight,
            last_activity=1000.0 + t * 2,
            high_since=obs.high_since,
            low_since=obs.low_since,
        )
        obs = track(obs, level(obs, P))
        desired.append(decide(obs, P).desired)
    assert desired == [1] * 12
    for t in range(12):
        obs = Observed(
            now=2000.0 + t * 2,
            current=1,
            ready=1,
            inflight=6,
            last_activity=2000.0 + t * 2,
            high_since=obs.high_since,
            low_since=obs.low_since,
        )
        obs = track(obs, level(obs, P))
        desired.append(decide(obs, P).desired)
    assert desired[12:] == [1] * 5 + [2] * 7  # above target from t=2000; window 10 s -> at 2010


def test_scaling_policy_rejects_min_above_max() -> None:
    with pytest.raises(ValueError, match="min_replicas"):
        ScalingPolicy(min_replicas=3, max_replicas=2)
