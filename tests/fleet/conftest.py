"""The ``fleet`` fixture: real gateway processes for the end-to-end tests (see ``e2e.py``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e import Fleet


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    """Gateways and simulators for one test; fails the test if any process outlives it."""
    f = Fleet(tmp_path)
    try:
        yield f
    finally:
        leaked = f.close()
        assert not leaked, "processes left running after the test:\n" + "\n".join(leaked)
