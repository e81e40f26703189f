"""``fleetgate keys``: create, list and revoke personal API keys in the configured store."""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Callable
from typing import Any, TypeVar

import click
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from fleetgate.auth import keys as keyfmt
from fleetgate.cli.serve import load_or_exit
from fleetgate.config import Settings
from fleetgate.store import repo
from fleetgate.store.db import migrate, open_engine

_config_opt = click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(dir_okay=False),
    help="The gateway's YAML config (its store is used).",
)


def _engine(settings: Settings) -> Engine:
    engine = open_engine(settings.store.url)
    migrate(engine)
    return engine


F = TypeVar("F", bound=Callable[..., None])


def store_errors(fn: F) -> F:
    """Turn a store that can't be opened or written into one clear line, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except (SQLAlchemyError, OSError) as e:
            reason = getattr(e, "orig", None) or e
            raise click.ClickException(f"the key store can't be used: {reason}") from None

    return wrapper  # type: ignore[return-value]


def create_key(
    settings: Settings,
    *,
    name: str,
    models: list[str] | None,
    expires: dt.timedelta | None,
    admin: bool = False,
) -> str:
    """Create a key and return it whole. The store keeps only its digest."""
    if models is not None:
        unknown = [m for m in models if settings.model(m) is None]
        if unknown:
            raise click.ClickException(
                f"unknown model(s) {', '.join(unknown)}; configured: "
                + (", ".join(m.name for m in settings.models) or "none")
            )
    key = keyfmt.generate()
    repo.insert_key(
        _engine(settings),
        name=name,
        prefix=keyfmt.display_prefix(key),
        digest=keyfmt.digest(key),
        models=models,
        expires_at=(repo.utcnow() + expires) if expires else None,
        admin=admin,
    )
    return key


@click.group()
def keys() -> None:
    """Manage personal API keys.

    \b
    Examples:
      fleetgate keys create --config gw.yaml --name alice --models llama,qwen --expires 30d
      fleetgate keys list --config gw.yaml
      fleetgate keys revoke --config gw.yaml 3
    """


def _duration(ctx: click.Context, param: click.Parameter, value: str | None) -> dt.timedelta | None:
    if value is None:
        return None
    try:
        return keyfmt.parse_duration(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


@keys.command("create")
@_config_opt
@click.option("--name", required=True, help="Who or what the key is for.")
@click.option("--models", default=None, help="Comma-separated allow-list (default: all models).")
@click.option("--expires", default=None, callback=_duration, help="Lifetime, e.g. 30d, 12h, 2w.")
@click.option("--admin", is_flag=True, help="May use admin routes (fleet control, /metrics).")
@store_errors
def create(
    config_path: str, name: str, models: str | None, expires: dt.timedelta | None, admin: bool
) -> None:
    """Create a key. The key is printed once, alone on the last line."""
    settings = load_or_exit(config_path)
    allow = [m.strip() for m in models.split(",") if m.strip()] if models is not None else None
    if allow is not None and not allow:
        raise click.BadParameter(
            "give at least one model, or leave --models out", param_hint="--models"
        )
    key = create_key(settings, name=name, models=allow, expires=expires, admin=admin)
    click.echo(f"Created key for {name!r}. It is shown only this once:", err=True)
    click.echo(key)


def _fmt(t: dt.datetime | None) -> str:
    return t.strftime("%Y-%m-%d %H:%M") if t else "-"


@keys.command("list")
@_config_opt
@store_errors
def list_(config_path: str) -> None:
    """List keys: id, name, prefix, models, created, expires, last used. Never whole keys."""
    settings = load_or_exit(config_path)
    rows = repo.list_keys(_engine(settings))
    now = repo.utcnow()
    header = ("ID", "NAME", "PREFIX", "MODELS", "CREATED", "EXPIRES", "LAST USED", "STATUS")
    table = [header]
    for r in rows:
        status = (
            "revoked"
            if r.revoked_at
            else ("expired" if r.expires_at and r.expires_at <= now else "active")
        )
        table.append(
            (
                str(r.id),
                r.name,
                r.prefix + "…",
                ",".join(r.models) if r.models else "*",
                _fmt(r.created_at),
                _fmt(r.expires_at),
                _fmt(r.last_used_at),
                status + (" admin" if r.admin else ""),
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


@keys.command("revoke")
@_config_opt
@click.argument("key_id", type=int)
@store_errors
def revoke(config_path: str, key_id: int) -> None:
    """Revoke a key by id. A running gateway refuses it within about a second."""
    settings = load_or_exit(config_path)
    if not repo.revoke_key(_engine(settings), key_id):
        raise click.ClickException(f"no key with id {key_id}")
    click.echo(f"revoked key {key_id}")

