"""``fleetgate keys``: create, rotate, list and revoke API keys in the configured store.

A thin layer over :mod:`fleetgate.services.keys` (actor ``cli``). Also home of the options and
error handling the other store commands (``users``, ``groups``, ``audit``, ``usage``) share:
a refusal or a store that can't be used exits 1 with one line on stderr, never a traceback.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import click
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from fleetgate.auth import access
from fleetgate.auth import keys as keyfmt
from fleetgate.cli.serve import load_or_exit
from fleetgate.config import Settings
from fleetgate.errors import GatewayError
from fleetgate.services import Context
from fleetgate.services import keys as key_svc
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


def context(config_path: str) -> Context:
    """The services' context for a CLI command: the config's store, acting as ``cli``."""
    settings = load_or_exit(config_path)
    return Context(_engine(settings), settings)


F = TypeVar("F", bound=Callable[..., None])


def store_errors(fn: F) -> F:
    """A refusal, or a store that can't be opened or written, becomes one clear line."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except GatewayError as e:
            raise click.ClickException(e.message) from None
        except (SQLAlchemyError, OSError) as e:
            reason = getattr(e, "orig", None) or e
            raise click.ClickException(f"the key store can't be used: {reason}") from None

    return wrapper  # type: ignore[return-value]


def globs(value: str | None) -> tuple[str, ...] | None:
    """``--models a,b/*`` -> ``("a", "b/*")``."""
    return access.parse_globs(value)


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Print aligned columns (two spaces apart)."""
    all_rows = [tuple(header), *map(tuple, rows)]
    widths = [max(len(r[i]) for r in all_rows) for i in range(len(header))]
    for r in all_rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def fmt_time(t: dt.datetime | None) -> str:
    return t.strftime("%Y-%m-%d %H:%M") if t else "-"


def create_key(
    settings: Settings,
    *,
    name: str,
    models: list[str] | None,
    expires: dt.timedelta | None,
    admin: bool = False,
    user: str | None = None,
) -> str:
    """Create a key (as ``cli``) and return it whole. For ``fleetgate demo`` and the bench."""
    key, _ = key_svc.create_key(
        Context(_engine(settings), settings), name=name, user=user, models=models,
        expires=expires, admin=admin,
    )
    return key


@click.group()
def keys() -> None:
    """Manage API keys. Every key belongs to a user (default: the built-in 'default').

    \b
    Examples:
      fleetgate keys create --config gw.yaml --name laptop --user alice --models 'Qwen/*'
      fleetgate keys create --config gw.yaml --name alice --models llama,qwen --expires 30d
      fleetgate keys rotate --config gw.yaml 3 --overlap 1h
      fleetgate keys list --config gw.yaml --user alice
      fleetgate keys revoke --config gw.yaml 3
    """


def _duration(ctx: click.Context, param: click.Parameter, value: str | None) -> dt.timedelta | None:
    if value is None:
        return None
    try:
        return keyfmt.parse_duration(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def _overlap(ctx: click.Context, param: click.Parameter, value: str) -> dt.timedelta:
    if value.strip() == "0":
        return dt.timedelta(0)
    return _duration(ctx, param, value) or dt.timedelta(0)


@keys.command("create")
@_config_opt
@click.option("--name", required=True, help="What the key is for (a label; not unique).")
@click.option("--user", default=None,
              help="Its owner (default: 'default', or 'admin' with --admin).")
@click.option("--models", default=None,
              help="Comma-separated names or globs, within the owner's access (default: all "
                   "the owner may use).")
@click.option("--expires", default=None, callback=_duration, help="Lifetime, e.g. 30d, 12h, 2w.")
@click.option("--admin", is_flag=True,
              help="An admin key: without --user it belongs to the built-in 'admin' user; with "
                   "--user that user must have role admin.")
@store_errors
def create(
    config_path: str, name: str, user: str | None, models: str | None,
    expires: dt.timedelta | None, admin: bool,
) -> None:
    """Create a key. The key is printed once, alone on the last line."""
    allow = globs(models)
    if allow is not None and not allow:
        raise click.BadParameter(
            "give at least one model, or leave --models out", param_hint="--models"
        )
    ctx = context(config_path)
    key, rec = key_svc.create_key(ctx, name=name, user=user, models=allow, expires=expires,
                                  admin=admin)
    click.echo(f"Created key {rec.id} ({name!r}). It is shown only this once:", err=True)
    click.echo(key)


@keys.command("rotate")
@_config_opt
@click.argument("key_id", type=int)
@click.option("--overlap", default="1h", show_default=True, callback=_overlap,
              help="How long the old value keeps working, e.g. 1h, 30m; 0 stops it at once.")
@store_errors
def rotate(config_path: str, key_id: int, overlap: dt.timedelta) -> None:
    """Give a key a new value (same id, name, models, expiry); printed alone on the last line."""
    ctx = context(config_path)
    key, rec = key_svc.rotate_key(ctx, key_id, overlap=overlap)
    until = rec.previous_valid_until
    click.echo(
        f"Rotated key {key_id}; the old value works until {fmt_time(until)} UTC."
        if until else f"Rotated key {key_id}; the old value stopped now.",
        err=True,
    )
    click.echo(key)


@keys.command("list")
@_config_opt
@click.option("--user", default=None, help="Only this user's keys.")
@store_errors
def list_(config_path: str, user: str | None) -> None:
    """List keys: id, user, name, prefix, models, created, expires, last used, status."""
    ctx = context(config_path)
    rows = []
    for v in key_svc.list_keys(ctx, user=user):
        r = v.key
        rows.append((
            str(r.id), v.user, r.name, r.prefix + "…",
            ",".join(r.models) if r.models is not None else "*",
            fmt_time(r.created_at), fmt_time(r.expires_at), fmt_time(r.last_used_at), v.status,
        ))
    table(("ID", "USER", "NAME", "PREFIX", "MODELS", "CREATED", "EXPIRES", "LAST USED", "STATUS"),
          rows)


@keys.command("revoke")
@_config_opt
@click.argument("key_id", type=int)
@store_errors
def revoke(config_path: str, key_id: int) -> None:
    """Revoke a key by id. A running gateway refuses it within about a second."""
    key_svc.revoke_key(context(config_path), key_id)
    click.echo(f"revoked key {key_id}")
