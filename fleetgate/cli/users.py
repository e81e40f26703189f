"""``fleetgate users``: create, update, list, disable and enable users (actor ``cli``)."""

from __future__ import annotations

from typing import Any

import click

from fleetgate.cli.keys import (
    _config_opt,
    allow_ips_option,
    cidrs,
    context,
    fmt_limits,
    fmt_time,
    globs,
    limit_options,
    pop_limits,
    quota_options,
    quota_period_needs_tokens,
    store_errors,
    table,
)
from fleetgate.services import users as user_svc
from fleetgate.services.validation import KEEP


@click.group()
def users() -> None:
    """Manage users: a role, groups, an optional model list of their own, enabled or not.

    \b
    Examples:
      fleetgate users create --config gw.yaml alice --group nlp --group vision
      fleetgate users create --config gw.yaml ops --role admin
      fleetgate users update --config gw.yaml alice --remove-group vision --models 'Qwen/*'
      fleetgate users update --config gw.yaml alice --models ''   # drop her own list
      fleetgate users update --config gw.yaml alice --rpm 60 --tpm 0 --allow-ips 10.0.0.0/8
      fleetgate users update --config gw.yaml alice --quota-tokens 1000000 --quota-period day
      fleetgate users disable --config gw.yaml alice
    """


@users.command("create")
@_config_opt
@click.argument("name")
@click.option("--group", "groups", multiple=True, help="A group to join (repeatable).")
@click.option("--role", type=click.Choice(["user", "admin"]), default="user", show_default=True)
@click.option("--models", default=None,
              help="Comma-separated names or globs narrowing what the groups allow.")
@limit_options
@quota_options
@allow_ips_option
@store_errors
def create(config_path: str, name: str, groups: tuple[str, ...], role: str,
           models: str | None, quota_tokens: int | None, quota_period: str | None,
           allow_ips: str | None, **lim: Any) -> None:
    """Create a user."""
    u = user_svc.create_user(context(config_path), name, role=role, groups=groups,
                             models=globs(models) or None, limits=pop_limits(lim),
                             quota_tokens=quota_tokens,
                             quota_period=quota_period_needs_tokens(quota_tokens, quota_period),
                             allow_ips=cidrs(allow_ips) if allow_ips is not None else None)
    click.echo(f"created user {u.name} (role {u.role})")


@users.command("update")
@_config_opt
@click.argument("name")
@click.option("--add-group", "add", multiple=True, help="Join a group (repeatable).")
@click.option("--remove-group", "remove", multiple=True, help="Leave a group (repeatable).")
@click.option("--role", type=click.Choice(["user", "admin"]), default=None)
@click.option("--models", default=None,
              help="Replace the user's own list; '' removes it.")
@click.option("--link-ldap", is_flag=True,
              help="Let portal sign-ins through LDAP reach this local account.")
@limit_options
@quota_options
@allow_ips_option
@store_errors
def update(config_path: str, name: str, add: tuple[str, ...], remove: tuple[str, ...],
           role: str | None, models: str | None, link_ldap: bool, quota_tokens: int | None,
           quota_period: str | None, allow_ips: str | None, **lim: Any) -> None:
    """Change a user; options not given stay as they are."""
    if link_ldap:
        from fleetgate.services import accounts

        accounts.link_ldap(context(config_path), name)
        click.echo(f"linked user {name} to the directory account of the same name")
    u = user_svc.update_user(
        context(config_path), name, role=role if role is not None else KEEP,
        models=KEEP if models is None else (globs(models) or None),
        add_groups=add, remove_groups=remove, limits=pop_limits(lim),
        quota_tokens=KEEP if quota_tokens is None else quota_tokens,
        quota_period=KEEP if quota_period is None else quota_period,
        allow_ips=KEEP if allow_ips is None else cidrs(allow_ips),
    )
    click.echo(f"updated user {u.name}: role {u.role}, groups {','.join(u.groups) or '-'}, "
               f"models {','.join(u.models) if u.models is not None else '(from groups)'}, "
               f"limits {fmt_limits(u.limits, u.quota)}, "
               f"allow-ips {','.join(u.allow_ips) if u.allow_ips else '-'}")


@users.command("list")
@_config_opt
@store_errors
def list_(config_path: str) -> None:
    """List users: name, role, groups, own models, status, source, created, limits and quota,
    allowed networks."""
    rows = [
        (u.name, u.role, ",".join(u.groups) or "-",
         ",".join(u.models) if u.models is not None else "-",
         "enabled" if u.enabled else "disabled", u.source, fmt_time(u.created_at),
         fmt_limits(u.limits, u.quota), ",".join(u.allow_ips) if u.allow_ips else "-")
        for u in user_svc.list_users(context(config_path))
    ]
    table(("NAME", "ROLE", "GROUPS", "MODELS", "STATUS", "SOURCE", "CREATED", "LIMITS",
           "ALLOW_IPS"), rows)


@users.command("disable")
@_config_opt
@click.argument("name")
@store_errors
def disable(config_path: str, name: str) -> None:
    """Disable a user: a running gateway refuses all their keys within about a second."""
    user_svc.set_enabled(context(config_path), name, False)
    click.echo(f"disabled user {name}")


@users.command("enable")
@_config_opt
@click.argument("name")
@store_errors
def enable(config_path: str, name: str) -> None:
    """Enable a user again; their keys that aren't revoked or expired work again."""
    user_svc.set_enabled(context(config_path), name, True)
    click.echo(f"enabled user {name}")


@users.command("set-password")
@_config_opt
@click.argument("name")
@store_errors
def set_password(config_path: str, name: str) -> None:
    """Set a local account's portal password, read from stdin (no echo on a terminal).

    \b
    Examples:
      fleetgate users set-password --config gw.yaml alice          # prompts twice
      printf '%s\\n' "$PW" | fleetgate users set-password --config gw.yaml alice
    """
    import sys

    from fleetgate.services import accounts

    if sys.stdin.isatty():
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    accounts.set_password(context(config_path), name, password)
    click.echo(f"set the password of user {name}")
