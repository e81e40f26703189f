"""The SLURM tier: one real single-node cluster per session (``cluster.py``), and per test a
``fleet`` of real gateways (``tests/fleet/e2e.py``) whose jobs run ``fleetgate sim``.

Each test must leave the queue empty (the gateway cancels its jobs when it stops) and no
process of its own behind; the fixture checks both after stopping the gateways, and cleans up
whatever was left so the next test starts from an idle node.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "fleet"))

from cluster import Cluster, missing  # noqa: E402
from e2e import Fleet  # noqa: E402


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    why = missing()
    if why:
        pytest.skip(why)
    c = Cluster(tmp_path_factory.mktemp("slurm"))
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(c.conf)  # every client call, the gateways' included
    try:
        c.start()
        yield c
    finally:
        c.stop()
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old


@pytest.fixture
def fleet(tmp_path: Path, cluster: Cluster) -> Iterator[Fleet]:
    f = Fleet(tmp_path)
    try:
        yield f
    finally:
        for gw in f.gateways:
            if gw.proc.poll() is None:
                gw.terminate(timeout_s=60)
        emptied = cluster.wait_empty(30)
        left = cluster.cancel_all()
        leaked = f.close()
        assert emptied and not left, f"jobs left in the queue after the test: {left}"
        assert not leaked, "processes left running after the test:\n" + "\n".join(leaked)
