"""Status snapshot, Prometheus rendering and the fleet API handlers, on a pool whose replicas
are put in place by hand (no processes)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fleet_helpers import fleet_dict, local_backend, make_settings

from fleetgate.auth.principals import Principal
from fleetgate.errors import InvalidRequest, ModelNotFound, PermissionDenied
from fleetgate.fleet import api_handlers
from fleetgate.fleet.pool import Pool
from fleetgate.fleet.replica import Replica, State
from fleetgate.fleet.status import snapshot
from fleetgate.metrics import render

pytestmark = pytest.mark.asyncio

ADMIN = Principal(name="root", admin=True)
USER = Principal(name="alice", models=frozenset({"m"}))


def pool_with_replicas(tmp: Path) -> Pool:
    s = make_settings(
        [
            {"name": "m", "backend": local_backend(tmp)},
            {"name": 'we"ird', "backend": local_backend(tmp)},
        ],
        fleet_dict(tmp),
    )
    pool = Pool(s)
    g = pool.groups["m"]
    for rid, path in (("m-a", [State.STARTING, State.READY]), ("m-b", [State.STARTING])):
        r = Replica(rid, "m", listener=g.on_replica_change)
        g.add(r)
        r.url = "http://127.0.0.1:1"
        for st in path:
            r._set_state(st, "test")
    g.stats.launches = 2
    g.stats.failures["exited"] = 1
    g.stats.observe_cold_start(1.5)
    return pool


async def test_snapshot_tells_states_and_counts(tmp_path: Path) -> None:
    pool = pool_with_replicas(tmp_path)
    lease = pool.acquire("m")
    snap = snapshot(pool)
    m = snap["models"][0]
    assert m["model"] == "m" and m["status"] == "healthy" and m["ready"] == 1
    assert [(r["id"], r["state"], r["inflight"]) for r in m["replicas"]] == [
        ("m-a", "ready", 1),
        ("m-b", "starting", 0),
    ]
    assert [e["state"] for e in m["replicas"][0]["events"]] == ["pending", "starting", "ready"]
    assert m["launches"] == 2 and m["failures"] == {"exited": 1}
    assert snap["models"][1]["status"] == "stopped"
    lease.release()


async def test_metrics_render_prometheus_text(tmp_path: Path) -> None:
    pool = pool_with_replicas(tmp_path)
    lease = pool.acquire("m")
    text = render(pool)
    lease.release()
    assert 'fleetgate_replicas{model="m",state="ready"} 1' in text
    assert 'fleetgate_replicas{model="m",state="starting"} 1' in text
    assert 'fleetgate_replica_state{model="m",replica="m-a",state="ready"} 1' in text
    assert 'fleetgate_replica_inflight{model="m",replica="m-a"} 1' in text
    assert 'fleetgate_model_inflight{model="m"} 1' in text
    assert 'fleetgate_model_queue_length{model="m"} 0' in text
    assert 'fleetgate_launches_total{model="m"} 2' in text
    assert 'fleetgate_replica_failures_total{model="m",kind="exited"} 1' in text
    assert 'fleetgate_cold_start_seconds_bucket{model="m",le="1"} 0' in text
    assert 'fleetgate_cold_start_seconds_bucket{model="m",le="2"} 1' in text
    assert 'fleetgate_cold_start_seconds_bucket{model="m",le="+Inf"} 1' in text
    assert 'fleetgate_cold_start_seconds_sum{model="m"} 1.5' in text
    assert 'model="we\\"ird"' in text  # label values are escaped
    sample = re.compile(r'^[a-z_]+(\{([a-z]+="([^"\\]|\\.)*",?)*\})? -?[0-9.e+]+$')
    for line in text.splitlines():
        assert line.startswith("# ") or sample.match(line), line
    types = [ln.split()[2] for ln in text.splitlines() if ln.startswith("# TYPE")]
    assert len(types) == len(set(types))


async def test_up_down_status_handlers(tmp_path: Path) -> None:
    pool = pool_with_replicas(tmp_path)
    assert await api_handlers.fleet_up(pool, USER, {"model": "m"}) == (
        200,
        {"model": "m", "status": "healthy"},
    )
    status, body = await api_handlers.fleet_up(pool, ADMIN, {"model": 'we"ird'})
    assert (status, body["status"]) == (200, "pending")
    with pytest.raises(PermissionDenied, match="admin"):
        await api_handlers.fleet_down(pool, USER, {"model": "m"})
    with pytest.raises(PermissionDenied, match="may not use"):
        await api_handlers.fleet_up(pool, USER, {"model": 'we"ird'})
    with pytest.raises(ModelNotFound):
        await api_handlers.fleet_up(pool, ADMIN, {"model": "nope"})
    with pytest.raises(InvalidRequest):
        await api_handlers.fleet_up(pool, ADMIN, {"name": "m"})
    with pytest.raises(InvalidRequest):
        await api_handlers.fleet_up(pool, ADMIN, ["m"])
    _, mine = await api_handlers.fleet_status(pool, USER)
    assert [m["model"] for m in mine["models"]] == ["m"]
    assert "pid" not in mine["models"][0]["replicas"][0]  # redacted for non-admins
    _, everything = await api_handlers.fleet_status(pool, ADMIN)
    assert len(everything["models"]) == 2 and "events" in everything["models"][0]["replicas"][0]
    with pytest.raises(ModelNotFound):
        await api_handlers.fleet_status(pool, USER, 'we"ird')
    status, body = await api_handlers.fleet_down(pool, ADMIN, {"model": "m"})
    assert status == 200 and pool.groups["m"].held_down
    assert all(r.stop_requested.is_set() for r in pool.groups["m"].replicas)


async def test_an_admin_keys_model_list_narrows_the_fleet_routes(tmp_path: Path) -> None:
    """An admin key made with --models m may not start, stop or see another model."""
    pool = pool_with_replicas(tmp_path)
    narrowed = Principal(name="ops", admin=True, models=frozenset({"m"}))
    for call in (api_handlers.fleet_up, api_handlers.fleet_down):
        with pytest.raises(PermissionDenied):
            await call(pool, narrowed, {"model": 'we"ird'})
    with pytest.raises(ModelNotFound):
        await api_handlers.fleet_status(pool, narrowed, 'we"ird')
    _, snap = await api_handlers.fleet_status(pool, narrowed)
    assert [m["model"] for m in snap["models"]] == ["m"]
    assert "events" in snap["models"][0]["replicas"][0]  # still an admin: internals shown
    _, everything = await api_handlers.fleet_status(pool, ADMIN)
    assert len(everything["models"]) == 2


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"object":"list","data":[{"id":"m","max_model_len":4096}]}', 4096),
        (b'{"data":[{"id":"a","max_model_len":2048},{"id":"b","max_model_len":8192}]}', 8192),
        (b'{"data":[{"id":"m"}]}', None),
        (b'{"data":[{"id":"m","max_model_len":"4096"}]}', None),
        (b'{"data":[{"id":"m","max_model_len":true}]}', None),
        (b'{"data":[{"id":"m","max_model_len":-1}]}', None),
        (b'{"data":"x"}', None),
        (b"not json", None),
        (b"[]", None),
    ],
)
def test_context_length_is_read_off_the_models_list(body: bytes, expected: int | None) -> None:
    from fleetgate.fleet.health import context_length

    assert context_length(body) == expected
