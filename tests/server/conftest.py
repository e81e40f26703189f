"""Fixtures of the server tests (helpers live in ``server_helpers``)."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from server_helpers import Running, running  # noqa: E402


@pytest.fixture
async def srv() -> AsyncIterator[Running]:
    async with running(max_body_bytes=100_000) as r:
        yield r
