"""Fixtures: ``engine`` runs each test on SQLite and on a real PostgreSQL."""

from store_engines import engine  # noqa: F401  (a fixture; postgres_url is tests/conftest.py's)
