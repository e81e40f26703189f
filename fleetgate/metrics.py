"""Prometheus text exposition of the fleet: :func:`render`.

The route that serves it is admin-only (or on a separate port) and never open by default; this
module only renders. Rendering reads the pool's published state and counters; it does no I/O
and takes O(models x replicas).
"""

from __future__ import annotations

from collections.abc import Iterable

from fleetgate.fleet.pool import Pool
from fleetgate.fleet.replica import State
from fleetgate.fleet.stats import COLD_START_BUCKETS

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**kv: str) -> str:
    return "{" + ",".join(f'{k}="{_esc(v)}"' for k, v in kv.items()) + "}"


def _num(v: float) -> str:
    if isinstance(v, int) or float(v).is_integer():
        return str(int(v))
    return repr(float(v))


class _Out:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(
        self,
        name: str,
        kind: str,
        help_: str,
        rows: Iterable[tuple[str, float]],
        suffix: str = "",
    ) -> None:
        self.lines.append(f"# HELP {name} {help_}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, value in rows:
            self.lines.append(f"{name}{suffix}{labels} {_num(value)}")


def render(pool: Pool) -> str:
    out = _Out()
    groups = list(pool.groups.values())
    out.family(
        "fleetgate_replicas",
        "gauge",
        "Replicas per model and lifecycle state.",
        (
            (_labels(model=g.name, state=s.value), sum(1 for r in g.replicas if r.state is s))
            for g in groups
            for s in State
        ),
    )
    out.family(
        "fleetgate_replica_state",
        "gauge",
        "1 for each replica's current state (stopped and failed replicas are kept a while).",
        (
            (_labels(model=g.name, replica=r.id, state=r.state.value), 1)
            for g in groups
            for r in g.replicas
        ),
    )
    out.family(
        "fleetgate_replica_routable",
        "gauge",
        "1 when the replica takes new requests.",
        (
            (_labels(model=g.name, replica=r.id), int(r.routable))
            for g in groups
            for r in g.replicas
        ),
    )
    out.family(
        "fleetgate_replica_inflight",
        "gauge",
        "Requests in flight on the replica.",
        ((_labels(model=g.name, replica=r.id), r.inflight) for g in groups for r in g.replicas),
    )
    out.family(
        "fleetgate_model_inflight",
        "gauge",
        "Requests in flight on the model's replicas.",
        ((_labels(model=g.name), g.inflight()) for g in groups),
    )
    out.family(
        "fleetgate_model_queue_length",
        "gauge",
        "Requests waiting for a replica to become ready (cold start wait mode).",
        ((_labels(model=g.name), g.waiters) for g in groups),
    )
    out.family(
        "fleetgate_launches_total",
        "counter",
        "Replica launches.",
        ((_labels(model=g.name), g.stats.launches) for g in groups),
    )
    out.family(
        "fleetgate_restarts_total",
        "counter",
        "Replica restarts after a failure.",
        ((_labels(model=g.name), g.stats.restarts) for g in groups),
    )
    out.family(
        "fleetgate_replica_failures_total",
        "counter",
        "Replica failures by kind (exited, killed, timeout, port_taken, unhealthy, crash_loop, ...).",
        (
            (_labels(model=g.name, kind=kind), n)
            for g in groups
            for kind, n in sorted(g.stats.failures.items())
        ),
    )
    out.family(
        "fleetgate_unavailable_total",
        "counter",
        "Requests answered 'no ready replica' (503 or wait timeout).",
        ((_labels(model=g.name), g.stats.unavailable) for g in groups),
    )
    hist: list[tuple[str, float]] = []
    for g in groups:
        s = g.stats
        for le, n in zip(COLD_START_BUCKETS, s.cold_start_buckets, strict=True):
            hist.append((_labels(model=g.name, le=_num(le)), n))
        hist.append((_labels(model=g.name, le="+Inf"), s.cold_start_count))
    out.family(
        "fleetgate_cold_start_seconds",
        "histogram",
        "Seconds from launch to ready.",
        hist,
        suffix="_bucket",
    )
    # _sum and _count belong to the same family: no HELP/TYPE lines of their own.
    for g in groups:
        out.lines.append(
            f"fleetgate_cold_start_seconds_sum{_labels(model=g.name)} {_num(g.stats.cold_start_sum)}"
        )
        out.lines.append(
            f"fleetgate_cold_start_seconds_count{_labels(model=g.name)} {g.stats.cold_start_count}"
        )
    return "\n".join(out.lines) + "\n"
