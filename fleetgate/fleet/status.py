"""The fleet as plain data: what ``GET /v1/fleet/status``, ``fleetgate status`` and ``/metrics``
show. Reads the pool's published state; changes nothing. Reading the last log line of each
replica touches its log file (a few KB), so this belongs to admin paths, not the request path.
"""

from __future__ import annotations

import time
from typing import Any

from fleetgate.fleet.group import ModelGroup
from fleetgate.fleet.pool import Pool
from fleetgate.fleet.replica import Replica
from fleetgate.redact import redact


def _replica(pool: Pool, g: ModelGroup, r: Replica, now: float) -> dict[str, Any]:
    launcher = pool.launchers.get(g.backend_type)
    info = r.handle.info if r.handle is not None else {}
    last_line = ""
    if r.handle is not None and launcher is not None:
        last_line = launcher.log_tail(r.handle, 1)
    return {
        "id": r.id,
        "state": r.state.value,
        "reason": r.reason,
        "url": r.url,
        "routable": r.routable,
        "suspect": r.suspect,
        "inflight": r.inflight,
        "served": r.served,
        "restarts": r.restarts,
        "age_s": round(now - r.created_at, 3),
        "in_state_s": round(now - r.state_since, 3),
        "idle_s": round(now - r.last_used, 3) if r.inflight == 0 else 0.0,
        "pid": info.get("pid"),
        "gpus": info.get("gpus", []),
        "log": info.get("log"),
        "last_log_line": last_line,
        "events": [e.as_dict() for e in r.history],
        # What the launcher reports beside (a queued SLURM job's state and reason): the
        # fields named in public_fields are shown to every caller allowed the model.
        "note": r.note,
        "eta_s": None if r.eta_s is None else round(r.eta_s),
        **r.private,
        **r.public,
        "public_fields": sorted(r.public),
    }


def model_snapshot(pool: Pool, g: ModelGroup, now: float | None = None) -> dict[str, Any]:
    now = time.monotonic() if now is None else now
    p = g.policy
    s = g.stats
    return {
        "model": g.name,
        "status": pool.model_status(g.name),
        "backend": g.backend_type,
        "replicas": [_replica(pool, g, r, now) for r in g.replicas],
        "ready": len(g.routable),
        "inflight": g.inflight(),
        "queued": g.waiters,
        "idle_s": round(now - g.last_activity, 3),
        "context_length": g.context_length,
        "min_replicas": p.scaling.min_replicas,
        "max_replicas": p.scaling.max_replicas,
        "cold_start": p.cold_start.mode,
        "balancer": p.balancer.strategy,
        "held_down": g.held_down,
        "last_failure": g.last_failure or None,
        "decision": pool.controllers[g.name].last_decision.reason,
        "launches": s.launches,
        "restarts": s.restarts,
        "failures": dict(s.failures),
        "last_cold_start_s": None if s.last_cold_start_s is None else round(s.last_cold_start_s, 3),
    }


def snapshot(pool: Pool, models: list[str] | None = None) -> dict[str, Any]:
    """Every model (or those named) with its replicas, as JSON-safe dicts.

    Every string in it is redacted (:mod:`fleetgate.redact`): reasons and log lines quote the
    engines, whichever launcher runs them, and engines print their own keys.
    """
    now = time.monotonic()
    names = list(pool.groups) if models is None else [m for m in models if m in pool.groups]
    return _redacted({"models": [model_snapshot(pool, pool.groups[n], now) for n in names]})


def _redacted(obj: Any) -> Any:
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {k: _redacted(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_redacted(v) for v in obj]
    return obj
