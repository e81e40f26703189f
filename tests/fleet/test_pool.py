"""The pool and its control plane on real processes, with `fleetgate sim` as the engine."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from fleet_helpers import (
    fleet_dict,
    local_backend,
    make_settings,
    no_leaked_replicas,  # noqa: F401  (autouse: no process outlives a test)
    pid_running,
)

from fleetgate.errors import ModelNotFound, Unavailable
from fleetgate.fleet.pool import Pool
from fleetgate.fleet.replica import State

pytestmark = pytest.mark.asyncio

FAST_RESTART = {"max_restarts": 2, "backoff_initial_s": 0.1, "backoff_max_s": 0.2}


@contextlib.asynccontextmanager
async def running(settings: Any) -> AsyncIterator[Pool]:
    pool = Pool(settings)
    await pool.start()
    try:
        yield pool
    finally:
        await pool.stop(timeout_s=10)


def model(
    tmp: Path, *sim_args: str, name: str = "m", backend: dict[str, Any] | None = None, **policy: Any
) -> dict[str, Any]:
    return {"name": name, "backend": backend or local_backend(tmp, *sim_args), **policy}


async def until(pred: Any, timeout_s: float, what: str = "condition") -> None:
    for _ in range(int(timeout_s / 0.02)):
        if pred():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{what}: not met within {timeout_s}s")


async def test_fifty_cold_requests_launch_once_and_ready_follows_health(tmp_path: Path) -> None:
    s = make_settings(
        [model(tmp_path, "--startup-delay-s", "1", scaling={"idle_timeout_s": 1.5})],
        fleet_dict(tmp_path),
    )
    async with running(s) as pool:
        errors = []
        for _ in range(50):
            with pytest.raises(Unavailable) as e:
                pool.acquire("m")
            errors.append(e.value)
        assert all(e.status == 503 and e.headers["retry-after"] for e in errors)
        g = pool.groups["m"]
        await until(lambda: g.replicas and g.replicas[0].url, 5, "launched")
        rep = g.replicas[0]
        # Watch /health ourselves, as tightly as we can, and compare with when it became routable.
        first_200 = None
        async with aiohttp.ClientSession() as http:
            for _ in range(1000):
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    async with http.get(f"{rep.url}/health") as r:
                        if r.status == 200:
                            first_200 = time.monotonic()
                            break
                await asyncio.sleep(0.02)
        assert first_200 is not None
        await pool.wait_ready("m", 10)
        assert rep.ready_at is not None and rep.ready_at - first_200 < 1.0
        assert g.stats.launches == 1 and len(g.replicas) == 1
        lease = pool.acquire("m")
        assert lease.url == rep.url and rep.inflight == 1
        lease.release()
        lease.release()
        assert rep.inflight == 0
        # Nobody asks for 1.5 s: scale to zero, through draining.
        await until(lambda: rep.state is State.STOPPED, 6, "idle scale to zero")
        states = [e.state for e in rep.history]
        assert states == [State.PENDING, State.STARTING, State.READY, State.DRAINING, State.STOPPED]
        assert "idle" in rep.reason
    with pytest.raises(ModelNotFound):
        pool.acquire("nope")


async def test_wait_mode_holds_requests_until_ready(tmp_path: Path) -> None:
    s = make_settings(
        [
            model(
                tmp_path,
                "--startup-delay-s",
                "0.5",
                cold_start={"mode": "wait", "wait_timeout_s": 15},
            )
        ],
        fleet_dict(tmp_path),
    )
    async with running(s) as pool:
        assert pool.cold_start_mode("m") == "wait" and pool.wait_timeout("m") == 15
        waits = [asyncio.create_task(pool.wait_ready("m", 15)) for _ in range(20)]
        await until(lambda: pool.groups["m"].waiters == 20, 2, "waiters counted")
        await asyncio.wait_for(asyncio.gather(*waits), 20)
        assert pool.groups["m"].stats.launches == 1
        assert pool.groups["m"].waiters == 0
        pool.acquire("m").release()


async def test_hang_on_start_times_out_with_reason(tmp_path: Path) -> None:
    be = local_backend(tmp_path, "--hang-on-start", start_timeout_s=1.5)
    s = make_settings(
        [model(tmp_path, backend=be, restart={**FAST_RESTART, "max_restarts": 0})],
        fleet_dict(tmp_path),
    )
    async with running(s) as pool:
        with pytest.raises(Unavailable) as e:
            await pool.wait_ready("m", 1.0)
        assert e.value.status == 503
        g = pool.groups["m"]
        await until(lambda: g.replicas[0].state is State.FAILED, 10, "failed")
        reason = g.replicas[0].reason
        assert "timed out after 1.5s waiting for /health" in reason
        assert "hang-on-start" in reason  # the log tail
        assert g.stats.failures["timeout"] == 1
        with pytest.raises(Unavailable, match="failed to start"):
            pool.acquire("m")
        assert len(g.replicas) == 1  # held failed: demand alone doesn't relaunch


async def test_crash_loop_ends_failed_after_n_restarts_with_backoff(tmp_path: Path) -> None:
    cmd = [sys.executable, "-c", "import sys; print('CUDA out of memory'); sys.exit(3)", "{port}"]
    be = local_backend(tmp_path, command=cmd)
    s = make_settings([model(tmp_path, backend=be, restart=FAST_RESTART)], fleet_dict(tmp_path))
    async with running(s) as pool:
        g = pool.groups["m"]
        pool.up("m")
        await until(lambda: g.replicas and g.replicas[0].state is State.FAILED, 10, "failed")
        rep = g.replicas[0]
        assert rep.reason.startswith("crash loop: 3 failures")
        assert "exited with code 3" in rep.reason and "CUDA out of memory" in rep.reason
        assert g.stats.launches == 3 and rep.restarts == 2
        pending = [e for e in rep.history if e.state is State.PENDING][1:]
        assert [
            "restart 1 of 2 in 0.1s" in pending[0].reason,
            "restart 2 of 2 in 0.2s" in pending[1].reason,
        ] == [True, True]
        assert pool.model_status("m") == "failed"
        assert pool.up("m") == "pending"  # an explicit up clears the failure and tries again
        await until(lambda: g.stats.launches == 4, 5, "relaunched")


async def test_sigkilled_replica_leaves_the_pool_and_is_restarted(tmp_path: Path) -> None:
    s = make_settings(
        [model(tmp_path, scaling={"min_replicas": 1}, restart=FAST_RESTART)], fleet_dict(tmp_path)
    )
    async with running(s) as pool:
        await pool.wait_ready("m", 15)
        g = pool.groups["m"]
        rep = g.replicas[0]
        lease = pool.acquire("m")
        os.kill(rep.handle.info["pid"], signal.SIGKILL)
        await until(lambda: not g.routable, 2, "out of routing")
        assert rep.state is State.PENDING and "killed by SIGKILL" in rep.reason
        lease.release()
        await pool.wait_ready("m", 15)
        assert rep.state is State.READY and rep.restarts == 1 and g.stats.launches == 2
        assert g.stats.failures["killed"] == 1


async def test_load_scales_up_then_down_draining_first(tmp_path: Path) -> None:
    scaling = {
        "min_replicas": 1,
        "max_replicas": 2,
        "target_inflight": 2,
        "scale_up_window_s": 0,
        "scale_down_window_s": 0.3,
        "scale_down_cooldown_s": 0,
        "scale_down_below": 1.0,
        "idle_timeout_s": None,
        "drain_timeout_s": 10,
    }
    s = make_settings([model(tmp_path, scaling=scaling)], fleet_dict(tmp_path))
    async with running(s) as pool:
        await pool.wait_ready("m", 15)
        g = pool.groups["m"]
        first = g.replicas[0]
        leases = [pool.acquire("m") for _ in range(5)]  # 5 in flight > target 2
        await until(lambda: len(g.routable) == 2, 15, "scaled up")
        second = next(r for r in g.routable if r is not first)
        on_second = pool.acquire("m")
        assert on_second.replica is second  # least outstanding
        for lease in leases[1:]:
            lease.release()
        # 2 in flight over 2 replicas fits in one: the newest, still busy, is asked to drain.
        await until(lambda: second.state is State.DRAINING, 5, "draining")
        assert g.routable == [first]
        extra = [pool.acquire("m") for _ in range(3)]
        assert all(lease.replica is first for lease in extra)
        for lease in extra:
            lease.release()
        await asyncio.sleep(0.5)
        assert second.state is State.DRAINING and second.inflight == 1  # nothing is cut
        on_second.release()
        await until(lambda: second.state is State.STOPPED, 10, "stopped after drain")
        assert "drain timed out" not in second.reason
        assert first.state is State.READY
        leases[0].release()


async def test_connect_failure_marks_suspect_until_a_probe_clears_it(tmp_path: Path) -> None:
    s = make_settings([model(tmp_path, scaling={"min_replicas": 1})], fleet_dict(tmp_path))
    async with running(s) as pool:
        await pool.wait_ready("m", 15)
        lease = pool.acquire("m")
        pool.report_connect_failure(lease)
        lease.release()
        assert pool.groups["m"].routable == []  # at once, before any probe
        await pool.wait_ready("m", 3)  # the replica is healthy: the probe clears it
        assert pool.groups["m"].replicas[0].state is State.READY


async def test_gateway_restart_adopts_or_stops_leftovers(tmp_path: Path) -> None:
    be = local_backend(tmp_path, keep_on_shutdown=True)
    s = make_settings(
        [model(tmp_path, backend=be, scaling={"min_replicas": 1})], fleet_dict(tmp_path)
    )
    async with running(s) as first:
        await first.wait_ready("m", 15)
        pid = first.groups["m"].replicas[0].handle.info["pid"]
    os.kill(pid, 0)  # kept running through shutdown
    async with running(s) as second:
        await second.wait_ready("m", 5)
        g = second.groups["m"]
        assert g.stats.launches == 0 and g.replicas[0].handle.info["pid"] == pid
        assert g.replicas[0].history[1].reason == "adopted from a previous gateway run"
        second.launchers["local"].forget(g.replicas[0].handle)  # "crash" again, leaving it
        for t in second.control._tasks:
            t.cancel()
        for _, task in list(second.controllers["m"].tasks.values()):
            task.cancel()
        second.controllers["m"].tasks.clear()
    # Third start with a changed backend: the leftover doesn't match and is stopped.
    changed = make_settings(
        [
            model(
                tmp_path,
                backend={**be, "stop_grace_s": 1, "keep_on_shutdown": False},
                scaling={"min_replicas": 0},
            )
        ],
        fleet_dict(tmp_path),
    )
    async with running(changed) as third:
        assert third.groups["m"].replicas == []
        await until(lambda: not pid_running(pid), 5, "leftover stopped")
    assert list((tmp_path / "state" / "local").glob("*.json")) == []


async def test_static_url_is_routable_at_once_and_probed_after_a_failure(tmp_path: Path) -> None:
    s = make_settings(
        [{"name": "st", "backend": {"type": "static", "urls": ["http://127.0.0.1:9"]}}],
        fleet_dict(tmp_path),
    )
    async with running(s) as pool:
        lease = pool.acquire("st")  # no probe yet: an existing URL is trusted until it fails
        assert lease.url == "http://127.0.0.1:9"
        pool.report_connect_failure(lease)
        lease.release()
        with pytest.raises(Unavailable):
            pool.acquire("st")
        g = pool.groups["st"]
        rep = g.replicas[0]
        await until(lambda: rep.state is State.STARTING, 3, "probed out")
        assert rep.reason.startswith("health check failed: 2 failed health checks")
        assert g.stats.launches == 0
        assert pool.down("st") == "starting"  # static replicas are not ours to stop
        assert not rep.stop_requested.is_set()
