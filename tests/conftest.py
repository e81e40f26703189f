"""Shared fixtures for the fast tiers: a simulator upstream and an in-process gateway."""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import GW, settings_for, sim  # noqa: E402
from leftovers import kill, mark_session, wait_for_none  # noqa: E402

# One PostgreSQL server for the whole session (a fixture imported into several modules would be
# one fixture, and one server, per module).
from pg_server import postgres_url  # noqa: E402, F401, I001

from fleetgate.app import create_app  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def no_process_left_behind() -> Iterator[None]:
    """Fail the run if a gateway, simulator or engine it started outlives it (tests/leftovers.py).

    Autouse and session-scoped, so it is set up first and torn down last: every other
    fixture has stopped its processes by then.
    """
    token = mark_session()
    yield
    left = wait_for_none(token, os.getpid())
    kill(list(left))
    assert not left, "processes the tests started are still running (killed now):\n" + "\n".join(
        f"  {pid}: {cmd[:200]}" for pid, cmd in sorted(left.items())
    )


@pytest.fixture(scope="session")
def sim_url() -> Iterator[str]:
    """One fast simulator serving 'sim' (alias 'upstream-name'), requiring an upstream key."""
    with sim("upstream-name", "--ttft-ms", "0", "--tokens-per-s", "0",
             "--api-key", "upstream-secret-key") as url:
        yield url


@pytest.fixture
async def gw(tmp_path: Path, sim_url: str) -> AsyncIterator[GW]:
    app = create_app(settings_for(tmp_path, sim_url))
    await app.startup()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
        yield GW(app, client)
    await app.shutdown()
