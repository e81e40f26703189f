"""Table definitions (SQLAlchemy Core). Portable: nothing SQLite- or Postgres-specific.

Times are naive UTC ``DateTime`` columns. Keys are stored as a SHA-256 hex digest plus a short
display prefix; the whole key is never stored. During a rotation's overlap the old digest sits in
``previous_digest`` until ``previous_valid_until``; the key's ``id`` never changes.

Model lists (``models``) are JSON lists of glob patterns. On a user or a key, ``NULL`` means
"no narrowing of its own"; on a group, the list is what the group allows (empty: nothing).
``api_keys.updated_at`` is the change feed the gateway polls: anything that changes what a key
may do (revocation, rotation, a change to its user or their groups) bumps it.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
)

metadata = MetaData()

users = Table(
    "users",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(200), nullable=False, unique=True),
    Column("role", String(16), nullable=False, default="user"),
    Column("source", String(16), nullable=False, default="local"),  # local | ldap
    Column("models", JSON, nullable=True),  # null: no narrowing of the user's own
    Column("enabled", Boolean, nullable=False, default=True),
    Column("created_at", DateTime, nullable=False),
    Column("updated_at", DateTime, nullable=False),
    Column("limits", JSON, nullable=True),  # {"rpm", "tpm", ...}; null: none
    Column("quota_tokens", BigInteger, nullable=True),
    Column("quota_period", String(8), nullable=True),  # day | month
    Column("allow_ips", JSON, nullable=True),  # CIDRs; null: anywhere
    Column("password_hash", String(255), nullable=True),  # argon2; local accounts only
    Column("ldap_dn", String(1024), nullable=True),
    CheckConstraint("role IN ('admin', 'user')", name="ck_users_role"),
)

groups = Table(
    "groups",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(200), nullable=False, unique=True),
    Column("models", JSON, nullable=False),  # empty: no model
    Column("weight", Float, nullable=False, default=1.0),
    Column("created_at", DateTime, nullable=False),
    Column("updated_at", DateTime, nullable=False),
    Column("limits", JSON, nullable=True),  # shared by the group's members together
    Column("quota_tokens", BigInteger, nullable=True),
    Column("quota_period", String(8), nullable=True),
)

user_groups = Table(
    "user_groups",
    metadata,
    Column("user_id", Integer, ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("group_id", Integer, ForeignKey("groups.id", ondelete="CASCADE"), nullable=False),
    Column("source", String(16), nullable=False, default="manual"),  # manual | ldap
    PrimaryKeyConstraint("user_id", "group_id"),
)
Index("ix_user_groups_group", user_groups.c.group_id)

audit_log = Table(
    "audit_log",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", DateTime, nullable=False),
    Column("actor", String(200), nullable=False),  # a user name, or "cli"
    Column("actor_key_id", Integer, nullable=True),
    Column("action", String(64), nullable=False),  # e.g. "key.create"
    Column("object_type", String(32), nullable=False),  # user | group | key
    Column("object_id", String(200), nullable=True),
    Column("detail", JSON, nullable=True),  # never a secret
    Column("outcome", String(16), nullable=False),  # ok | denied
)
Index("ix_audit_log_at", audit_log.c.at)

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
    # Every key belongs to a user; null only in a row written by a pre-0002 gateway.
    Column("user_id", Integer, ForeignKey("users.id"), nullable=True),
    Column("previous_digest", String(64), nullable=True),
    Column("previous_valid_until", DateTime, nullable=True),
    Column("rotated_at", DateTime, nullable=True),
    Column("limits", JSON, nullable=True),
    Column("allow_ips", JSON, nullable=True),  # narrows the user's list; null: no narrowing
)
Index("ix_api_keys_updated_at", api_keys.c.updated_at)
Index("ix_api_keys_user", api_keys.c.user_id)
Index("ux_api_keys_previous_digest", api_keys.c.previous_digest, unique=True)

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
    Column("user_id", Integer, nullable=True),  # no FK: usage outlives a deleted user
    Column("ttft_ms", Integer, nullable=True),  # time to the first byte relayed to the client
    Column("disconnected", Boolean, nullable=False, default=False),
)
Index("ix_usage_events_key_created", usage_events.c.key_id, usage_events.c.created_at)
Index("ix_usage_events_user_created", usage_events.c.user_id, usage_events.c.created_at)
Index("ix_usage_events_created", usage_events.c.created_at)

portal_sessions = Table(
    "portal_sessions",
    metadata,
    Column("digest", String(64), primary_key=True),  # SHA-256 of the session id
    Column("user_id", Integer, ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("csrf_token", String(64), nullable=False),
    Column("created_at", DateTime, nullable=False),
    Column("expires_at", DateTime, nullable=False),
    Column("last_seen_at", DateTime, nullable=False),
)
Index("ix_portal_sessions_expires", portal_sessions.c.expires_at)
