"""Fixtures: ``engine`` runs each test on SQLite and on a real PostgreSQL; ``ctx`` is a service
context on it, as the root admin, for a gateway that serves :data:`MODELS`."""

import pytest
from sqlalchemy import Engine
from store_engines import engine  # noqa: F401  (a fixture; postgres_url is tests/conftest.py's)

from fleetgate import config
from fleetgate.services import Actor, Context

MODELS = ("Qwen/Qwen3-8B", "Qwen/Qwen3-32B", "meta/llama-3-8b", "demo")


@pytest.fixture
def ctx(engine: Engine) -> Context:  # noqa: F811  (the engine fixture)
    settings = config.parse({"models": [
        {"name": m, "backend": {"type": "static", "urls": ["http://127.0.0.1:9"]}}
        for m in MODELS
    ]})
    return Context(engine, settings, Actor("root", 7))
