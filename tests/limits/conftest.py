"""Fixtures for the limits tests: a session-wide real Redis, fake clocks."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from limits_fakes import FakeClock
from redis_server import RedisServer, redis_server


@pytest.fixture(scope="session")
def redis_srv() -> Iterator[RedisServer]:
    with redis_server() as srv:
        yield srv


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()
