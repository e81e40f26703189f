"""Limits, quotas and network allow-lists on users, groups and keys; richer usage records;
what the web portal needs (local passwords, LDAP identity, server-side sessions).

* ``limits`` (JSON ``{"rpm", "tpm", "max_concurrent", "max_tokens", "max_n"}``, null: none) on
  users, groups and keys; ``quota_tokens`` / ``quota_period`` (``day`` | ``month``) on users and
  groups; ``allow_ips`` (JSON list of CIDRs, null: anywhere) on users and keys.
* ``usage_events`` gains ``user_id``, ``ttft_ms`` and ``disconnected``.
* ``users`` gains ``password_hash`` (argon2, local accounts only) and ``ldap_dn``.
* ``portal_sessions``: server-side sessions, stored by the SHA-256 of their id, never the id.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in ("users", "groups", "api_keys"):
        op.add_column(table, sa.Column("limits", sa.JSON, nullable=True))
    for table in ("users", "groups"):
        op.add_column(table, sa.Column("quota_tokens", sa.BigInteger, nullable=True))
        op.add_column(table, sa.Column("quota_period", sa.String(8), nullable=True))
    for table in ("users", "api_keys"):
        op.add_column(table, sa.Column("allow_ips", sa.JSON, nullable=True))
    op.add_column("users", sa.Column("password_hash", sa.String(255), nullable=True))
    op.add_column("users", sa.Column("ldap_dn", sa.String(1024), nullable=True))

    op.add_column("usage_events", sa.Column("user_id", sa.Integer, nullable=True))
    op.add_column("usage_events", sa.Column("ttft_ms", sa.Integer, nullable=True))
    op.add_column(
        "usage_events",
        sa.Column("disconnected", sa.Boolean, nullable=False, server_default=sa.false()),
    )
    op.create_index("ix_usage_events_user_created", "usage_events", ["user_id", "created_at"])
    op.create_index("ix_usage_events_created", "usage_events", ["created_at"])

    op.create_table(
        "portal_sessions",
        sa.Column("digest", sa.String(64), primary_key=True),
        sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("csrf_token", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("expires_at", sa.DateTime, nullable=False),
        sa.Column("last_seen_at", sa.DateTime, nullable=False),
    )
    op.create_index("ix_portal_sessions_expires", "portal_sessions", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_portal_sessions_expires", "portal_sessions")
    op.drop_table("portal_sessions")
    op.drop_index("ix_usage_events_created", "usage_events")
    op.drop_index("ix_usage_events_user_created", "usage_events")
    with op.batch_alter_table("usage_events") as b:
        for col in ("disconnected", "ttft_ms", "user_id"):
            b.drop_column(col)
    with op.batch_alter_table("users") as b:
        for col in ("ldap_dn", "password_hash", "allow_ips", "quota_period", "quota_tokens",
                    "limits"):
            b.drop_column(col)
    with op.batch_alter_table("groups") as b:
        for col in ("quota_period", "quota_tokens", "limits"):
            b.drop_column(col)
    with op.batch_alter_table("api_keys") as b:
        for col in ("allow_ips", "limits"):
            b.drop_column(col)
