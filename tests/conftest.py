"""Shared fixtures for the fast tiers: a simulator upstream and an in-process gateway."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import sim  # noqa: E402

from fleetgate import config  # noqa: E402
from fleetgate.app import Gateway, create_app  # noqa: E402
from fleetgate.auth import keys as keyfmt  # noqa: E402
from fleetgate.store import repo  # noqa: E402


@pytest.fixture(scope="session")
def sim_url() -> Iterator[str]:
    """One fast simulator serving 'sim' (alias 'upstream-name'), requiring an upstream key."""
    with sim("upstream-name", "--ttft-ms", "0", "--tokens-per-s", "0",
             "--api-key", "upstream-secret-key") as url:
        yield url


def settings_for(tmp: Path, upstream: str, **over: Any) -> config.Settings:
    doc: dict[str, Any] = {
        "auth": {"mode": "keys", "revocation_poll_s": 0.2},
        "store": {"url": f"sqlite:///{tmp / 'fg.db'}"},
        "server": {"max_body_bytes": 64 * 1024},
        "models": [
            {"name": "sim", "served_name": "upstream-name", "api_key": "upstream-secret-key",
             "backend": {"type": "static", "urls": [upstream]}},
            {"name": "other", "served_name": "upstream-name", "api_key": "upstream-secret-key",
             "backend": {"type": "static", "urls": [upstream]}},
        ],
    }
    for k, v in over.items():
        doc[k] = {**doc.get(k, {}), **v} if isinstance(v, dict) else v
    return config.parse(doc)


class GW:
    """An in-process gateway with its lifespan run, plus an httpx client on ASGITransport."""

    def __init__(self, app: Gateway, client: httpx.AsyncClient) -> None:
        self.app = app
        self.client = client

    def key(self, name: str = "k", models: list[str] | None = None, **kw: Any) -> str:
        k = keyfmt.generate()
        repo.insert_key(self.app.engine, name=name, prefix=keyfmt.display_prefix(k),
                        digest=keyfmt.digest(k), models=models, expires_at=kw.get("expires_at"),
                        admin=kw.get("admin", False))
        return k


@pytest.fixture
async def gw(tmp_path: Path, sim_url: str) -> AsyncIterator[GW]:
    app = create_app(settings_for(tmp_path, sim_url))
    await app.startup()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
        yield GW(app, client)
    await app.shutdown()
