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


_LIMIT_FLAGS = (
    ("--rpm", "rpm", "Requests per minute."),
    ("--tpm", "tpm", "Tokens (prompt + completion) per minute."),
    ("--max-concurrent", "max_concurrent", "Requests in flight at once."),
    ("--max-tokens", "max_tokens", "Cap on a request's max_tokens (a 400 above it)."),
    ("--max-n", "max_n", "Cap on a request's n (a 400 above it)."),
)


def limit_options(fn: F) -> F:
    """``--rpm --tpm --max-concurrent --max-tokens --max-n``; ``0`` removes a limit."""
    for flag, dest, text in reversed(_LIMIT_FLAGS):
        fn = click.option(flag, dest, type=click.IntRange(min=0), default=None,
                          help=text + " 0 removes it.")(fn)
    return fn


def quota_options(fn: F) -> F:
    """``--quota-tokens N --quota-period day|month``."""
    fn = click.option("--quota-period", type=click.Choice(["day", "month"]), default=None,
                      help="The quota's period, UTC (default month).")(fn)
    return click.option("--quota-tokens", type=click.IntRange(min=0), default=None,
                        help="Token quota per period (prompt + completion); 0 removes it.")(fn)


def allow_ips_option(fn: F) -> F:
    return click.option(
        "--allow-ips", default=None,
        help="Comma-separated CIDRs requests must come from, e.g. 10.0.0.0/8,192.168.1.5 "
             "('' on update removes the list).")(fn)


def quota_period_needs_tokens(tokens: int | None, period: str | None) -> str:
    """The period for a create; ``--quota-period`` alone would set nothing, so it is refused."""
    if period is not None and not tokens:
        raise click.BadParameter("give --quota-tokens N too", param_hint="--quota-period")
    return period or "month"


def pop_limits(kwargs: dict[str, Any]) -> dict[str, int] | None:
    """The limit flags given (removed from ``kwargs``), or ``None`` when none was."""
    given = {dest: kwargs.pop(dest) for _, dest, _ in _LIMIT_FLAGS}
    out = {k: v for k, v in given.items() if v is not None}
    return out or None


def cidrs(value: str) -> list[str]:
    """``--allow-ips a,b`` -> ``["a", "b"]`` (``''``: the empty list)."""
    return [x.strip() for x in value.split(",") if x.strip()]


def fmt_limits(lim: dict[str, int] | None, quota: tuple[int, str] | None = None) -> str:
    """``rpm=60,tpm=10000 quota=1000000/month``, or ``-``."""
    parts = [f"{k}={v}" for k, v in (lim or {}).items()]
    if quota:
        parts.append(f"quota={quota[0]}/{quota[1]}")
    return ",".join(parts) or "-"


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
      fleetgate keys create --config gw.yaml --name ci --user alice --rpm 30 --allow-ips 10.0.0.0/8
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
@limit_options
@allow_ips_option
@store_errors
def create(
    config_path: str, name: str, user: str | None, models: str | None,
    expires: dt.timedelta | None, admin: bool, allow_ips: str | None, **lim: Any,
) -> None:
    """Create a key. The key is printed once, alone on the last line."""
    allow = globs(models)
    if allow is not None and not allow:
        raise click.BadParameter(
            "give at least one model, or leave --models out", param_hint="--models"
        )
    ctx = context(config_path)
    key, rec = key_svc.create_key(
        ctx, name=name, user=user, models=allow, expires=expires, admin=admin,
        limits=pop_limits(lim), allow_ips=cidrs(allow_ips) if allow_ips is not None else None)
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
    """List keys: id, user, name, prefix, models, limits, allowed networks, created, expires,
    last used, status."""
    ctx = context(config_path)
    rows = []
    for v in key_svc.list_keys(ctx, user=user):
        r = v.key
        rows.append((
            str(r.id), v.user, r.name, r.prefix + "…",
            ",".join(r.models) if r.models is not None else "*",
            fmt_limits(r.limits), ",".join(r.allow_ips) if r.allow_ips else "-",
            fmt_time(r.created_at), fmt_time(r.expires_at), fmt_time(r.last_used_at), v.status,
        ))
    table(("ID", "USER", "NAME", "PREFIX", "MODELS", "LIMITS", "ALLOW_IPS", "CREATED", "EXPIRES",
           "LAST USED", "STATUS"), rows)


@keys.command("revoke")
@_config_opt
@click.argument("key_id", type=int)
@store_errors
def revoke(config_path: str, key_id: int) -> None:
    """Revoke a key by id. A running gateway refuses it within about a second."""
    key_svc.revoke_key(context(config_path), key_id)
    click.echo(f"revoked key {key_id}")
