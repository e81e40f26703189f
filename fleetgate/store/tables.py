"""Table definitions (SQLAlchemy Core). Portable: nothing SQLite- or Postgres-specific.

Times are naive UTC ``DateTime`` columns. Keys are stored as a SHA-256 hex digest plus a short
display prefix; the whole key is never stored.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
)

metadata = MetaData()

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(200), nullable=False),
    Column("prefix", String(32), nullable=False),
    Column("digest", String(64), nullable=False, unique=True),
    Column("models", JSON, nullable=True),  # null: every model
    Column("admin", Boolean, nullable=False, default=False),
    Column("created_at", DateTime, nullable=False),
    Column("expires_at", DateTime, nullable=True),
    Column("revoked_at", DateTime, nullable=True),
    Column("last_used_at", DateTime, nullable=True),
    Column("updated_at", DateTime, nullable=False),
)
Index("ix_api_keys_updated_at", api_keys.c.updated_at)

usage_events = Table(
    "usage_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("key_id", Integer, ForeignKey("api_keys.id"), nullable=True),
    Column("model", String(200), nullable=False),
    Column("endpoint", String(64), nullable=False),
    Column("status", Integer, nullable=False),
    Column("stream", Boolean, nullable=False),
    Column("prompt_tokens", Integer, nullable=False),
    Column("completion_tokens", Integer, nullable=False),
    Column("latency_ms", Integer, nullable=False),
    Column("created_at", DateTime, nullable=False),
)
Index("ix_usage_events_key_created", usage_events.c.key_id, usage_events.c.created_at)
