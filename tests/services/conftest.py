"""Fixtures: ``engine`` runs each test on SQLite and on a real PostgreSQL."""

from store_engines import engine, postgres_url  # noqa: F401  (fixtures)
