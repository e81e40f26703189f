"""Users, groups, memberships, the audit log; keys gain an owner and a rotation overlap.

Creates the built-in users ``default`` (role user) and ``admin`` (role admin) and gives every
existing key an owner: admin keys to ``admin``, the rest to ``default``, so every key keeps the
access it had.

Revision ID: 0002
Revises: 0001
"""

import datetime as dt

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(200), nullable=False, unique=True),
        sa.Column("role", sa.String(16), nullable=False, server_default="user"),
        sa.Column("source", sa.String(16), nullable=False, server_default="local"),
        sa.Column("models", sa.JSON, nullable=True),
        sa.Column("enabled", sa.Boolean, nullable=False, server_default=sa.true()),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("updated_at", sa.DateTime, nullable=False),
        sa.CheckConstraint("role IN ('admin', 'user')", name="ck_users_role"),
    )
    op.create_table(
        "groups",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(200), nullable=False, unique=True),
        sa.Column("models", sa.JSON, nullable=False),
        sa.Column("weight", sa.Float, nullable=False, server_default="1.0"),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("updated_at", sa.DateTime, nullable=False),
    )
    op.create_table(
        "user_groups",
        sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("group_id", sa.Integer, sa.ForeignKey("groups.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("source", sa.String(16), nullable=False, server_default="manual"),
        sa.PrimaryKeyConstraint("user_id", "group_id"),
    )
    op.create_index("ix_user_groups_group", "user_groups", ["group_id"])
    op.create_table(
        "audit_log",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("at", sa.DateTime, nullable=False),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.Column("actor_key_id", sa.Integer, nullable=True),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("object_type", sa.String(32), nullable=False),
        sa.Column("object_id", sa.String(200), nullable=True),
        sa.Column("detail", sa.JSON, nullable=True),
        sa.Column("outcome", sa.String(16), nullable=False),
    )
    op.create_index("ix_audit_log_at", "audit_log", ["at"])

    if op.get_bind().dialect.name == "sqlite":
        # SQLite can't ALTER a constraint in; it takes the reference inline (NULL default), and
        # copying the table (batch mode) would trip the usage_events foreign key.
        op.execute("ALTER TABLE api_keys ADD COLUMN user_id INTEGER REFERENCES users (id)")
    else:
        op.add_column("api_keys", sa.Column("user_id", sa.Integer, nullable=True))
        op.create_foreign_key("fk_api_keys_user", "api_keys", "users", ["user_id"], ["id"])
    op.add_column("api_keys", sa.Column("previous_digest", sa.String(64), nullable=True))
    op.add_column("api_keys", sa.Column("previous_valid_until", sa.DateTime, nullable=True))
    op.add_column("api_keys", sa.Column("rotated_at", sa.DateTime, nullable=True))
    op.create_index("ix_api_keys_user", "api_keys", ["user_id"])
    op.create_index(
        "ux_api_keys_previous_digest", "api_keys", ["previous_digest"], unique=True
    )

    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    users = sa.table(
        "users",
        sa.column("id", sa.Integer), sa.column("name", sa.String), sa.column("role", sa.String),
        sa.column("source", sa.String), sa.column("enabled", sa.Boolean),
        sa.column("created_at", sa.DateTime), sa.column("updated_at", sa.DateTime),
    )
    keys = sa.table(
        "api_keys", sa.column("user_id", sa.Integer), sa.column("admin", sa.Boolean),
        sa.column("updated_at", sa.DateTime),
    )
    bind = op.get_bind()
    ids = {}
    for name, role in (("default", "user"), ("admin", "admin")):
        bind.execute(sa.insert(users).values(
            name=name, role=role, source="local", enabled=True, created_at=now, updated_at=now))
        ids[name] = bind.execute(sa.select(users.c.id).where(users.c.name == name)).scalar_one()
    bind.execute(sa.update(keys).where(keys.c.admin.is_(True)).values(user_id=ids["admin"]))
    bind.execute(sa.update(keys).where(keys.c.user_id.is_(None)).values(user_id=ids["default"]))


def downgrade() -> None:
    op.drop_index("ux_api_keys_previous_digest", "api_keys")
    op.drop_index("ix_api_keys_user", "api_keys")
    with op.batch_alter_table("api_keys") as b:
        for col in ("rotated_at", "previous_valid_until", "previous_digest", "user_id"):
            b.drop_column(col)
    op.drop_table("audit_log")
    op.drop_table("user_groups")
    op.drop_table("groups")
    op.drop_table("users")
