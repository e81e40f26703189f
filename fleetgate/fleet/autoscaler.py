"""How many replicas a model should run: a pure function of what was observed and the policy.

Nothing here sleeps, logs or reads a clock: the controller measures, passes the times in, and
acts on the answer. The hysteresis lives in the inputs: ``high_since`` / ``low_since`` are when
the load last crossed into "above target" / "would fit in one fewer replica", which the
controller tracks with :func:`track`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

from fleetgate.fleet.spec import ScalingPolicy

Level = Literal["high", "low", "ok"]


@dataclass(frozen=True)
class Observed:
    now: float
    current: int  # replicas that count: pending, starting or ready, not draining
    ready: int
    inflight: int = 0  # requests on replicas now
    queued: int = 0  # requests waiting for a replica (cold-start wait mode)
    last_activity: float = 0.0  # last request, demand, up or replica ready (same clock as now)
    demand: bool = False  # someone wants the model now (a rejected or waiting request, an up)
    high_since: float | None = None
    low_since: float | None = None
    last_change: float | None = None  # last scale up or down
    held_down: bool = False  # an operator said `down`: run nothing until new demand


@dataclass(frozen=True)
class Decision:
    desired: int
    reason: str


def level(obs: Observed, policy: ScalingPolicy) -> Level:
    """Classify the load now: above target per ready replica, small enough for one fewer, or ok."""
    load = obs.inflight + obs.queued
    if obs.current == 0:
        return "ok"
    if load > policy.target_inflight * max(obs.ready, 1):
        return "high"
    if obs.current > 1 and load <= policy.target_inflight * policy.scale_down_below * (
        obs.current - 1
    ):
        return "low"
    return "ok"


def track(obs: Observed, lvl: Level) -> Observed:
    """Carry ``high_since``/``low_since`` forward: kept while the level holds, reset when not."""
    high = (obs.high_since if obs.high_since is not None else obs.now) if lvl == "high" else None
    low = (obs.low_since if obs.low_since is not None else obs.now) if lvl == "low" else None
    return replace(obs, high_since=high, low_since=low)


def decide(obs: Observed, policy: ScalingPolicy) -> Decision:
    lo, hi = policy.min_replicas, policy.max_replicas
    load = obs.inflight + obs.queued

    if obs.held_down and not obs.demand:
        return Decision(0, "held down by operator")
    floor = 0 if obs.held_down else lo

    if obs.current == 0:
        if obs.demand or load > 0:
            want = max(floor, 1, min(hi, math.ceil(load / policy.target_inflight)))
            return Decision(min(want, hi), "cold start: demand with no replica")
        return Decision(floor, "at minimum" if floor else "idle")

    if (
        policy.idle_timeout_s is not None
        and floor == 0
        and load == 0
        and not obs.demand
        and obs.ready >= obs.current  # a start someone asked for is seen through, not cut
        and obs.now - obs.last_activity >= policy.idle_timeout_s
    ):
        return Decision(0, f"idle for {policy.idle_timeout_s:g}s: scale to zero")

    if obs.current < floor:
        return Decision(floor, "below min_replicas")
    if obs.current > hi:
        return Decision(hi, "above max_replicas")

    if (
        obs.high_since is not None
        and obs.now - obs.high_since >= policy.scale_up_window_s
        and obs.current < hi
        and obs.ready >= obs.current  # replicas still starting will take load soon: wait
    ):
        want = max(obs.current + 1, math.ceil(load / policy.target_inflight))
        return Decision(
            min(want, hi), f"load {load} above target for {policy.scale_up_window_s:g}s"
        )

    if (
        obs.low_since is not None
        and obs.now - obs.low_since >= policy.scale_down_window_s
        and (obs.last_change is None or obs.now - obs.last_change >= policy.scale_down_cooldown_s)
        and obs.current > max(floor, 1)
    ):
        return Decision(obs.current - 1, f"load {load} fits in {obs.current - 1}: scale down one")

    return Decision(obs.current, "steady")
